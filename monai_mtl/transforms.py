"""The network input's definition (physical-space preprocessing) and the transforms specific to this workflow.

:class:`Preprocessing` is the one definition of what reaches the network: an orientation, a voxel
spacing in mm and a fixed grid (so a field of view), and an intensity normalisation. Training,
evaluation and inference build their MONAI transform chains from it, and every checkpoint stores it
(:mod:`monai_mtl.checkpoints`), so a model is always fed the way it was trained, whatever the grid,
voxel size or orientation of the scans it is given.
"""

from __future__ import annotations

import functools
import json
import logging
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
    ScaleIntensityd,
    SpatialResample,
)

from monai_mtl.errors import ConfigError
from monai_mtl import SEVERITY_SCALE
from monai_mtl.images import check_stored_size, check_volume, not_3d_error

logger = logging.getLogger(__name__)

#: ``zscore_minmax``: the paper's z-score per volume, then min-max to [0, 1]; ``zscore``: z-score only;
#: ``histogram``: Nyul's histogram standardisation onto landmarks fitted on the training part (a scale from 0, about
#: the CSF, to 1, the brightest tissue: like ``zscore_minmax``'s, so the paper's noise and shift mean the same).
INTENSITY_NORMALIZATIONS = ("zscore_minmax", "zscore", "histogram")
#: the volume's percentiles that ``histogram`` standardisation maps onto the fitted landmarks: Nyul, Udupa & Zhang
#: (2000)'s deciles, 1% and 99% at the ends (TorchIO's ``HistogramStandardization`` defaults), of the brightest
#: 40% of the voxels. The network's grid is a fixed field of view in mm, which the head fills to about the same
#: part in any scan (34% in the synthetic cohort, CSF included). Nyul's and TorchIO's foreground, the voxels above
#: the scan's mean, is not kept by a contrast change (the mean moves among partial-volume voxels); a share of the
#: voxels is, exactly, as any monotone change of the intensities keeps their order. On phantoms with the
#: contrast and Rician noise of the multi-site cohort's sites, each atlas region's mean moved by 0.014 of the
#: tissue's spread (0.074 with the z-score; 0.032 with the brightest quarter's deciles and the median, which
#: left CSF and ventricles between two landmarks; ``docs/scripts/histogram_landmark_choice.py``).
HISTOGRAM_PERCENTILES = (60.4, 64.0, 68.0, 72.0, 76.0, 80.0, 84.0, 88.0, 92.0, 96.0, 99.6)
#: bins of the intensity histogram that :func:`histogram_landmarks` reads the percentiles from
HISTOGRAM_BINS = 4096


def histogram_landmarks(images: torch.Tensor) -> torch.Tensor:
    """``(B, K)``: each volume's intensities at :data:`HISTOGRAM_PERCENTILES`, made strictly increasing (a flat
    stretch of the histogram, e.g. a noise-free background, would divide by 0). ``images``: ``(B, ...)``.

    Read from a histogram of :data:`HISTOGRAM_BINS` bins between the volume's minimum and maximum, the
    voxels of a bin taken as spread evenly over it: within a bin's width (1/4096 of the range) of
    ``torch.quantile``, whose sort of every voxel took eight times as long on a training batch of 16
    volumes of 64 x 64 x 16 (one CPU core), and training computes it for every augmented volume.
    """
    flat = images.detach().flatten(1).float()
    count, voxels = flat.shape
    low, high = flat.amin(dim=1, keepdim=True), flat.amax(dim=1, keepdim=True)
    width = (high - low).clamp_min(1e-12) / HISTOGRAM_BINS
    index = ((flat - low) / width).long().clamp_(0, HISTOGRAM_BINS - 1)
    histogram = torch.zeros(count, HISTOGRAM_BINS, device=flat.device).scatter_add_(1, index, torch.ones_like(flat))
    cumulative = histogram.cumsum(dim=1)
    rank = (torch.tensor(HISTOGRAM_PERCENTILES, dtype=torch.float64) / 100.0 * (voxels - 1)).to(flat)
    rank = rank.expand(count, -1).contiguous()  # the 0-based rank of each percentile, as torch.quantile's
    bin_ = torch.searchsorted(cumulative, rank, right=True).clamp_(max=HISTOGRAM_BINS - 1)  # first bin past the rank
    before = torch.where(bin_ > 0, cumulative.gather(1, (bin_ - 1).clamp(min=0)), torch.zeros_like(rank))
    marks = low + (bin_ + (rank - before + 0.5) / histogram.gather(1, bin_).clamp_min(1.0)) * width
    floor = 1e-6 * (marks.abs().amax(dim=1, keepdim=True) + 1.0)
    gaps = torch.maximum(torch.diff(marks, dim=1), floor)
    return torch.cat([marks[:, :1], marks[:, :1] + torch.cumsum(gaps, dim=1)], dim=1)


def standardize_histogram(images: torch.Tensor, landmarks: Sequence[float]) -> torch.Tensor:
    """Nyul's standardisation of each volume of ``images`` ``(B, ...)``: its :func:`histogram_landmarks` mapped
    piecewise linearly onto ``landmarks``.

    Intensities below the first or above the last landmark follow the end segments' lines. A
    monotone change of the intensities (a scanner's contrast, its gain) moves the scan's landmarks
    with it, and the map moves them back: the same tissue reaches the same value.
    """
    source = histogram_landmarks(images)
    target = torch.as_tensor(landmarks, dtype=source.dtype, device=source.device)
    slopes = torch.diff(target) / torch.diff(source, dim=1)  # (B, K - 1)
    values = images.flatten(1).float()
    # the first segment's line, bent at each inner landmark by the change of slope: a sum of ramps, elementwise
    # (a search of each voxel's segment and four gathers were slower on a CPU)
    out = target[0] + slopes[:, :1] * (values - source[:, :1])
    for k in range(1, source.shape[1] - 1):
        out = out + (slopes[:, k : k + 1] - slopes[:, k - 1 : k]) * torch.relu(values - source[:, k : k + 1])
    return out.view_as(images).to(images.dtype)


