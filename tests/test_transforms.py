"""Transforms of the multi-task targets."""

from __future__ import annotations

import pytest
import torch

from monai_mtl.transforms import ScaleSeverityd


def test_scale_severity():
    out = ScaleSeverityd(keys="severity")({"severity": 35.0, "response": 1})
    assert out["severity"].dtype == torch.float32 and out["response"] == 1
    assert float(out["severity"]) == pytest.approx(0.35)

