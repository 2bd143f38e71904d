"""Synthetic brain-MRI cohort: an analytic T1-like phantom with severity- and class-linked anatomy.

Each subject is rendered analytically (no resampling of a template image): every voxel centre of the
subject's grid is mapped into template space through the subject's nuisance deformation (a smooth
random displacement field followed by a small random affine), and the soft region memberships of the
phantom are evaluated there. Soft (partial-volume) edges make volume changes show continuously rather
than in whole voxels. Every subject draws from its own random stream, seeded by ``(seed, index)``, so
the cohort does not depend on the number of worker processes or on how many subjects are generated.

Severity effects (``s = severity / 100``), as the paper describes, on the prefrontal cortex and hippocampi:

* hippocampal volume ``V = V0 * (1 - hippocampus_volume_loss * s)``, the lost tissue becoming CSF;
* hippocampal intensity ``I = I0 * (1 - hippocampus_intensity_loss * s)``;
* prefrontal cortical thickness ``T = T0 * (1 - pfc_thickness_loss * s)``, replaced by CSF from outside;
* prefrontal grey-matter intensity ``I = I0 * (1 - pfc_intensity_loss * s)``.

With clinical covariates (``generate --covariates``) ageing adds to ``s`` the atrophy of
``age_atrophy_per_year`` severity points a year above 18 (:mod:`monai_mtl.clinical`); the label stays the disease's.

Class signature (an assumption beyond the paper, which calls the groups distinct): the caudate nuclei
have a class-specific intensity (``caudate_intensity``), independent of severity.
"""

from __future__ import annotations

import functools
import json
import logging
import multiprocessing
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from monai_mtl import RESPONSE_NAMES, SEVERITY_SCALE, __version__
from monai_mtl.io import nifti_image

logger = logging.getLogger(__name__)

#: Labels of ``atlas.nii.gz`` (template anatomy, severity 0, no nuisance deformation). Left is -x (RAS).
ATLAS_LABELS: dict[int, str] = {
    0: "background",
    1: "csf",
    2: "cortical_grey_matter",
    3: "white_matter",
    4: "lateral_ventricles",
    5: "prefrontal_cortex",
    6: "left_hippocampus",
    7: "right_hippocampus",
    8: "left_caudate",
    9: "right_caudate",
}

LABELS_CSV = "labels.csv"
COHORT_JSON = "cohort.json"
ATLAS_FILE = "atlas.nii.gz"
IMAGES_DIR = "images"