def fit_landmarks(data: Sequence[Mapping], intensity: str, pixdim: Sequence[float], spatial_size: Sequence[int],
                  axcodes: str = "RAS", keys: str = "image", bias_field_degree: int = 0) -> tuple[float, ...]:
    """The standard landmarks of ``histogram`` standardisation: the mean over the training scans ``data`` of each
    scan's :func:`histogram_landmarks` scaled to [0, 1] between its first and last, on the network's grid (after
    :func:`correct_bias_field` of ``bias_field_degree``, as the scans the landmarks will map).

    ``()`` (nothing read) for another ``intensity``. Stored in ``model.pt`` with the preprocessing, so evaluation
    and inference map every scan onto the scale the network was trained on.
    """
    if intensity != "histogram":
        return ()
    from monai.transforms import Compose

    if not data:
        raise ConfigError("intensity_normalization 'histogram' needs training scans to fit its landmarks; got none")
    load = Compose(Preprocessing(pixdim=pixdim, spatial_size=spatial_size, axcodes=axcodes).transforms(keys, normalize=False))
    scaled = []
    for item in data:
        volume = correct_bias_field(torch.as_tensor(load({keys: item[keys]})[keys])[None], bias_field_degree)
        marks = histogram_landmarks(volume)[0]
        scaled.append((marks - marks[0]) / (marks[-1] - marks[0]))
    landmarks = torch.stack(scaled).double().mean(dim=0)
    logger.info("histogram landmarks fitted on %d training scans: %s", len(data), [round(float(v), 4) for v in landmarks])
    return tuple(float(v) for v in landmarks)


#: ``bias_field_correction`` / :attr:`Preprocessing.bias_field_degree`: the share of a volume's voxels, its brightest,
#: that the first fit starts from (the white matter of a T1-weighted head: its largest and brightest tissue; 34% of
#: the synthetic cohort's field of view is head, about half of it white matter)
BIAS_FIT_START_SHARE = 0.2
#: voxels within this many log units of the fitted field (a factor of 1.105 either way) carry the next fit: the white
#: matter of every part of the head, not the grey matter (0.55 / 0.85: -0.44 log units; a contrast change ``I **
#: gamma`` scales that by gamma, 0.8-1.25) nor CSF; about 3 standard deviations of Rician noise 0.03 on white matter.
#: 0.2 let white matter's partial-volume edge, commoner near the cortex, bend the field: white over grey matter of a
#: noise-free phantom moved 6% (1.69 to 1.59), at 0.1 2.4%, with the same residual of a site's field (< 0.002)
BIAS_FIT_BAND = 0.1
#: fits after the first; the third and fourth moved the field of the multi-site cohort's phantoms by < 0.5%
BIAS_FIT_ITERATIONS = 3
#: the highest ``bias_field_correction`` degree accepted (35 terms at 4; a head's field is smoother)
MAX_BIAS_FIELD_DEGREE = 4


def correct_bias_field(images: torch.Tensor, degree: int) -> torch.Tensor:
    """Each volume of ``images`` ``(B, C, X, Y, Z)`` divided by its smooth multiplicative bias field.

    The field is ``exp`` of a Legendre polynomial of total degree ``degree`` over the field of view (the form of
    MONAI's ``RandBiasField`` and of the multi-site generator's fields), fitted by least squares to the log
    intensities of one tissue: first the brightest :data:`BIAS_FIT_START_SHARE` of the voxels, then, for
    :data:`BIAS_FIT_ITERATIONS` rounds, the voxels within :data:`BIAS_FIT_BAND` of the last fit (the white matter,
    which a phantom, and to first order a brain, has at one intensity everywhere; the tissues at other levels fall
    outside the band and do not bend the field). The field is divided out relative to its mean over those voxels, so
    the tissue keeps its mean level. A polynomial stand-in for N4 (Tustison et al. 2010, which MONAI does not
    have): it needs a tissue that fills the head at one level, and it is only as smooth as ``degree``.

    The fit reads every second voxel in-plane (a smooth field loses nothing) and runs on the whole batch at once;
    ``degree`` 0 returns ``images`` unchanged.
    """
    if degree <= 0:
        return images
    grid = _legendre_basis(tuple(images.shape[2:]), degree).to(images.device)  # (K, X, Y, Z)
    values = images[:, :, ::2, ::2, :].flatten(2).float()  # (B, C, V sampled)
    terms = grid[:, ::2, ::2, :].flatten(1)  # (K, V sampled)
    y = torch.log(values.clamp_min(1e-6))
    start = values.kthvalue(max(1, int(values.shape[-1] * (1.0 - BIAS_FIT_START_SHARE))), dim=-1, keepdim=True).values
    weights = (values >= start).to(values.dtype)
    ridge = 1e-6 * torch.eye(terms.shape[0], dtype=values.dtype, device=values.device)
    for round_ in range(BIAS_FIT_ITERATIONS + 1):
        gram = (weights.unsqueeze(-2) * terms) @ terms.T + ridge
        coefficients = torch.linalg.solve(gram, torch.einsum("kv,bcv->bck", terms, weights * y))
        fit = coefficients @ terms  # (B, C, V sampled)
        if round_ < BIAS_FIT_ITERATIONS:
            weights = ((y - fit).abs() < BIAS_FIT_BAND).to(values.dtype)
    level = (fit * weights).sum(-1, keepdim=True) / weights.sum(-1, keepdim=True).clamp_min(1.0)
    field = torch.exp(coefficients @ grid.flatten(1) - level).view(*coefficients.shape[:2], *images.shape[2:])
    return (images.float() / field).to(images.dtype)


