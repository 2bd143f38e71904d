"""Transforms specific to this workflow (targets, loaded-image checks); image transforms are MONAI's, listed in the bundle configs."""

from __future__ import annotations

from collections.abc import Hashable, Mapping

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform

from monai_mtl import SEVERITY_SCALE
from monai_mtl.cohort import check_volume, not_3d_error


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


class CheckImaged(MapTransform):
    """Check a channel-first image just loaded by ``LoadImaged``: one 3D volume, finite, not constant.

    Inference checks each scan on the copy it has already read, instead of reading every file once
    more before the run (that second read took a third of the inference time).

    Raises:
        CohortError: naming the file (``filename_or_obj``): not one 3D volume, NaN/Inf voxels, constant.
    """

    def __init__(self, keys: KeysCollection = "image", allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)

    def __call__(self, data: Mapping[Hashable, object]) -> Mapping[Hashable, object]:
        for key in self.key_iterator(data):
            image = data[key]
            path = image.meta.get("filename_or_obj", key) if isinstance(image, MetaTensor) else key
            if image.ndim != 4 or image.shape[0] != 1:
                # channel-first: a series of C volumes arrives as (C, X, Y, Z); report it as stored, (X, Y, Z, C)
                shape = (*image.shape[1:], image.shape[0]) if image.shape[0] != 1 else tuple(image.shape[1:])
                raise not_3d_error(path, shape)
            array = image.as_tensor() if isinstance(image, MetaTensor) else torch.as_tensor(image)
            check_volume(np.asarray(array.detach().cpu()), path)
        return data


class BatchIntensityAugmentation:
    """Gaussian noise and one random intensity shift per volume, applied to a whole image batch at once.

    Draws the same distribution as MONAI's per-volume ``RandGaussianNoised(std=noise_std,
    sample_std=False)`` followed by ``RandShiftIntensityd(offsets=shift, prob=1.0)``, but on the
    collated ``(B, C, ...)`` tensor, on the training device: per volume in the data loader these two
    took a quarter of a CPU epoch. Random numbers come from torch's global generator, which
    ``set_determinism`` seeds and ``training_state.pt`` saves, so a resumed run draws the same ones.

    Example:
        >>> out = BatchIntensityAugmentation(noise_std=0.0, shift=0.05)(torch.zeros(4, 1, 8, 8, 4))
        >>> bool(out.abs().max() <= 0.05) and len(out.flatten(1).unique(dim=0)) == 4
        True
    """

    def __init__(self, noise_std: float = 0.01, shift: float = 0.05) -> None:
        if noise_std < 0 or shift < 0:
            raise ValueError(f"noise_std and shift must be >= 0, got {noise_std} and {shift}")
        self.noise_std, self.shift = float(noise_std), float(shift)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        offsets = torch.empty((images.shape[0],) + (1,) * (images.ndim - 1), device=images.device, dtype=images.dtype)
        offsets.uniform_(-self.shift, self.shift)
        return images + torch.randn_like(images) * self.noise_std + offsets