@dataclass(frozen=True)
class CohortConfig:
    """Every parameter of the synthetic cohort; the defaults follow the paper's protocol.

    Class-indexed tuples are ordered as :data:`monai_mtl.RESPONSE_NAMES` (non, partial, responder).
    Lengths are in mm, intensities on the phantom's [0, 1] T1-like scale.
    """

    num_samples: int = 1500
    seed: int = 42
    shape: tuple[int, int, int] = (64, 64, 16)
    #: voxel size (x: left-right, y: posterior-anterior, z: inferior-superior); FOV 160 x 192 x 128 mm.
    spacing_mm: tuple[float, float, float] = (2.5, 3.0, 8.0)
    class_proportions: tuple[float, float, float] = (0.26, 0.50, 0.24)
    #: ``[low, high)`` severity range per class on 0-100; non-responders are the most severe.
    severity_ranges: tuple[tuple[float, float], ...] = ((65.0, 100.0), (35.0, 65.0), (0.0, 35.0))
    # --- severity effects (fraction lost at severity 100, linear in severity) ---
    hippocampus_volume_loss: float = 0.50
    hippocampus_intensity_loss: float = 0.45
    pfc_thickness_loss: float = 0.60
    pfc_intensity_loss: float = 0.35
    # --- class signature ---
    caudate_intensity: tuple[float, float, float] = (0.45, 0.60, 0.75)
    # --- tissue intensities ---
    csf_intensity: float = 0.12
    grey_matter_intensity: float = 0.55
    white_matter_intensity: float = 0.85
    hippocampus_intensity: float = 0.62
    cortical_thickness_mm: float = 7.0
    #: relative amplitude of the gyral folding of the grey/white boundary
    folding: float = 0.5
    csf_thickness_mm: float = 3.0
    edge_mm: float = 1.2
    # --- nuisance ---
    rotation_deg: float = 3.0
    scale_range: float = 0.03
    translation_mm: float = 2.0
    ventricle_scale_std: float = 0.08
    warp_std_mm: float = 1.0
    warp_smoothness_mm: float = 15.0
    noise_std: float = 0.01
    intensity_shift: float = 0.05
    #: severity points of age-related atrophy a year of ``age`` above 18 (:mod:`monai_mtl.clinical`): the scan shows
    #: ``severity + age_atrophy_per_year * (age - 18)``. Needs the covariates (the age); ``None``: 0.2 with them, 0 without
    age_atrophy_per_year: float | None = None

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first invalid parameter."""
        n_classes = len(RESPONSE_NAMES)
        if self.num_samples < n_classes:
            raise ValueError(f"num_samples must be at least {n_classes} (one per class), got {self.num_samples}")
        if len(self.class_proportions) != n_classes or any(p <= 0 for p in self.class_proportions):
            raise ValueError(f"class_proportions needs {n_classes} positive values, got {list(self.class_proportions)}")
        if not np.isclose(sum(self.class_proportions), 1.0, atol=1e-6):
            raise ValueError(
                f"class_proportions must sum to 1, got {list(self.class_proportions)} "
                f"(sum {sum(self.class_proportions):.6g})"
            )
        if len(self.severity_ranges) != n_classes:
            raise ValueError(f"severity_ranges needs {n_classes} [low, high) pairs, got {len(self.severity_ranges)}")
        for name, (low, high) in zip(RESPONSE_NAMES, self.severity_ranges):
            if not 0.0 <= low < high <= SEVERITY_SCALE:
                raise ValueError(
                    f"severity range of {name} must satisfy 0 <= low < high <= {SEVERITY_SCALE:g}, got [{low}, {high})"
                )
        ordered = sorted(self.severity_ranges)
        for (low_a, high_a), (low_b, high_b) in zip(ordered, ordered[1:]):
            if low_b < high_a:
                raise ValueError(f"severity ranges overlap: [{low_a}, {high_a}) and [{low_b}, {high_b})")
        if len(self.shape) != 3 or any(n < 8 for n in self.shape):
            raise ValueError(f"shape needs 3 sizes of at least 8 voxels, got {list(self.shape)}")
        if len(self.spacing_mm) != 3 or any(s <= 0 for s in self.spacing_mm):
            raise ValueError(f"spacing_mm needs 3 positive values, got {list(self.spacing_mm)}")
        for name in ("hippocampus_volume_loss", "hippocampus_intensity_loss", "pfc_thickness_loss", "pfc_intensity_loss"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.noise_std < 0 or not 0 <= self.intensity_shift < 1:
            raise ValueError("noise_std must be >= 0 and intensity_shift in [0, 1)")
        if self.age_atrophy_per_year is not None:
            from monai_mtl.clinical import MAX_AGE, age_atrophy

            # the oldest subject's most severe anatomy must still be a loss below 100% of every structure
            most = 1.0 + age_atrophy(MAX_AGE, self.age_atrophy_per_year) / SEVERITY_SCALE
            if self.age_atrophy_per_year < 0 or max(self.hippocampus_volume_loss, self.hippocampus_intensity_loss,
                                                    self.pfc_thickness_loss, self.pfc_intensity_loss) * most >= 1.0:
                raise ValueError(f"age_atrophy_per_year must be >= 0 and keep every severity effect below a 100% loss at "
                                 f"age {MAX_AGE}, got {self.age_atrophy_per_year}")

    @property
    def affine(self) -> np.ndarray:
        """RAS voxel-to-world affine in mm with the grid centred on the origin."""
        spacing = np.asarray(self.spacing_mm, dtype=np.float64)
        affine = np.diag([*spacing, 1.0])
        affine[:3, 3] = -spacing * (np.asarray(self.shape) - 1) / 2.0
        return affine


@dataclass(frozen=True)
class Subject:
    """One subject's labels and nuisance draws."""

    index: int
    response: int
    severity: float
    rotation_rad: np.ndarray = field(repr=False)
    scale: np.ndarray = field(repr=False)
    translation_mm: np.ndarray = field(repr=False)
    ventricle_scale: float = 1.0

    @property
    def subject_id(self) -> str:
        return subject_id(self.index)


def subject_id(index: int) -> str:
    """The id of subject ``index``; fixed width so that the first N subjects never change name."""
    return f"sub-{index:05d}"


def _subject_rng(seed: int, index: int) -> np.random.Generator:
    # One independent stream per subject: the cohort is the same whatever the worker count or N.
    return np.random.default_rng(np.random.SeedSequence([seed, index]))


# Site draws come from streams of their own (tagged), so adding sites never changes a subject's own draws.
_SITE_STREAM = 0x517E


@dataclass(frozen=True)
class SiteAcquisition:
    """One site's scanner, drawn once per site: its grid, slab thickness, bias field, contrast, noise and artifact.

    The field of view is the cohort's; the voxel size differs. Each slice integrates the anatomy over
    ``slice_thickness_mm`` (not just another sampling grid). Then, in this order: the bias field
    (``exp`` of a degree-2 polynomial with ``bias_coefficients`` over the field of view), the contrast
    change ``I ** gamma``, Rician noise of ``rician_std``, and the artifact (``none``, ``motion``
    ghosting or ``gibbs`` ringing, see :mod:`monai_mtl.artifacts`) at ``artifact_strength``.
    """

    site: int
    shape: tuple[int, int, int]
    spacing_mm: tuple[float, float, float]
    slice_thickness_mm: float
    bias_coefficients: tuple[float, ...]
    gamma: float
    rician_std: float
    artifact: str
    artifact_strength: float


