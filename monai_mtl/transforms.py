"""The network input's definition (physical-space preprocessing) and the transforms specific to this workflow.

:class:`Preprocessing` is the one definition of what reaches the network: an orientation, a voxel
spacing in mm and a fixed grid (so a field of view), and an intensity normalisation. Training,
evaluation and inference build their MONAI transform chains from it, and every checkpoint stores it
(:mod:`monai_mtl.checkpoints`), so a model is always fed the way it was trained, whatever the grid,
voxel size or orientation of the scans it is given.
"""

from __future__ import annotations

import os
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import (
    EnsureTyped,
    LoadImaged,
    MapTransform,
    NormalizeIntensityd,
    Orientationd,
    ResizeWithPadOrCropd,
    ScaleIntensityd,
    Spacingd,
)

from monai_mtl.errors import ConfigError
from monai_mtl import SEVERITY_SCALE
from monai_mtl.images import check_stored_size, check_volume, not_3d_error

#: ``zscore_minmax``: the paper's z-score per volume, then min-max to [0, 1]; ``zscore``: z-score only.
INTENSITY_NORMALIZATIONS = ("zscore_minmax", "zscore")


@dataclass(frozen=True)
class Preprocessing:
    """What the network sees: the scan reoriented, resampled to ``pixdim`` mm, cropped/padded to ``spatial_size``.

    The input is defined in physical space (a voxel size and a field of view of ``pixdim *
    spatial_size`` mm around the scan's centre), not by a voxel count, so the same anatomy scanned
    on another grid reaches the network as nearly the same tensor. MONAI's ``Spacingd`` resamples
    with trilinear interpolation and no anti-aliasing blur: the phantoms are point-sampled at their
    voxel centres, and a blur before downsampling moved finer grids further from the native tensor
    (0.050 vs 0.046 mean |difference| in z units at 128 x 128 x 32), so none is added.

    Args:
        pixdim: voxel size of the network input in mm (x, y, z after reorientation).
        spatial_size: grid of the network input in voxels.
        axcodes: orientation of the network input (``"RAS"``).
        intensity: one of :data:`INTENSITY_NORMALIZATIONS`.

    Example:
        >>> Preprocessing(pixdim=(2.5, 3.0, 8.0), spatial_size=(64, 64, 16)).field_of_view_mm
        (160.0, 192.0, 128.0)
    """

    pixdim: tuple[float, float, float] = (2.5, 3.0, 8.0)
    spatial_size: tuple[int, int, int] = (64, 64, 16)
    axcodes: str = "RAS"
    intensity: str = "zscore"

    def __post_init__(self) -> None:
        object.__setattr__(self, "pixdim", tuple(float(v) for v in self.pixdim))
        object.__setattr__(self, "spatial_size", tuple(int(v) for v in self.spatial_size))
        if len(self.pixdim) != 3 or any(not v > 0 for v in self.pixdim):
            raise ConfigError(f"pixdim needs 3 positive voxel sizes in mm, got {list(self.pixdim)}")
        if len(self.spatial_size) != 3 or any(v < 1 for v in self.spatial_size):
            raise ConfigError(f"spatial_size needs 3 positive voxel counts, got {list(self.spatial_size)}")
        if self.intensity not in INTENSITY_NORMALIZATIONS:
            raise ConfigError(f"intensity normalisation must be one of {INTENSITY_NORMALIZATIONS}, got {self.intensity!r}")

    @property
    def field_of_view_mm(self) -> tuple[float, float, float]:
        return tuple(float(p * n) for p, n in zip(self.pixdim, self.spatial_size))

    def to_dict(self) -> dict:
        """JSON-friendly form (lists), as stored in checkpoints."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, values: Mapping) -> Preprocessing:
        return cls(**dict(values))

    def transforms(
        self, keys: KeysCollection = "image", check: bool = False, track_meta: bool = False,
        augmentation: Sequence = (), acquisition: Sequence = (), severity_key: str | None = None,
    ) -> list:
        """The MONAI transform chain: load, (check,) float32, orient, resample, crop/pad, (augment,) normalise.

        Args:
            keys: image keys.
            check: add :class:`CheckImaged` right after loading (inference: one read per scan).
            track_meta: keep MONAI metadata (the affine) at the end, e.g. to map saliency back to the scan.
            augmentation: random transforms applied on the resampled grid before intensity
                normalisation, where a scanner's artifacts arise (``CacheDataset`` caches the
                deterministic part before them).
            acquisition: transforms applied to the scan as loaded, in its own grid, before
                resampling (e.g. :class:`monai_mtl.robustness.ArtifactScand` to simulate another scanner).
            severity_key: also scale this target to [0, 1] (:class:`ScaleSeverityd`), for labelled data.
        """
        chain = [LoadImaged(keys=keys, ensure_channel_first=True, image_only=True)]
        if check:
            chain.append(CheckImaged(keys=keys))
        chain += [
            EnsureTyped(keys=keys, dtype=torch.float32),
            *acquisition,
            Orientationd(keys=keys, axcodes=self.axcodes, labels=None),
            Spacingd(keys=keys, pixdim=self.pixdim, mode="bilinear", padding_mode="zeros"),
            ResizeWithPadOrCropd(keys=keys, spatial_size=self.spatial_size),
            *augmentation,
            NormalizeIntensityd(keys=keys),
        ]
        if self.intensity == "zscore_minmax":
            chain.append(ScaleIntensityd(keys=keys, minv=0.0, maxv=1.0))
        chain.append(EnsureTyped(keys=keys, dtype=torch.float32, track_meta=track_meta))
        if severity_key is not None:
            chain.append(ScaleSeverityd(keys=severity_key))
        return chain


#: ``paper``: the paper's noise + intensity shift only (on the batch, :class:`BatchIntensityAugmentation`);
#: ``robust``: also MONAI's scanner-artifact transforms per volume (:func:`augmentation_transforms`).
AUGMENTATION_PRESETS = ("paper", "robust")


def augmentation_transforms(preset: str = "paper", keys: KeysCollection = "image") -> list:
    """Per-volume random transforms of an augmentation preset, applied on the resampled grid before normalisation.

    ``robust`` draws, each with its own probability, what differs between scanners and sites: a smooth
    multiplicative bias field, a contrast (gamma) change, Gibbs ringing, Rician noise, a blur or a
    simulated lower resolution, and a small affine (rotation 3 degrees, scale 3%, shift 2 voxels).
    They run in the data loader on every epoch (about 5 ms a volume on one CPU core; see ``benchmarks/run.py``).
    ``paper`` adds nothing here: its noise and intensity shift are drawn on the batch.

    Example:
        >>> [type(t).__name__ for t in augmentation_transforms("robust")][:2]
        ['RandBiasFieldd', 'RandAdjustContrastd']
    """
    from monai.transforms import (
        RandAdjustContrastd,
        RandAffined,
        RandBiasFieldd,
        RandGaussianSmoothd,
        RandGibbsNoised,
        RandRicianNoised,
        RandSimulateLowResolutiond,
    )

    if preset not in AUGMENTATION_PRESETS:
        raise ConfigError(f"augmentation must be one of {AUGMENTATION_PRESETS}, got {preset!r}")
    if preset == "paper":
        return []
    return [
        RandBiasFieldd(keys=keys, degree=3, coeff_range=(0.0, 0.1), prob=0.3),
        RandAdjustContrastd(keys=keys, gamma=(0.8, 1.25), prob=0.3),
        RandGibbsNoised(keys=keys, alpha=(0.0, 0.4), prob=0.2),
        # relative to the scan's intensity std, so it means the same in any scanner's units
        RandRicianNoised(keys=keys, std=0.1, relative=True, sample_std=True, prob=0.2),
        RandGaussianSmoothd(keys=keys, sigma_x=(0.25, 0.8), sigma_y=(0.25, 0.8), sigma_z=(0.1, 0.4), prob=0.2),
        RandSimulateLowResolutiond(keys=keys, zoom_range=(0.5, 0.9), prob=0.2),
        RandAffined(
            keys=keys, rotate_range=(np.pi / 60,) * 3, scale_range=(0.03,) * 3, translate_range=(2, 2, 1),
            mode="bilinear", padding_mode="zeros", prob=0.15,  # the costliest (about 10 ms a volume on a CPU core)
        ),
    ]


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
            if isinstance(path, str) and path.lower().endswith((".nii", ".nii.gz")) and os.path.isfile(path):
                check_stored_size(path)
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
            raise ConfigError(f"noise_std and shift must be >= 0, got {noise_std} and {shift}")
        self.noise_std, self.shift = float(noise_std), float(shift)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        offsets = torch.empty((images.shape[0],) + (1,) * (images.ndim - 1), device=images.device, dtype=images.dtype)
        offsets.uniform_(-self.shift, self.shift)
        return images + torch.randn_like(images) * self.noise_std + offsets
