"""Scanner artifacts on 3D arrays: one definition shared by the multi-site generator and the robustness sweep.

Each function takes a volume ``(X, Y, Z)`` as a NumPy array and returns a new float32 array; random
ones take a NumPy generator, so a site's draws come from the subject's own stream and a sweep's from
a seed. Gibbs ringing is MONAI's ``GibbsNoise``. Written here, and why: MONAI has no bias field from
given coefficients (``RandBiasField`` draws its own), no motion ghosting and no slab (slice-thickness)
integration; its ``AdjustContrast`` raises the intensities relative to the image's minimum, which
moves the background of a scan with noise, while :func:`gamma_contrast` keeps 0 at 0; its
``RandRicianNoise`` draws from the transform's own generator, not from the subject's stream that makes
the cohort independent of worker count. Training augmentation (``transforms.augmentation_transforms``)
uses MONAI's random transforms.
"""

from __future__ import annotations

import itertools

import numpy as np

#: artifact kinds of :func:`apply_artifact`, with what their strength means
ARTIFACT_KINDS: dict[str, str] = {
    "resolution": "voxel size multiplied by this factor on every axis (down- then back-sampled by preprocessing)",
    "slice_thickness": "each slice averages this many slices' thickness of anatomy (slab integration along z)",
    "bias_field": "standard deviation of the bias field's log-polynomial coefficients",
    "contrast": "gamma exponent of the intensities",
    "noise": "Rician noise standard deviation, as a fraction of the scan's 99th intensity percentile",
    "motion": "fraction of the signal moved into ghosts along the phase-encoding (y) axis",
    "gibbs": "MONAI GibbsNoise alpha: the fraction of k-space truncated",
}


def polynomial_terms(shape: tuple[int, ...], degree: int = 2) -> np.ndarray:
    """Monomials of the normalised coordinates (each axis in [-1, 1]) up to ``degree``, without the constant.

    Shape ``(n_terms, *shape)``; for degree 2 in 3D there are 9 terms.
    """
    axes = [np.linspace(-1.0, 1.0, n) if n > 1 else np.zeros(1) for n in shape]
    grids = np.meshgrid(*axes, indexing="ij")
    powers = [p for p in itertools.product(range(degree + 1), repeat=len(shape)) if 0 < sum(p) <= degree]
    return np.stack([np.prod([g**k for g, k in zip(grids, p)], axis=0) for p in powers])


def bias_field(shape: tuple[int, ...], coefficients: np.ndarray, degree: int = 2) -> np.ndarray:
    """Smooth multiplicative field ``exp(sum_k c_k * term_k)`` over the field of view (1 at the centre)."""
    terms = polynomial_terms(shape, degree)
    coefficients = np.asarray(coefficients, dtype=np.float64)
    if len(coefficients) != len(terms):
        raise ValueError(f"a degree-{degree} bias field in {len(shape)}D needs {len(terms)} coefficients, got {len(coefficients)}")
    return np.exp(np.tensordot(coefficients, terms, axes=1)).astype(np.float32)


def gamma_contrast(image: np.ndarray, gamma: float) -> np.ndarray:
    """``image ** gamma`` on the non-negative part, relative to the image's maximum (the maximum is kept)."""
    peak = max(float(image.max()), 1e-12)
    return (np.clip(image, 0.0, None) / peak) ** gamma * peak


def rician_noise(image: np.ndarray, std: float, rng: np.random.Generator) -> np.ndarray:
    """Magnitude of a complex signal with Gaussian noise in both channels: ``|image + n1 + i n2|``."""
    real = image + rng.normal(0.0, std, image.shape)
    imaginary = rng.normal(0.0, std, image.shape)
    return np.sqrt(real**2 + imaginary**2).astype(np.float32)


def motion_ghosting(image: np.ndarray, strength: float, axis: int = 1, period: int = 4) -> np.ndarray:
    """Motion ghosts: every ``period``-th k-space line along ``axis`` loses ``strength`` of its amplitude.

    A periodic error in the phase-encoding direction, as breathing or pulsation gives, copies the
    object at shifts of FOV / ``period`` along that axis.
    """
    spectrum = np.fft.fftn(image)
    index = [slice(None)] * image.ndim
    index[axis] = slice(0, None, period)
    spectrum[tuple(index)] *= 1.0 - strength
    return np.abs(np.fft.ifftn(spectrum)).astype(np.float32)


def gibbs_ringing(image: np.ndarray, alpha: float) -> np.ndarray:
    """MONAI's ``GibbsNoise``: k-space truncated by ``alpha`` (0: none, 1: everything)."""
    from monai.transforms import GibbsNoise

    return np.asarray(GibbsNoise(alpha=float(alpha))(image[None].astype(np.float32))[0], dtype=np.float32)


def slab_average(image: np.ndarray, slices: float, axis: int = 2) -> np.ndarray:
    """Each slice becomes the mean over a slab ``slices`` slices thick (partial slices weighted), centred on it."""
    from scipy.ndimage import convolve1d

    if slices <= 1.0:
        return image.astype(np.float32)
    half = slices / 2.0
    reach = int(np.ceil(half - 0.5))
    offsets = np.arange(-reach, reach + 1)
    weights = np.clip(half + 0.5 - np.abs(offsets), 0.0, 1.0)
    return convolve1d(image.astype(np.float32), weights / weights.sum(), axis=axis, mode="nearest")


def apply_artifact(image: np.ndarray, kind: str, strength: float, rng: np.random.Generator) -> np.ndarray:
    """One artifact of :data:`ARTIFACT_KINDS` at ``strength`` on a volume in its own voxel grid.

    ``resolution`` is not handled here: it changes the grid, see
    :class:`monai_mtl.robustness.ArtifactScand`.
    """
    if kind == "slice_thickness":
        return slab_average(image, strength)
    if kind == "bias_field":
        return image * bias_field(image.shape, rng.normal(0.0, strength, 9))
    if kind == "contrast":
        return gamma_contrast(image, strength)
    if kind == "noise":
        return rician_noise(image, strength * float(np.percentile(image, 99)), rng)
    if kind == "motion":
        return motion_ghosting(image, strength)
    if kind == "gibbs":
        return gibbs_ringing(image, strength)
    raise ValueError(f"artifact kind must be one of {sorted(ARTIFACT_KINDS)}, got {kind!r}")


__all__ = [
    "ARTIFACT_KINDS", "polynomial_terms", "bias_field", "gamma_contrast", "rician_noise", "motion_ghosting",
    "gibbs_ringing", "slab_average", "apply_artifact",
]