def draw_sites(config: CohortConfig, num_sites: int) -> list[SiteAcquisition]:
    """The acquisitions of ``num_sites`` sites (site ``k`` from its own stream of ``config.seed``).

    In-plane voxel size 0.8-1.25x and slice spacing 0.75-1.5x the cohort's, slabs 1.0-1.3x the slice
    spacing thick, bias-field coefficients with a standard deviation of 0.05-0.2, gamma 0.8-1.25,
    Rician noise 0.01-0.04, and one of no artifact, motion ghosting (0.05-0.2) or Gibbs ringing (0.1-0.35).
    """
    if num_sites < 1:
        raise ValueError(f"sites must be at least 1, got {num_sites}")
    fov = np.asarray(config.shape) * np.asarray(config.spacing_mm)
    sites = []
    for k in range(num_sites):
        rng = np.random.default_rng(np.random.SeedSequence([config.seed, _SITE_STREAM, k]))
        in_plane, through_plane = rng.uniform(0.8, 1.25), rng.uniform(0.75, 1.5)
        wanted = np.asarray(config.spacing_mm) * [in_plane, in_plane, through_plane]
        shape = np.maximum(np.round(fov / wanted).astype(int), 8)
        spacing = fov / shape  # the exact field of view of the cohort
        artifact = str(rng.choice(["none", "motion", "gibbs"]))
        strength = {"none": 0.0, "motion": rng.uniform(0.05, 0.2), "gibbs": rng.uniform(0.1, 0.35)}[artifact]
        sites.append(SiteAcquisition(
            site=k,
            shape=tuple(int(n) for n in shape),
            spacing_mm=tuple(float(v) for v in spacing),
            slice_thickness_mm=float(spacing[2] * rng.uniform(1.0, 1.3)),
            bias_coefficients=tuple(float(c) for c in rng.normal(0.0, rng.uniform(0.05, 0.2), 9)),
            gamma=float(np.exp(rng.uniform(np.log(0.8), np.log(1.25)))),
            rician_std=float(rng.uniform(0.01, 0.04)),
            artifact=artifact,
            artifact_strength=float(strength),
        ))
    return sites


def site_of(seed: int, index: int, num_sites: int) -> int:
    """The site of subject ``index``: uniform, from a stream of its own, independent of class and severity."""
    return int(np.random.default_rng(np.random.SeedSequence([seed, index, _SITE_STREAM])).integers(num_sites))


def draw_subject(config: CohortConfig, index: int, rng: np.random.Generator | None = None) -> Subject:
    """Draw the class, severity and affine nuisance of subject ``index`` (its first draws from its stream)."""
    rng = _subject_rng(config.seed, index) if rng is None else rng
    response = int(rng.choice(len(RESPONSE_NAMES), p=np.asarray(config.class_proportions) / sum(config.class_proportions)))
    low, high = config.severity_ranges[response]
    # floor to 0.01 so the value written to the CSV is exactly the one rendered, and stays below `high`
    severity = float(np.floor(rng.uniform(low, high) * 100.0) / 100.0)
    return Subject(
        index=index,
        response=response,
        severity=max(severity, low),
        rotation_rad=np.deg2rad(rng.uniform(-config.rotation_deg, config.rotation_deg, size=3)),
        scale=1.0 + rng.uniform(-config.scale_range, config.scale_range, size=3),
        translation_mm=rng.uniform(-config.translation_mm, config.translation_mm, size=3),
        ventricle_scale=float(1.0 + config.ventricle_scale_std * rng.standard_normal()),
    )


def _rotation_matrix(angles: np.ndarray) -> np.ndarray:
    ax, ay, az = angles
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


@functools.lru_cache(maxsize=8)
def _lowpass_basis(n: int, sigma_vox: float) -> np.ndarray:
    """Fourier basis of the frequencies a Gaussian low-pass of ``sigma_vox`` keeps (gain > 1e-3), weighted by it.

    Shape ``(n, k)``, complex: column ``j`` is ``gain_j * exp(2 pi i f_j x)``.
    """
    freqs = np.fft.fftfreq(n)
    gain = np.exp(-2.0 * np.pi**2 * (freqs * sigma_vox) ** 2)
    keep = gain > 1e-3
    return np.exp(2j * np.pi * np.outer(np.arange(n), freqs[keep])) * gain[keep]


