"""Transforms specific to the multi-task targets; image transforms are MONAI's, listed in the bundle configs."""

from __future__ import annotations

from collections.abc import Hashable, Mapping

import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform

from monai_mtl import SEVERITY_SCALE


class ScaleSeverityd(MapTransform):
    """Divide the severity by ``scale`` (0-100 to [0, 1], matching the sigmoid head) as a float32 tensor.

    MONAI's intensity transforms expect image arrays; the severity is one number per subject.

    Example:
        >>> ScaleSeverityd(keys="severity")({"severity": 35.0})["severity"]
        tensor(0.3500)
    """

    def __init__(self, keys: KeysCollection = "severity", scale: float = SEVERITY_SCALE, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.scale = float(scale)

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = torch.as_tensor(d[key], dtype=torch.float32) / self.scale
        return d
