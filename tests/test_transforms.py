"""Transforms of the multi-task targets, the loaded-image checks and the batch augmentation."""

from __future__ import annotations

import pytest
import torch
from monai.data import MetaTensor

from monai_mtl.cohort import CohortError
from monai_mtl.engines import MultiTaskPrepareBatch
from monai_mtl.transforms import BatchIntensityAugmentation, CheckImaged, ScaleSeverityd


def test_scale_severity():
    out = ScaleSeverityd(keys="severity")({"severity": 35.0, "response": 1})
    assert out["severity"].dtype == torch.float32 and out["response"] == 1
    assert float(out["severity"]) == pytest.approx(0.35)


def _loaded(array: torch.Tensor) -> dict:
    return {"image": MetaTensor(array, meta={"filename_or_obj": "/scans/x.nii.gz"})}


def test_check_imaged_passes_a_volume_and_names_the_file_of_a_bad_one():
    good = _loaded(torch.rand(1, 8, 8, 4))
    assert CheckImaged()(good) is good
    two_bad_voxels = torch.rand(1, 8, 8, 4)
    two_bad_voxels[0, 0, 0, 0], two_bad_voxels[0, 1, 1, 1] = float("nan"), float("inf")
    cases = {
        "expected a 3D volume, got shape (8, 8, 4, 3)": torch.rand(3, 8, 8, 4),  # a series, channel-first
        "expected a 3D volume, got shape (8, 8)": torch.rand(1, 8, 8),
        "2 voxels are NaN or infinite": two_bad_voxels,
        "the volume is constant (7.0)": torch.full((1, 8, 8, 4), 7.0),
    }
    for message, array in cases.items():
        with pytest.raises(CohortError) as err:
            CheckImaged()(_loaded(array))
        assert str(err.value).startswith("/scans/x.nii.gz: ") and message in str(err.value), str(err.value)


def test_batch_augmentation_statistics_and_determinism():
    images = torch.zeros(256, 1, 16, 16, 8)
    torch.manual_seed(0)
    out = BatchIntensityAugmentation(noise_std=0.01, shift=0.05)(images)
    offsets = out.mean(dim=(1, 2, 3, 4))
    noise = out - offsets.view(-1, 1, 1, 1, 1)
    assert noise.std().item() == pytest.approx(0.01, rel=0.02)  # per-voxel noise with the given std
    assert offsets.abs().max() <= 0.05 + 1e-3 and offsets.std().item() == pytest.approx(0.1 / 12**0.5, rel=0.15)  # U(-0.05, 0.05)
    torch.manual_seed(0)
    torch.testing.assert_close(BatchIntensityAugmentation(noise_std=0.01, shift=0.05)(images), out)
    with pytest.raises(ValueError, match=">= 0"):
        BatchIntensityAugmentation(noise_std=-1.0)


def test_prepare_batch_augments_only_when_given_and_keeps_channels_last():
    batch = {"image": torch.rand(2, 1, 8, 8, 4), "response": [0, 2], "severity": [0.1, 0.9]}
    plain, targets = MultiTaskPrepareBatch(channels_last=True)(batch)
    torch.testing.assert_close(plain, batch["image"])
    assert targets["response"].dtype == torch.long and targets["severity"].dtype == torch.float32
    augmented, _ = MultiTaskPrepareBatch(channels_last=True, augmentation=BatchIntensityAugmentation(0.0, 0.05))(batch)
    shift = (augmented - batch["image"]).flatten(1)
    assert not torch.equal(augmented, batch["image"]) and torch.allclose(shift, shift[:, :1].expand_as(shift))
    assert augmented.is_contiguous(memory_format=torch.channels_last_3d)