def _smooth_random_field(
    rng: np.random.Generator, shape: Sequence[int], spacing: Sequence[float], sigma_mm: float, std_mm: float
) -> np.ndarray:
    """Three components of a stationary Gaussian random displacement field, shape ``(3, *shape)``, in mm.

    White noise is drawn in Fourier space, low-passed with a separable Gaussian, and only the few
    frequencies the low-pass keeps are synthesised (three small matrix products instead of full FFTs,
    which were 5x slower here).
    """
    bases = [_lowpass_basis(n, sigma_mm / s) for n, s in zip(shape, spacing)]
    coeff_shape = (3, *(b.shape[1] for b in bases))
    coeffs = rng.standard_normal(coeff_shape) + 1j * rng.standard_normal(coeff_shape)
    field_ = coeffs @ bases[2].T  # (3, kx, ky, z)
    field_ = np.swapaxes(np.swapaxes(field_, 2, 3) @ bases[1].T, 2, 3)  # (3, kx, y, z)
    field_ = np.tensordot(bases[0], field_, axes=([1], [1])).real.transpose(1, 0, 2, 3)  # (3, x, y, z)
    field_ *= std_mm / max(float(field_.std()), 1e-12)
    return field_


def warp_covariance_factors(shape: Sequence[int], spacing: Sequence[float], sigma_mm: float) -> list[np.ndarray]:
    """Per axis a real factor ``U`` (``n x r``) of the smooth deformation's spatial correlation: ``U @ U.T``.

    :func:`_smooth_random_field` draws each component as a Gaussian field whose covariance between two
    voxels is the product over the axes of ``Re(B B^H)`` (``B`` the axis' :func:`_lowpass_basis`), scaled to
    ``std_mm**2`` at zero distance: a component is ``std_mm * (U_x kron U_y kron U_z) z`` with ``z`` standard
    normal. ``r`` is the number of frequencies the low-pass keeps, whatever the voxel count.
    """
    factors = []
    for n, s in zip(shape, spacing):
        basis = _lowpass_basis(int(n), sigma_mm / s)
        correlation = (basis @ basis.conj().T).real
        eigenvalues, eigenvectors = np.linalg.eigh(correlation / correlation[0, 0])
        keep = eigenvalues > 1e-9 * eigenvalues.max()
        factors.append(eigenvectors[:, keep] * np.sqrt(eigenvalues[keep]))
    return factors


@functools.lru_cache(maxsize=4)
def _grid_world(shape: tuple[int, int, int], affine_key: tuple[float, ...]) -> np.ndarray:
    """World coordinates (mm) of every voxel centre, shape ``(3, *shape)`` (cached: the grid is shared)."""
    affine = np.asarray(affine_key).reshape(4, 4)
    ijk = np.indices(shape, dtype=np.float64)
    world = np.einsum("ab,b...->a...", affine[:3, :3], ijk) + affine[:3, 3].reshape(3, 1, 1, 1)
    world.flags.writeable = False
    return world


def grid_world(config: CohortConfig) -> np.ndarray:
    """World coordinates (mm) of the voxel centres of ``config``'s grid, shape ``(3, *shape)``."""
    return _grid_world(tuple(config.shape), tuple(config.affine.ravel()))


def _region_box(config: CohortConfig, center: Sequence[float], semi_axes: Sequence[float]) -> tuple[slice, ...]:
    """Voxel slices of ``config``'s grid that can hold a structure, whatever a subject's nuisance deformation.

    Small structures are evaluated in this box only (about 8x fewer voxels than the whole grid).
    """
    affine = config.affine
    low = np.asarray(center) - np.asarray(semi_axes) - _NUISANCE_MARGIN_MM
    high = np.asarray(center) + np.asarray(semi_axes) + _NUISANCE_MARGIN_MM
    start = np.floor((low - affine[:3, 3]) / np.diag(affine)[:3]).astype(int)
    stop = np.ceil((high - affine[:3, 3]) / np.diag(affine)[:3]).astype(int) + 1
    return tuple(slice(max(0, a), min(n, b)) for a, b, n in zip(start, stop, config.shape))


def _ellipsoid_depth(q: np.ndarray, center: Sequence[float], semi_axes: Sequence[float]) -> np.ndarray:
    """Approximate signed depth (mm, positive inside) of points ``q`` in an axis-aligned ellipsoid.

    Distance to the surface along the ray from the centre: ``|p| / rho - |p|``, with ``rho`` the
    ellipsoidal radius; exact for a sphere, close enough for a smooth phantom.
    """
    p = q - np.asarray(center, dtype=q.dtype).reshape(3, *([1] * (q.ndim - 1)))
    a = np.asarray(semi_axes, dtype=q.dtype).reshape(3, *([1] * (q.ndim - 1)))
    rho = np.sqrt(((p / a) ** 2).sum(axis=0))
    radius = np.sqrt((p**2).sum(axis=0))
    to_surface = np.where(rho > 1e-9, radius / np.maximum(rho, 1e-9), float(np.min(semi_axes)))
    return to_surface - radius


def _soft(depth: np.ndarray, edge_mm: float) -> np.ndarray:
    # logistic partial-volume edge; np.tanh form avoids overflow warnings of exp
    return 0.5 * (1.0 + np.tanh(depth / (2.0 * edge_mm)))