class BiasFieldCorrectiond(MapTransform):
    """:func:`correct_bias_field` of each key's volume (``bias_field_correction``, see :class:`Preprocessing`)."""

    def __init__(self, keys: KeysCollection, degree: int, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.degree = int(degree)

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = correct_bias_field(torch.as_tensor(d[key])[None], self.degree)[0]
        return d


class HistogramStandardized(MapTransform):
    """:func:`standardize_histogram` of each key's volume onto ``landmarks`` (see :data:`INTENSITY_NORMALIZATIONS`)."""

    def __init__(self, keys: KeysCollection, landmarks: Sequence[float], allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.landmarks = tuple(landmarks)

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = standardize_histogram(d[key][None], self.landmarks)[0]
        return d


def field_of_view_affine(affine: np.ndarray | torch.Tensor, shape: Sequence[int], pixdim: Sequence[float],
                         spatial_size: Sequence[int]) -> np.ndarray:
    """The affine of a ``spatial_size`` grid of ``pixdim`` mm voxels centred on a scan's field of view.

    The grid keeps the scan's axis directions (as MONAI's ``Spacing`` does) and puts its centre where the
    scan's centre is: ``affine`` applied to ``(shape - 1) / 2``. For the synthetic cohort, whose grids share
    a field of view, every grid then maps to the same voxel centres.
    """
    affine = np.asarray(affine, dtype=np.float64)
    pixdim, size = np.asarray(pixdim, dtype=np.float64), np.asarray(spatial_size, dtype=np.float64)
    linear = affine[:3, :3] / np.linalg.norm(affine[:3, :3], axis=0) * pixdim
    centre = affine[:3, :3] @ ((np.asarray(shape, dtype=np.float64) - 1) / 2) + affine[:3, 3]
    out = np.eye(4)
    out[:3, :3], out[:3, 3] = linear, centre - linear @ ((size - 1) / 2)
    return out


class ResampleToFieldOfViewd(MapTransform):
    """Resample a scan, by its affine, onto the network's grid centred on the scan's field of view, in one step.

    ``Spacingd`` followed by ``ResizeWithPadOrCropd`` does the same up to where the grid lands: ``Spacing``
    keeps the first voxel's centre, so a scan whose voxels are larger or smaller than ``pixdim`` ends up shifted
    by half the difference of the voxel sizes (on the cohort's field of view, 48 x 48 x 12 grids by 1.3 mm in z,
    128 x 128 x 32 ones by 2 mm), and the array-centred crop adds up to half a voxel. This grid is
    :func:`field_of_view_affine`; MONAI's ``SpatialResample`` (trilinear, zeros outside the scan) fills it, and
    returns a scan already on it unchanged.

    Args:
        keys: image keys (channel-first ``MetaTensor``s, e.g. from ``LoadImaged``).
        pixdim: voxel size of the grid in mm.
        spatial_size: grid in voxels.
    """

    def __init__(self, keys: KeysCollection, pixdim: Sequence[float], spatial_size: Sequence[int]) -> None:
        super().__init__(keys)
        self.pixdim, self.spatial_size = tuple(float(v) for v in pixdim), tuple(int(v) for v in spatial_size)
        self.resample = SpatialResample(mode="bilinear", padding_mode="zeros", dtype=torch.float32)

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            image = d[key]
            if not isinstance(image, MetaTensor):
                raise TypeError(f"{key}: resampling to the field of view needs a MetaTensor with its affine, got {type(image).__name__}")
            target = field_of_view_affine(image.affine, image.shape[1:], self.pixdim, self.spatial_size)
            d[key] = self.resample(image, dst_affine=torch.as_tensor(target), spatial_size=self.spatial_size)
        return d


@dataclass(frozen=True)
class Preprocessing:
    """What the network sees: the scan reoriented and resampled onto ``spatial_size`` voxels of ``pixdim`` mm.

    The input is defined in physical space (a voxel size and a field of view of ``pixdim *
    spatial_size`` mm centred on the scan's), not by a voxel count, so the same anatomy scanned
    on another grid reaches the network as nearly the same tensor. :class:`ResampleToFieldOfViewd` resamples
    with trilinear interpolation and no anti-aliasing blur: the phantoms are point-sampled at their
    voxel centres, and a blur before downsampling moved finer grids further from the native tensor
    (0.050 vs 0.046 mean |difference| in z units at 128 x 128 x 32), so none is added.

    Args:
        pixdim: voxel size of the network input in mm (x, y, z after reorientation).
        spatial_size: grid of the network input in voxels.
        axcodes: orientation of the network input (``"RAS"``).
        intensity: one of :data:`INTENSITY_NORMALIZATIONS`.
        landmarks: ``histogram``'s standard scale, one value per :data:`HISTOGRAM_PERCENTILES`
            (:func:`fit_landmarks` on the training part); ``()`` for the others.
        bias_field_degree: before the normalisation, divide out a smooth bias field, a polynomial of this total
            degree in the field of view (:func:`correct_bias_field`); 0: none (the ``bias_field_correction`` key).

    Example:
        >>> Preprocessing(pixdim=(2.5, 3.0, 8.0), spatial_size=(64, 64, 16)).field_of_view_mm
        (160.0, 192.0, 128.0)
    """

    pixdim: tuple[float, float, float] = (2.5, 3.0, 8.0)
    spatial_size: tuple[int, int, int] = (64, 64, 16)
    axcodes: str = "RAS"
    intensity: str = "zscore"
    landmarks: tuple[float, ...] = ()
    bias_field_degree: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "pixdim", tuple(float(v) for v in self.pixdim))
        object.__setattr__(self, "spatial_size", tuple(int(v) for v in self.spatial_size))
        object.__setattr__(self, "landmarks", tuple(float(v) for v in self.landmarks or ()))
        if len(self.pixdim) != 3 or any(not v > 0 for v in self.pixdim):
            raise ConfigError(f"pixdim needs 3 positive voxel sizes in mm, got {list(self.pixdim)}")
        if len(self.spatial_size) != 3 or any(v < 1 for v in self.spatial_size):
            raise ConfigError(f"spatial_size needs 3 positive voxel counts, got {list(self.spatial_size)}")
        if isinstance(self.bias_field_degree, bool) or self.bias_field_degree not in range(MAX_BIAS_FIELD_DEGREE + 1):
            raise ConfigError(f"bias_field_correction must be a polynomial degree from 0 (none) to {MAX_BIAS_FIELD_DEGREE}, "
                              f"got {self.bias_field_degree!r}")
        object.__setattr__(self, "bias_field_degree", int(self.bias_field_degree))  # 2.0 from a config: the basis needs an int
        if self.intensity not in INTENSITY_NORMALIZATIONS:
            raise ConfigError(f"intensity normalisation must be one of {INTENSITY_NORMALIZATIONS}, got {self.intensity!r}")
        if self.intensity == "histogram" and (len(self.landmarks) != len(HISTOGRAM_PERCENTILES)
                                              or any(b <= a for a, b in zip(self.landmarks, self.landmarks[1:]))):
            raise ConfigError(f"intensity normalisation 'histogram' needs {len(HISTOGRAM_PERCENTILES)} increasing landmarks "
                              f"fitted on the training part (monai_mtl.transforms.fit_landmarks), got {list(self.landmarks)}")

    @property
    def field_of_view_mm(self) -> tuple[float, float, float]:
        return tuple(float(p * n) for p, n in zip(self.pixdim, self.spatial_size))

    def to_dict(self) -> dict:
        """JSON-friendly form (lists), as stored in checkpoints."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, values: Mapping) -> Preprocessing:
        return cls(**dict(values))

    def normalization(self, keys: KeysCollection = "image") -> list:
        """The intensity normalisation (after the bias-field correction, if any): MONAI's transforms on ``keys`` (the
        data loader's; :meth:`normalize_batch` computes the same on a batch)."""
        chain = [BiasFieldCorrectiond(keys=keys, degree=self.bias_field_degree)] if self.bias_field_degree else []
        if self.intensity == "histogram":
            return chain + [HistogramStandardized(keys=keys, landmarks=self.landmarks)]
        chain.append(NormalizeIntensityd(keys=keys))
        return chain + [ScaleIntensityd(keys=keys, minv=0.0, maxv=1.0)] if self.intensity == "zscore_minmax" else chain

    def normalize_batch(self, images: torch.Tensor) -> torch.Tensor:
        """:meth:`normalization` of each volume of a ``(B, C, ...)`` batch, vectorised.

        MONAI's formulas (``NormalizeIntensity``: the volume's mean and population std, a zero std taken as 1;
        ``ScaleIntensity``: min-max to [0, 1], a constant volume to 0) on the whole batch at once: its
        transforms applied volume by volume took 2.7 ms each. ``tests/test_augmentation.py`` checks that the
        result is the loader chain's.
        """
        images = correct_bias_field(images, self.bias_field_degree)
        if self.intensity == "histogram":
            return standardize_histogram(images, self.landmarks)
        flat = images.flatten(1).float()
        shape = (-1,) + (1,) * (images.ndim - 1)
        variance, mean = torch.var_mean(flat, dim=1, unbiased=False)
        std = variance.sqrt()
        out = (images - mean.view(shape)) / torch.where(std == 0, torch.ones_like(std), std).view(shape)
        if self.intensity == "zscore_minmax":
            low, high = out.flatten(1).min(dim=1).values.view(shape), out.flatten(1).max(dim=1).values.view(shape)
            spread = high - low
            out = torch.where(spread == 0, torch.zeros_like(out), (out - low) / torch.where(spread == 0, torch.ones_like(spread), spread))
        return out.to(images.dtype)

    def transforms(
        self, keys: KeysCollection = "image", check: bool = False, track_meta: bool = False,
        augmentation: Sequence = (), acquisition: Sequence = (), severity_key: str | None = None,
        normalize: bool = True,
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
            normalize: end with the intensity normalisation; ``False`` when the training step
                normalises the batch after augmenting it (:class:`TrainingAugmentation`).
        """
        chain = [LoadImaged(keys=keys, ensure_channel_first=True, image_only=True)]
        if check:
            chain.append(CheckImaged(keys=keys))
        chain += [
            EnsureTyped(keys=keys, dtype=torch.float32),
            *acquisition,
            Orientationd(keys=keys, axcodes=self.axcodes, labels=None),
            ResampleToFieldOfViewd(keys=keys, pixdim=self.pixdim, spatial_size=self.spatial_size),
            *augmentation,
            *(self.normalization(keys) if normalize else ()),
        ]
        chain.append(EnsureTyped(keys=keys, dtype=torch.float32, track_meta=track_meta))
        if severity_key is not None:
            chain.append(ScaleSeverityd(keys=severity_key))
        return chain


#: ``paper``: the paper's noise + intensity shift only (on the batch, :class:`BatchIntensityAugmentation`);
#: ``robust``: also the scanner artifacts of MONAI's transforms (:func:`augmentation_transforms`), drawn per
#: volume and computed on the batch (:class:`BatchScannerAugmentation`); see :class:`TrainingAugmentation`.
AUGMENTATION_PRESETS = ("paper", "robust")


def augmentation_transforms(preset: str = "paper", keys: KeysCollection = "image") -> list:
    """MONAI's per-volume random transforms of an augmentation preset, for the resampled grid before normalisation.

    ``robust`` draws, each with its own probability, what differs between scanners and sites: a smooth
    multiplicative bias field, a contrast (gamma) change, Gibbs ringing, Rician noise, a blur or a
    simulated lower resolution, and a small affine (rotation 3 degrees, scale 3%, shift 2 voxels).
    Training computes the same draws on the batch (:class:`BatchScannerAugmentation`, checked against
    these); per volume in the data loader they took about 8 ms a volume on one CPU core
    (``python benchmarks/run.py --only augmentation`` compares the two).
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


@functools.lru_cache(maxsize=8)
def _legendre_basis(shape: tuple[int, ...], degree: int) -> torch.Tensor:
    """``(terms, *shape)``: products ``P_i(x) P_j(y) P_k(z)`` with ``i + j + k <= degree`` on ``linspace(-1, 1)`` axes.

    The terms of MONAI's ``RandBiasField`` field (its ``_generate_random_field`` builds the same set, in the
    same order, through ``numpy.polynomial.legendre.leggrid3d``).
    """
    from numpy.polynomial import legendre

    axes = [np.linspace(-1.0, 1.0, n, dtype=np.float32) for n in shape]
    values = [[legendre.legval(axis, np.eye(degree + 1)[order]) for order in range(degree + 1)] for axis in axes]
    terms = [np.einsum("i,j,k->ijk", values[0][i], values[1][j], values[2][k])
             for i in range(degree + 1) for j in range(degree + 1 - i) for k in range(degree + 1 - i - j)]
    return torch.as_tensor(np.stack(terms), dtype=torch.float32)


#: how the ``robust`` preset's simulated lower resolution samples the coarser grid (MONAI ``RandSimulateLowResolution``'s
#: ``downsample_mode``): ``nearest``, MONAI's default, picks one voxel of the fine grid per coarse voxel, up to half a
#: fine voxel away from the coarse voxel's centre; ``area`` averages the fine voxels a coarse voxel covers, as a
#: scanner's voxel integrates the signal over its volume; ``trilinear`` samples at the coarse voxels' centres
DOWNSAMPLE_MODES = ("nearest", "area", "trilinear")


class BatchScannerAugmentation:
    """The ``robust`` preset's scanner artifacts, drawn per volume but computed on the whole batch at once.

    The same draws, probabilities and formulas as MONAI's per-volume transforms listed by
    :func:`augmentation_transforms` (``RandBiasField``, ``RandAdjustContrast``, ``RandGibbsNoise``,
    ``RandRicianNoise``, ``RandGaussianSmooth``, ``RandSimulateLowResolution``, ``RandAffine``, in that
    order; then, when their probabilities are set, motion ghosting and a left-right mirror, which MONAI's
    chain does not have), applied to the collated ``(B, 1, X, Y, Z)`` batch before intensity normalisation. MONAI's run
    per volume in the single data-loader process, where they took about 8 ms a volume and, on 2 CPU
    cores, most of a training epoch; on the batch the bias field is one matrix product over a cached
    polynomial basis, Gibbs ringing one batched FFT, the affine one ``grid_sample``. The affine
    matrices are MONAI's own (``create_rotate`` / ``create_translate`` / ``create_scale``), and the
    blur its kernels (``gaussian_1d``) in one grouped convolution; ``tests/test_augmentation.py``
    checks each artifact against MONAI's transform at the same parameters. Random numbers come from torch's global generator, like
    :class:`BatchIntensityAugmentation`'s.
    """

    def __init__(
        self,
        bias_prob: float = 0.3, bias_degree: int = 3, bias_coeff: tuple[float, float] = (0.0, 0.1),
        contrast_prob: float = 0.3, gamma: tuple[float, float] = (0.8, 1.25),
        gibbs_prob: float = 0.2, gibbs_alpha: tuple[float, float] = (0.0, 0.4),
        rician_prob: float = 0.2, rician_std: float = 0.1,
        smooth_prob: float = 0.2, sigma: Sequence[tuple[float, float]] = ((0.25, 0.8), (0.25, 0.8), (0.1, 0.4)),
        low_resolution_prob: float = 0.2, zoom: tuple[float, float] = (0.5, 0.9),
        downsample_mode: str | Sequence[str] = "nearest",
        affine_prob: float = 0.15, rotate: float = np.pi / 60, scale: float = 0.03,
        translate: tuple[float, float, float] = (2.0, 2.0, 1.0),
        ghost_prob: float = 0.0, ghost_strength: tuple[float, float] = (0.0, 0.3),
        ghost_period: tuple[int, int] = (3, 8), ghost_axes: Sequence[int] = (0, 1),
        flip_prob: float = 0.0,
    ) -> None:
        self.bias_prob, self.bias_degree, self.bias_coeff = bias_prob, bias_degree, bias_coeff
        self.contrast_prob, self.gamma = contrast_prob, gamma
        self.gibbs_prob, self.gibbs_alpha = gibbs_prob, gibbs_alpha
        self.rician_prob, self.rician_std = rician_prob, rician_std
        self.smooth_prob, self.sigma = smooth_prob, tuple(sigma)
        self.low_resolution_prob, self.zoom = low_resolution_prob, zoom
        # one mode, or several drawn uniformly per simulated scan (a scanner's point-spread lies between them)
        modes = [downsample_mode] if isinstance(downsample_mode, str) else list(downsample_mode)
        if not modes or any(mode not in DOWNSAMPLE_MODES for mode in modes):
            raise ConfigError(f"scanner_augmentation downsample_mode must be one of {DOWNSAMPLE_MODES} or a list of them, "
                              f"got {downsample_mode!r}")
        self.downsample_mode = modes[0] if len(modes) == 1 else tuple(modes)
        self.affine_prob, self.rotate, self.scale, self.translate = affine_prob, rotate, scale, tuple(translate)
        self.ghost_prob, self.ghost_strength = ghost_prob, tuple(ghost_strength)
        self.ghost_period, self.ghost_axes = tuple(int(p) for p in ghost_period), tuple(int(a) for a in ghost_axes)
        if not 2 <= self.ghost_period[0] <= self.ghost_period[1]:
            raise ConfigError(f"scanner_augmentation ghost_period must be a range (low, high) of whole numbers >= 2, "
                              f"got {list(ghost_period)}")
        if not self.ghost_axes or any(a not in (0, 1, 2) for a in self.ghost_axes):
            raise ConfigError(f"scanner_augmentation ghost_axes must list spatial axes 0, 1 or 2, got {list(ghost_axes)}")
        if not 0.0 <= flip_prob <= 1.0:
            raise ConfigError(f"scanner_augmentation flip_prob must be a probability in [0, 1], got {flip_prob!r}")
        self.flip_prob = float(flip_prob)

    @classmethod
    def default_settings(cls) -> dict:
        """The keyword arguments' defaults as JSON values (ranges as lists): MONAI's transforms of
        :func:`augmentation_transforms`, no ghosting; what ``scanner_augmentation`` meant before it existed."""
        import inspect

        defaults = {name: p.default for name, p in inspect.signature(cls).parameters.items()}
        return json.loads(json.dumps(defaults))

    @classmethod
    def from_settings(cls, settings: Mapping | None) -> BatchScannerAugmentation:
        """From the ``scanner_augmentation`` config key (keyword arguments; lists for ranges), an unknown name refused.

        Raises:
            ConfigError: ``scanner_augmentation has no setting 'bias_range' (known: affine_prob, ...)``.
        """
        known = cls.default_settings()
        unknown = sorted(set(settings or {}) - set(known))
        if unknown:
            raise ConfigError(f"scanner_augmentation has no setting {unknown[0]!r} (known: {', '.join(sorted(known))})")
        return cls(**{k: tuple(v) if isinstance(v, list) and k != "sigma" else v for k, v in (settings or {}).items()})

    @staticmethod
    def _uniform(n: int, low: float, high: float, like: torch.Tensor) -> torch.Tensor:
        return torch.empty(n, device=like.device, dtype=like.dtype).uniform_(low, high)

    @staticmethod
    def _chosen(images: torch.Tensor, prob: float) -> torch.Tensor:
        return torch.nonzero(torch.rand(images.shape[0]) < prob).flatten().to(images.device)

    def bias_basis(self, images: torch.Tensor) -> torch.Tensor:
        """``(terms, *grid)``: the bias field's polynomial basis on the batch's grid (made once per grid)."""
        return _legendre_basis(tuple(images.shape[2:]), self.bias_degree).to(images.device)

    def bias_field(self, images: torch.Tensor, coefficients: torch.Tensor) -> torch.Tensor:
        """``images * exp(field)``, ``field`` the Legendre basis weighted by ``coefficients`` ``(n, terms)``."""
        basis = self.bias_basis(images)
        field = (coefficients.to(basis.dtype) @ basis.flatten(1)).view(-1, 1, *images.shape[2:])
        return images * torch.exp(field).to(images.dtype)

    @staticmethod
    def contrast(images: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
        """MONAI ``AdjustContrast``: each volume min-max scaled, raised to its ``gamma``, scaled back."""
        flat = images.flatten(1)
        low = flat.min(dim=1).values.view(-1, *(1,) * (images.ndim - 1))
        spread = flat.max(dim=1).values.view_as(low) - low
        return ((images - low) / (spread + 1e-7)) ** gamma.view_as(low) * spread + low

    @staticmethod
    def gibbs(images: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
        """MONAI ``GibbsNoise``: k-space cut to a ball of radius ``(1 - alpha) * max(shape) / sqrt(2)`` voxels."""
        shape = images.shape[2:]
        dims = tuple(range(2, images.ndim))
        centre = [(n - 1) / 2 for n in shape]
        grids = torch.meshgrid(*(torch.arange(n, device=images.device, dtype=torch.float32) - c for n, c in zip(shape, centre)),
                               indexing="ij")
        distance = torch.sqrt(sum(g**2 for g in grids))
        radius = (1 - alpha.float()) * max(shape) * np.sqrt(2) / 2.0
        mask = distance[None, None] <= radius.view(-1, 1, *(1,) * len(shape))
        k = torch.fft.fftshift(torch.fft.fftn(images, dim=dims), dim=dims) * mask
        return torch.fft.ifftn(torch.fft.ifftshift(k, dim=dims), dim=dims).real.to(images.dtype)

    @staticmethod
    def rician(images: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
        """MONAI ``RicianNoise``: ``sqrt((x + n1)**2 + n2**2)``, ``n1``, ``n2`` Gaussian of each volume's ``std``."""
        std = std.view(-1, *(1,) * (images.ndim - 1))
        return torch.sqrt((images + torch.randn_like(images) * std) ** 2 + (torch.randn_like(images) * std) ** 2)

    @staticmethod
    def smooth(images: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
        """MONAI ``GaussianSmooth`` (``erf`` kernels truncated at 4 sigma, zero padding) of each volume by its
        ``sigmas`` ``(n, 3)``: one grouped convolution per axis for the whole batch."""
        from monai.networks.layers.convutils import gaussian_1d

        n, channels = images.shape[:2]
        out = images.reshape(1, n * channels, *images.shape[2:])
        for axis in range(3):
            kernels = [gaussian_1d(float(sigma), truncated=4.0, approx="erf") for sigma in sigmas[:, axis]]
            half = max(len(k) for k in kernels) // 2
            weight = torch.zeros(n, 2 * half + 1, dtype=out.dtype, device=out.device)
            for i, kernel in enumerate(kernels):  # centred in the longest kernel's support
                weight[i, half - len(kernel) // 2 : half + len(kernel) // 2 + 1] = kernel.to(out.dtype)
            shape = [1, 1, 1]
            shape[axis] = 2 * half + 1
            padding = [0, 0, 0]
            padding[axis] = half
            weight = weight.repeat_interleave(channels, dim=0).view(n * channels, 1, *shape)
            out = torch.nn.functional.conv3d(out, weight, padding=tuple(padding), groups=n * channels)
        return out.view_as(images)

    @staticmethod
    def low_resolution(image: torch.Tensor, zoom: float, downsample_mode: str = "nearest") -> torch.Tensor:
        """MONAI ``RandSimulateLowResolution`` of one ``(1, C, ...)`` volume: down to ``zoom`` by ``downsample_mode``
        (its ``downsample_mode``, ``align_corners=False`` where it applies), trilinear back up."""
        shape = image.shape[2:]
        align_corners = False if downsample_mode == "trilinear" else None
        small = torch.nn.functional.interpolate(image, size=tuple(max(1, int(np.round(s * zoom))) for s in shape),
                                                mode=downsample_mode, align_corners=align_corners)
        return torch.nn.functional.interpolate(small, size=tuple(shape), mode="trilinear", align_corners=False)

    @staticmethod
    def affine(images: torch.Tensor, matrices: torch.Tensor) -> torch.Tensor:
        """MONAI ``Affine`` (bilinear, zero padding) of each volume by its ``(4, 4)`` matrix in voxel units about the centre.

        MONAI samples the input at ``matrix @ c`` for each output voxel ``c`` (centred voxel coordinates);
        ``grid_sample`` takes the same points normalised to ``[-1, 1]`` (corner voxels' centres at +-1)
        and its axes last-first, hence the scaling and the axis reversal of ``theta``.
        """
        shape = images.shape[2:]
        half = torch.tensor([(n - 1) / 2 for n in shape], dtype=matrices.dtype, device=matrices.device)
        linear = matrices[:, :3, :3] * half.view(1, 1, 3) / half.view(1, 3, 1)
        shift = matrices[:, :3, 3] / half
        theta = torch.cat([linear.flip(1).flip(2), shift.flip(1).unsqueeze(2)], dim=2).to(images.dtype)
        # affine_grid's own points (align_corners=True), made once per grid: its generator cost 3x the sampling
        base = _normalised_grid(tuple(shape), images.device, images.dtype)
        grid = (base @ theta.transpose(1, 2).unsqueeze(1)).view(len(images), *shape, 3)
        return torch.nn.functional.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=True)

    @staticmethod
    def ghosting(image: torch.Tensor, strength: float, period: int, axis: int) -> torch.Tensor:
        """Motion ghosts in one ``(1, C, X, Y, Z)`` volume: every ``period``-th k-space line along spatial ``axis``
        keeps ``1 - strength`` of its amplitude, the magnitude image reconstructed.

        A periodic error between phase-encoding lines (breathing, pulsation) copies the object at shifts
        of FOV / ``period`` along that axis. MONAI has no such transform; this is TorchIO's
        ``RandomGhosting`` without its restored k-space centre, and the form of the generator's
        :func:`monai_mtl.artifacts.motion_ghosting`.
        """
        dims = tuple(range(2, image.ndim))
        spectrum = torch.fft.fftn(image, dim=dims)
        index = [slice(None)] * image.ndim
        index[2 + axis] = slice(0, None, period)
        spectrum[tuple(index)] *= 1.0 - strength
        return torch.fft.ifftn(spectrum, dim=dims).abs().to(image.dtype)

    def affine_matrices(self, n: int) -> torch.Tensor:
        """``(n, 4, 4)``: MONAI ``RandAffine``'s draws (rotation, translation in voxels, scale) and its matrix order."""
        from monai.transforms.utils import create_rotate, create_scale, create_translate

        matrices = []
        for _ in range(n):
            angles = (torch.rand(3) * 2 - 1) * self.rotate
            shift = (torch.rand(3) * 2 - 1) * torch.tensor(self.translate)
            factors = 1 + (torch.rand(3) * 2 - 1) * self.scale
            matrix = torch.as_tensor(create_rotate(3, angles.tolist()), dtype=torch.float64)
            matrix = matrix @ torch.as_tensor(create_translate(3, shift.tolist()), dtype=torch.float64)
            matrices.append(matrix @ torch.as_tensor(create_scale(3, factors.tolist()), dtype=torch.float64))
        return torch.stack(matrices).float()

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        images = images.clone()
        chosen = self._chosen(images, self.bias_prob)
        if len(chosen):
            terms = self.bias_basis(images).shape[0]  # MONAI's n_coeff, C(degree + 3, 3)
            coefficients = torch.empty(len(chosen), terms).uniform_(*self.bias_coeff).to(images.device)
            images[chosen] = self.bias_field(images[chosen], coefficients)
        chosen = self._chosen(images, self.contrast_prob)
        if len(chosen):
            images[chosen] = self.contrast(images[chosen], self._uniform(len(chosen), *self.gamma, images))
        chosen = self._chosen(images, self.gibbs_prob)
        if len(chosen):
            images[chosen] = self.gibbs(images[chosen], self._uniform(len(chosen), *self.gibbs_alpha, images))
        chosen = self._chosen(images, self.rician_prob)
        if len(chosen):
            spread = images[chosen].flatten(1).std(dim=1)  # relative=True: a fraction of each volume's std
            images[chosen] = self.rician(images[chosen], self._uniform(len(chosen), 0.0, self.rician_std, images) * spread)
        chosen = self._chosen(images, self.smooth_prob)
        if len(chosen):
            sigmas = torch.stack([torch.empty(len(chosen)).uniform_(low, high) for low, high in self.sigma], dim=1)
            images[chosen] = self.smooth(images[chosen], sigmas)
        for i in self._chosen(images, self.low_resolution_prob).tolist():
            zoom = float(torch.empty(1).uniform_(*self.zoom))
            mode = self.downsample_mode
            if not isinstance(mode, str):  # drawn only for a list, so one mode's draws stay as they were
                mode = mode[int(torch.randint(len(mode), (1,)))]
            images[i : i + 1] = self.low_resolution(images[i : i + 1], zoom, mode)
        chosen = self._chosen(images, self.affine_prob)
        if len(chosen):
            images[chosen] = self.affine(images[chosen], self.affine_matrices(len(chosen)).to(images.device))
        if self.ghost_prob > 0:  # drawn only when on, so the other artifacts' draws stay as they were without it
            for i in self._chosen(images, self.ghost_prob).tolist():
                strength = float(torch.empty(1).uniform_(*self.ghost_strength))
                period = int(torch.randint(self.ghost_period[0], self.ghost_period[1] + 1, (1,)))
                axis = self.ghost_axes[int(torch.randint(len(self.ghost_axes), (1,)))]
                images[i : i + 1] = self.ghosting(images[i : i + 1], strength, period, axis)
        if self.flip_prob > 0:  # drawn only when on, like the ghosts
            chosen = self._chosen(images, self.flip_prob)
            if len(chosen):
                images[chosen] = self.mirror(images[chosen])
        return images

    @staticmethod
    def mirror(images: torch.Tensor) -> torch.Tensor:
        """Left and right exchanged: each volume reversed along the first spatial axis, R-L on the network's RAS grid
        (MONAI ``Flip(spatial_axis=0)``), about the field of view's centre, which the preprocessing puts at the scan's.

        The brain is nearly symmetric, so a mirrored scan is another plausible subject with the same labels; SFCN
        (Peng et al. 2021, brain age) trains with mirroring for that reason. A trait on one side only would make it wrong.
        """
        return images.flip(2)


@functools.lru_cache(maxsize=8)
def _normalised_grid(shape: tuple[int, ...], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """``(1, voxels, 4)``: each voxel's ``(w, h, d, 1)`` in ``[-1, 1]`` (``affine_grid``'s, ``align_corners=True``)."""
    axes = [torch.linspace(-1.0, 1.0, n, device=device, dtype=dtype) for n in shape]
    d, h, w = torch.meshgrid(*axes, indexing="ij")
    return torch.stack([w, h, d, torch.ones_like(w)], dim=-1).view(1, -1, 4)


class TrainingAugmentation:
    """What the training step does to each image batch for an ``augmentation`` preset.

    ``paper``: the paper's noise and intensity shift (:class:`BatchIntensityAugmentation`) on the batch the
    data loader normalised. ``robust``: first the scanner artifacts (:class:`BatchScannerAugmentation`)
    on the batch as resampled, then the preprocessing's intensity normalisation of each volume
    (:meth:`Preprocessing.normalize_batch`, the same MONAI transforms as the loader's), then the same
    noise and shift: the order of the per-volume chain, whose artifacts act before normalisation,
    where a scanner makes them. :attr:`normalizes` tells the training chain to leave normalisation out.

    Example:
        >>> augment = TrainingAugmentation("robust", Preprocessing())
        >>> augment.normalizes, TrainingAugmentation("paper", Preprocessing()).normalizes
        (True, False)
    """

    def __init__(self, preset: str, preprocessing: Preprocessing, noise_std: float = 0.01, shift: float = 0.05,
                 scanner: Mapping | None = None) -> None:
        if preset not in AUGMENTATION_PRESETS:
            raise ConfigError(f"augmentation must be one of {AUGMENTATION_PRESETS}, got {preset!r}")
        self.preset, self.preprocessing = preset, preprocessing
        # ``scanner``: the ``scanner_augmentation`` config key, BatchScannerAugmentation's ranges and probabilities
        self.scanner = BatchScannerAugmentation.from_settings(scanner) if preset == "robust" else None
        self.intensity = BatchIntensityAugmentation(noise_std, shift)

    @property
    def normalizes(self) -> bool:
        """Whether the batch arrives un-normalised (the training chain must then end before the normalisation)."""
        return self.scanner is not None

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if self.scanner is not None:
            images = self.preprocessing.normalize_batch(self.scanner(images))
        return self.intensity(images)

    def clean(self, images: torch.Tensor) -> torch.Tensor:
        """The batch without any draw, as validation sees its scans: only the normalisation the data loader left out."""
        return self.preprocessing.normalize_batch(images) if self.normalizes else images


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