# Template anatomy (RAS mm, brain centred at the origin).
_BRAIN = ((0.0, 0.0, 0.0), (66.0, 84.0, 56.0))
_VENTRICLES = (((-9.0, 2.0, 10.0), (5.0, 24.0, 9.0)), ((9.0, 2.0, 10.0), (5.0, 24.0, 9.0)))
_CAUDATES = (((-15.0, 14.0, 6.0), (5.0, 10.0, 8.0)), ((15.0, 14.0, 6.0), (5.0, 10.0, 8.0)))
_HIPPOCAMPI = (((-27.0, -18.0, -18.0), (7.0, 17.0, 8.0)), ((27.0, -18.0, -18.0), (7.0, 17.0, 8.0)))
_PFC_START_Y_MM = 38.0
# Largest template shift of a voxel under the nuisance deformation (rotation, scale, translation, warp)
# plus the soft edge's tail, with room to spare.
_NUISANCE_MARGIN_MM = 30.0


def render_layers(
    config: CohortConfig,
    q: np.ndarray,
    response: int,
    severity: float,
    ventricle_scale: float = 1.0,
    box_regions: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Soft region weights (summing to 1 per voxel) and their intensities at template points ``q``.

    Returns ``(weights, intensities)``, each of shape ``(len(ATLAS_LABELS), *q.shape[1:])``, indexed
    by atlas label. The image is ``(weights * intensities).sum(0)``, the atlas ``weights.argmax(0)``.
    ``q`` lies on ``config``'s grid; with ``box_regions`` small structures are only evaluated near
    their template position (``q`` must then be the grid's world coordinates up to the nuisance deformation).
    """
    s = severity / SEVERITY_SCALE
    edge = config.edge_mm
    spatial = q.shape[1:]
    weights = np.zeros((len(ATLAS_LABELS), *spatial), dtype=np.float32)
    values = np.zeros((len(ATLAS_LABELS), 1, 1, 1), dtype=np.float32)

    brain_depth = _ellipsoid_depth(q, *_BRAIN)
    pfc_weight = _soft(q[1] - _PFC_START_Y_MM, 4.0)
    lost_cortex = config.pfc_thickness_loss * s * config.cortical_thickness_mm * pfc_weight
    in_brain = _soft(brain_depth, edge)
    in_tissue = _soft(brain_depth - config.csf_thickness_mm - lost_cortex, edge)
    # gyri: the grey/white boundary undulates in template space, so folds move with the subject's deformation
    folds = 1.0 + config.folding * np.sin(q[0] / 5.0) * np.sin(q[1] / 6.0) * np.cos(q[2] / 9.0)
    in_white = _soft(brain_depth - config.csf_thickness_mm - config.cortical_thickness_mm * folds, edge)
    grey = np.clip(in_tissue - in_white, 0.0, 1.0)

    weights[0], weights[1] = 1.0 - in_brain, np.clip(in_brain - in_tissue, 0.0, 1.0)
    weights[2], weights[5] = grey * (1.0 - pfc_weight), grey * pfc_weight
    weights[3] = in_white
    values[1], values[2], values[3] = config.csf_intensity, config.grey_matter_intensity, config.white_matter_intensity
    values[5] = config.grey_matter_intensity * (1.0 - config.pfc_intensity_loss * s)

    def paint(label: int, center: Sequence[float], axes: Sequence[float], value: float) -> None:
        box = (slice(None), *_region_box(config, center, axes)) if box_regions else (slice(None),)
        membership = _soft(_ellipsoid_depth(q[box], center, axes), edge)
        weights[box] *= 1.0 - membership
        weights[(label, *box[1:])] += membership
        values[label] = value

    for center, axes in _VENTRICLES:
        paint(4, center, np.asarray(axes) * ventricle_scale, config.csf_intensity)
    for label, (center, axes) in zip((8, 9), _CAUDATES):
        paint(label, center, axes, config.caudate_intensity[response])
    shrink = (1.0 - config.hippocampus_volume_loss * s) ** (1.0 / 3.0)
    hippo_value = config.hippocampus_intensity * (1.0 - config.hippocampus_intensity_loss * s)
    for label, (center, axes) in zip((6, 7), _HIPPOCAMPI):
        # the healthy hippocampus' space fills with CSF (enlarged temporal horn), then the atrophied one is painted
        paint(1, center, axes, config.csf_intensity)
        paint(label, center, np.asarray(axes) * shrink, hippo_value)
    return weights, values


#: sub-slices per mm of slab thickness when a site's slices integrate the anatomy (about the soft edge's width)
_SLAB_SAMPLES_PER_MM = 1.0 / 1.5


def _subject_anatomy(
    config: CohortConfig, index: int, grid: CohortConfig
) -> tuple[np.random.Generator, Subject, Callable[..., np.ndarray]]:
    """Subject ``index``'s stream after its anatomy draws, its labels, and its noise-free render.

    The render ``(severity, dz) -> image`` on ``grid`` uses the subject's own nuisance (rotation, scale,
    translation, ventricle size, smooth deformation, and the age's atrophy where ``config`` has one) at any
    severity, shifted by ``dz`` mm along z (a sub-slice of a slab). The stream then continues with the noise draws.
    Keywords replace one part of the nuisance (``rotation_rad``, ``scale``, ``translation_mm``, ``ventricle_scale``,
    ``warp_mm``: the smooth deformation, ``(3, *grid.shape)`` mm) or add ``warp_offset_mm`` (3,) to the deformation of
    every voxel: :mod:`monai_mtl.floor` differentiates the image by each to find what an observer who does not know
    them can still tell of the severity.
    """
    rng = _subject_rng(config.seed, index)
    subject = draw_subject(config, index, rng)
    ageing = 0.0  # severity points of age-related atrophy, drawn from the covariates' own stream
    if config.age_atrophy_per_year:
        from monai_mtl.clinical import age_atrophy, subject_age

        ageing = age_atrophy(subject_age(config.seed, index), config.age_atrophy_per_year)
    world = grid_world(grid)
    warp = _smooth_random_field(rng, grid.shape, grid.spacing_mm, config.warp_smoothness_mm, config.warp_std_mm)

    def render(severity: float, dz: float = 0.0, *, rotation_rad: np.ndarray | None = None, scale: np.ndarray | None = None,
               translation_mm: np.ndarray | None = None, ventricle_scale: float | None = None,
               warp_offset_mm: Sequence[float] | None = None, warp_mm: np.ndarray | None = None) -> np.ndarray:
        rotation_rad = subject.rotation_rad if rotation_rad is None else np.asarray(rotation_rad)
        scale = subject.scale if scale is None else np.asarray(scale)
        translation_mm = subject.translation_mm if translation_mm is None else np.asarray(translation_mm)
        ventricle_scale = subject.ventricle_scale if ventricle_scale is None else ventricle_scale
        offset = np.array([0.0, 0.0, dz]) + (0.0 if warp_offset_mm is None else np.asarray(warp_offset_mm, dtype=np.float64))
        deformation = warp if warp_mm is None else np.asarray(warp_mm, dtype=np.float64).reshape(warp.shape)
        displaced = world + deformation + offset.reshape(3, 1, 1, 1) if offset.any() else world + deformation
        linear = _rotation_matrix(rotation_rad) @ np.diag(scale)
        template = np.einsum("ab,b...->a...", linear, displaced) + translation_mm.reshape(3, 1, 1, 1)
        weights, values = render_layers(grid, template.astype(np.float32), subject.response, severity + ageing, ventricle_scale)
        return (weights * values).sum(axis=0)

    return rng, subject, render


def severity_renderer(config: CohortConfig, index: int) -> tuple[Subject, Callable[[float], np.ndarray]]:
    """Subject ``index``'s labels and its noise-free image as a function of severity (its own anatomy and nuisance).

    At the subject's own severity this is the image :func:`render_subject` writes before the intensity
    shift and noise (:func:`monai_mtl.floor.information_limit` uses it to find what the noise leaves knowable).
    """
    _, subject, render = _subject_anatomy(config, index, config)
    return subject, lambda severity: render(severity).astype(np.float32)


def anatomy_renderer(config: CohortConfig, index: int) -> tuple[Subject, Callable[..., np.ndarray]]:
    """Subject ``index``'s labels and its noise-free image as a function of severity and of each part of its nuisance.

    ``render(severity, rotation_rad=..., scale=..., translation_mm=..., ventricle_scale=..., warp_mm=...,
    warp_offset_mm=...)``: without keywords the subject's own draws (:func:`severity_renderer`); each keyword replaces
    one of them (``warp_mm`` the smooth deformation, ``(3, *shape)`` mm; ``warp_offset_mm`` adds a constant to it).
    Float32 on the cohort's grid.
    """
    _, subject, render = _subject_anatomy(config, index, config)
    return subject, lambda severity, **nuisance: render(severity, **nuisance).astype(np.float32)


def render_subject(
    config: CohortConfig, index: int, acquisition: SiteAcquisition | None = None
) -> tuple[Subject, np.ndarray]:
    """Render subject ``index``: its labels and a float32 volume (``config.shape``, or the site's grid).

    With ``acquisition`` the subject is scanned by that site: on its grid, each slice the mean of the
    anatomy over its slab (sub-slices across ``slice_thickness_mm``, sharing the subject's smooth
    deformation), then the site's bias field, contrast, Rician noise and artifact.
    """
    grid = config if acquisition is None else replace(config, shape=acquisition.shape, spacing_mm=acquisition.spacing_mm)
    rng, subject, render = _subject_anatomy(config, index, grid)
    if acquisition is None:
        image = render(subject.severity)
    else:
        thickness = acquisition.slice_thickness_mm
        n = max(1, int(np.ceil(thickness * _SLAB_SAMPLES_PER_MM)))
        offsets = thickness * ((np.arange(n) + 0.5) / n - 0.5)
        image = np.mean([render(subject.severity, dz) for dz in offsets], axis=0)
    shift = rng.uniform(-config.intensity_shift, config.intensity_shift, size=grid.shape)
    image = image * (1.0 + shift) + rng.normal(0.0, config.noise_std, size=grid.shape)
    if acquisition is not None:
        image = _acquire(image.astype(np.float32), acquisition, rng)
    return subject, image.astype(np.float32)


def _acquire(image: np.ndarray, acquisition: SiteAcquisition, rng: np.random.Generator) -> np.ndarray:
    """A site's intensity chain on a rendered volume: bias field, contrast, Rician noise, then its artifact."""
    from monai_mtl import artifacts

    image = image * artifacts.bias_field(image.shape, np.asarray(acquisition.bias_coefficients))
    image = artifacts.gamma_contrast(image, acquisition.gamma)
    image = artifacts.rician_noise(image, acquisition.rician_std, rng)
    if acquisition.artifact == "motion":
        image = artifacts.motion_ghosting(image, acquisition.artifact_strength)
    elif acquisition.artifact == "gibbs":
        image = artifacts.gibbs_ringing(image, acquisition.artifact_strength)
    return image


def render_atlas(config: CohortConfig) -> np.ndarray:
    """Region labels of the template anatomy (severity 0, no nuisance) on the cohort's grid, uint8."""
    weights, _ = render_layers(config, grid_world(config).astype(np.float32), response=1, severity=0.0)
    return weights.argmax(axis=0).astype(np.uint8)


def _write_subject(args: tuple[CohortConfig, int, str, tuple[SiteAcquisition, ...], bool]) -> dict:
    config, index, root, sites, covariates = args
    acquisition = sites[site_of(config.seed, index, len(sites))] if len(sites) > 1 else None
    subject, image = render_subject(config, index, acquisition)
    affine = config.affine if acquisition is None else replace(
        config, shape=acquisition.shape, spacing_mm=acquisition.spacing_mm).affine
    relative = f"{IMAGES_DIR}/{subject.subject_id}.nii.gz"
    nib.save(nifti_image(image, affine), os.path.join(root, relative))
    row = {
        "subject_id": subject.subject_id,
        "image": relative,
        "response": subject.response,
        "response_name": RESPONSE_NAMES[subject.response],
        "severity": subject.severity,
    }
    if acquisition is not None:
        row["site"] = acquisition.site
    if covariates:
        from monai_mtl.clinical import with_covariates

        row = {**with_covariates(row, config.seed, index), "biological_response": subject.response}
    return row


def _init_worker() -> None:
    # Two processes each running multi-threaded BLAS/FFT are slower than one: pin each worker to one thread.
    try:
        from threadpoolctl import threadpool_limits

        threadpool_limits(1)
    except ImportError:  # pragma: no cover - threadpoolctl comes with scikit-learn
        pass


def _prepare_destination(output: Path, overwrite: bool) -> None:
    if output.exists() and not output.is_dir():
        raise FileExistsError(f"output {output} exists and is not a folder")
    if output.is_dir() and any(output.iterdir()) and not overwrite:
        what = "a cohort" if (output / LABELS_CSV).exists() else "files"
        raise FileExistsError(f"output folder {output} already holds {what}; pass --overwrite to replace it")
    parent = output.parent
    if not parent.exists():
        try:
            parent.mkdir(parents=True)
        except OSError as err:
            raise PermissionError(f"cannot create the output's parent folder {parent}: {err.strerror}") from err
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(f"output's parent folder {parent} is not writable")


#: ``generate --layout`` choices
LAYOUTS = ("csv", "bids")


def generate_cohort(
    output: str | os.PathLike,
    config: CohortConfig | None = None,
    overwrite: bool = False,
    workers: int | None = None,
    progress: bool = True,
    sites: int = 1,
    layout: str = "csv",
    covariates: bool = False,
) -> pd.DataFrame:
    """Write a synthetic cohort to ``output`` and return its labels table.

    Writes ``images/<subject_id>.nii.gz``, ``labels.csv``, ``atlas.nii.gz`` and ``cohort.json``
    into a temporary sibling folder that is renamed to ``output`` only when complete.

    Args:
        output: destination folder; must not hold files unless ``overwrite``.
        config: cohort parameters (default: the paper's protocol).
        overwrite: replace an existing folder.
        workers: processes to render with (default: all CPU cores, at most 8).
        progress: show a progress bar.
        sites: number of acquisition sites (:func:`draw_sites`); with more than one, ``labels.csv`` gets
            a ``site`` column and ``cohort.json`` the sites' acquisitions. 1 is the paper's cohort.
        covariates: add the clinical covariates of :mod:`monai_mtl.clinical` (``age``, ``sex``,
            ``baseline_score``, ``genotype``, ``prior_treatments``); the response becomes the observed one, and
            the scans show the age's atrophy (``config.age_atrophy_per_year``, default 0.2 with covariates).
        layout: ``csv`` (``images/`` + ``labels.csv``) or ``bids`` (a BIDS dataset: ``participants.tsv``,
            ``sub-<label>/anat/sub-<label>_T1w.nii.gz``; see :func:`monai_mtl.bids.write_layout`).

    Example:
        >>> from monai_mtl.synthetic import CohortConfig, generate_cohort
        >>> labels = generate_cohort("data/tiny", CohortConfig(num_samples=12), progress=False)  # doctest: +SKIP
    """
    config = config or CohortConfig()
    if config.age_atrophy_per_year is None:  # resolved here, so that cohort.json records what was rendered
        from monai_mtl.clinical import AGE_ATROPHY_PER_YEAR

        config = replace(config, age_atrophy_per_year=AGE_ATROPHY_PER_YEAR if covariates else 0.0)
    elif config.age_atrophy_per_year and not covariates:
        raise ValueError(f"age_atrophy_per_year {config.age_atrophy_per_year} needs covariates (the age column)")
    config.validate()
    acquisitions = tuple(draw_sites(config, sites)) if sites > 1 else ()
    if sites < 1:
        raise ValueError(f"sites must be at least 1, got {sites}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    output = Path(output).absolute()
    _prepare_destination(output, overwrite)
    workers = max(1, min(workers or os.cpu_count() or 1, 8, config.num_samples))

    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.partial-", dir=output.parent))
    try:
        (staging / IMAGES_DIR).mkdir()
        jobs = [(config, index, str(staging), acquisitions, covariates) for index in range(config.num_samples)]
        bar = tqdm(total=config.num_samples, desc="generating cohort", unit="vol", disable=not progress)
        if workers == 1:
            rows = []
            for job in jobs:
                rows.append(_write_subject(job))
                bar.update()
        else:
            # fork: workers share the imported modules and start in milliseconds (spawn costs seconds here)
            method = "fork" if "fork" in multiprocessing.get_all_start_methods() else None
            with multiprocessing.get_context(method).Pool(workers, initializer=_init_worker) as pool:
                rows = []
                for row in pool.imap(_write_subject, jobs, chunksize=max(1, min(32, len(jobs) // (4 * workers)))):
                    rows.append(row)
                    bar.update()
        bar.close()
        columns = ["subject_id", "image", "response", "response_name", "severity"] + (["site"] if acquisitions else [])
        if covariates:
            from monai_mtl.clinical import COVARIATE_COLUMNS

            columns += list(COVARIATE_COLUMNS)
        labels = pd.DataFrame(rows, columns=columns)
        if covariates:  # prior_treatments and age stay integers; a missing cell is empty in the CSV
            biological = [row["biological_response"] for row in rows]
        labels.to_csv(staging / LABELS_CSV, index=False)
        nib.save(nifti_image(render_atlas(config), config.affine), staging / ATLAS_FILE)
        counts = labels["response_name"].value_counts()
        metadata = {
            "generator": "monai_mtl.synthetic",
            "version": __version__,
            "parameters": asdict(config),
            "affine": config.affine.tolist(),
            "response_names": list(RESPONSE_NAMES),
            "class_counts": {name: int(counts.get(name, 0)) for name in RESPONSE_NAMES},
            "atlas_labels": {str(k): v for k, v in ATLAS_LABELS.items()},
        }
        if covariates:
            from monai_mtl.clinical import covariate_facts

            metadata["covariates"] = covariate_facts(labels, biological, config.age_atrophy_per_year)
        if acquisitions:
            metadata["sites"] = [asdict(a) for a in acquisitions]
            metadata["site_counts"] = {str(k): int(v) for k, v in labels["site"].value_counts().sort_index().items()}
        (staging / COHORT_JSON).write_text(json.dumps(metadata, indent=2) + "\n")
        if layout == "bids":
            from monai_mtl.bids import write_layout

            write_layout(staging, labels)
        _swap_into_place(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info("wrote %d subjects to %s (%s)", len(labels), output, metadata["class_counts"])
    return labels


def _swap_into_place(staging: Path, output: Path) -> None:
    """Rename the finished ``staging`` folder to ``output``, replacing an old one only once the new one is whole."""
    old = None
    if output.exists():
        old = output.with_name(f".{output.name}.old-{os.getpid()}")
        output.rename(old)
    staging.rename(output)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def config_from_dict(values: dict) -> CohortConfig:
    """A :class:`CohortConfig` from ``cohort.json``'s ``parameters`` (lists back to tuples)."""
    known = {f.name for f in fields(CohortConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown cohort parameters: {unknown}")

    def as_tuple(value):
        return tuple(as_tuple(v) for v in value) if isinstance(value, list) else value

    return CohortConfig(**{k: as_tuple(v) for k, v in values.items()})
