"""The information limit of a synthetic cohort: how well an observer who knows everything but the severity can do.

For each subject the generator can re-render the subject's own anatomy (its class, rotation, scale,
translation, ventricle size and smooth deformation, all reproduced from ``cohort.json`` and the
subject's index) at any severity. What it cannot know is the noise: each voxel is
``clean * (1 + u) + n`` with ``u`` uniform on ``[-intensity_shift, intensity_shift]`` and ``n`` Gaussian
of ``noise_std``. The observer takes the severity, within the subject's class range, whose noise-free
render makes the noisy image most likely under exactly that noise model (maximum likelihood): no
model can beat its error on average, so its MAE is the floor of the severity task.

A model does not know the anatomy either: it must read the subject's pose, size, ventricles and smooth
deformation from the same scan. :func:`anatomy_unknown_mae` bounds what that leaves (a Bayesian Cramer-Rao
bound, linearised around the subject's draws): the floor of any model that learns from scans alone.

The response has a limit too: the scan shows the subject's biological class, and on a cohort with
clinical covariates (``generate --covariates``) the observed class follows from it by the generator's
rule, except where the column the rule needs is missing (:func:`response_limit`).
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from scipy.linalg import cho_factor, cho_solve
from scipy.optimize import minimize_scalar
from scipy.special import log_ndtr

from monai_mtl.errors import CohortError

if TYPE_CHECKING:
    from monai_mtl.synthetic import CohortConfig

logger = logging.getLogger(__name__)

#: coarse grid over the class's severity range before the bounded 1-D search around its best point
GRID_POINTS = 21
#: the search stops when the severity is known to this many points (the CSV's severities have 0.01 steps)
TOLERANCE = 0.005


def log_likelihood(image: np.ndarray, clean: np.ndarray, noise_std: float, shift: float) -> float:
    """``log p(image | clean)`` summed over voxels, for ``image = clean * (1 + u) + n`` (``u ~ U(-shift, shift)``, ``n ~ N(0, noise_std)``).

    Per voxel the density is ``[Phi((y - c + a c) / s) - Phi((y - c - a c) / s)] / (2 a c)`` (the uniform
    spread ``a c`` convolved with the Gaussian); where ``a c`` is negligible against ``s`` it is the
    Gaussian of variance ``s**2 + (a c)**2 / 3``.
    """
    y, c = np.asarray(image, dtype=np.float64).ravel(), np.asarray(clean, dtype=np.float64).ravel()
    spread = shift * np.abs(c)
    wide = spread > 1e-3 * noise_std
    total = 0.0
    if (~wide).any():
        variance = noise_std**2 + spread[~wide] ** 2 / 3.0
        total += float(np.sum(-0.5 * (y[~wide] - c[~wide]) ** 2 / variance - 0.5 * np.log(2 * np.pi * variance)))
    if wide.any():
        high = (y[wide] - c[wide] + spread[wide]) / noise_std
        low = (y[wide] - c[wide] - spread[wide]) / noise_std
        # log(Phi(high) - Phi(low)), computed on the side of the tail where it does not cancel
        flip = low > 0
        high, low = np.where(flip, -low, high), np.where(flip, -high, low)
        log_high, log_low = log_ndtr(high), log_ndtr(low)
        mass = log_high + np.log1p(-np.exp(log_low - log_high))
        total += float(np.sum(mass - np.log(2.0 * spread[wide])))
    return total


def estimate_severity(
    image: np.ndarray, render: Callable[[float], np.ndarray], low: float, high: float, noise_std: float, shift: float
) -> float:
    """The maximum-likelihood severity in ``[low, high]``: a grid of :data:`GRID_POINTS`, then a bounded search around its best."""
    def cost(severity: float) -> float:
        return -log_likelihood(image, render(float(severity)), noise_std, shift)

    grid = np.linspace(low, high, GRID_POINTS)
    costs = [cost(s) for s in grid]
    best = int(np.argmin(costs))
    step = grid[1] - grid[0]
    bounds = (max(low, grid[best] - step), min(high, grid[best] + step))
    result = minimize_scalar(cost, bounds=bounds, method="bounded", options={"xatol": TOLERANCE})
    return float(result.x) if result.fun <= costs[best] else float(grid[best])


def _subject_floor(args: tuple[dict, int, str]) -> tuple[int, float, float, float, float]:
    from monai_mtl.synthetic import config_from_dict, severity_renderer

    parameters, index, image_path = args
    import nibabel as nib

    config = config_from_dict(parameters)
    subject, render = severity_renderer(config, index)
    image = np.asarray(nib.load(image_path).dataobj, dtype=np.float32)
    low, high = config.severity_ranges[subject.response]
    estimate = estimate_severity(image, render, low, high, config.noise_std, config.intensity_shift)
    return index, subject.severity, estimate, *anatomy_unknown_mae(config, index)


def response_limit(description: dict, labels: pd.DataFrame, subject_ids: list[str]) -> pd.DataFrame:
    """Per subject: the observed ``true_response``, the class its scan shows (``scan_response``, the generator's
    biological draw) and ``limit_response``, the class an observer who knows that, the covariates and the
    generator's rule names (:func:`monai_mtl.clinical.most_likely_response`).

    Without covariates the scan shows the response, so the limit is 100%; with them (``generate
    --covariates``) it misses the ``ultrarapid`` metabolisers whose genotype is missing and whose class the
    genotype moves: no scan and no column tells them from the others.

    Raises:
        CohortError: a ``response`` of ``labels.csv`` that the generator's draws and rule do not give (an edited cohort).
    """
    from monai_mtl.clinical import draw_covariates, most_likely_response, observed_response
    from monai_mtl.synthetic import config_from_dict, draw_subject

    config = config_from_dict(description["parameters"])
    covariates = description.get("covariates")
    rows = []
    for subject_id in subject_ids:
        row = labels.loc[subject_id]
        index = int(str(subject_id).rsplit("-", 1)[1])
        scan = draw_subject(config, index).response
        limit = scan
        expected = scan
        if covariates:
            genotype = row["genotype"] if isinstance(row["genotype"], str) and row["genotype"] else None
            prior = int(row["prior_treatments"])
            limit = most_likely_response(scan, genotype, prior, covariates.get("genotypes"))
            _, true_genotype = draw_covariates(config.seed, index, float(row["severity"]))
            expected = observed_response(scan, true_genotype, prior)
        if int(row["response"]) != expected:
            raise CohortError(f"{subject_id}: labels.csv says response {int(row['response'])}, the generator's draws "
                              f"and rule give {expected} (edited cohort?)")
        rows.append({"subject_id": subject_id, "true_response": int(row["response"]), "scan_response": scan,
                     "limit_response": limit})
    return pd.DataFrame(rows, columns=["subject_id", "true_response", "scan_response", "limit_response"])


def information_limit(
    dataset_dir: str | os.PathLike,
    split_file: str | os.PathLike,
    part: str = "test",
    output_dir: str | os.PathLike | None = None,
    workers: int = 2,
    severity: bool = True,
) -> dict:
    """The floor's severity MAE and the response's accuracy limit on one part of a split of a synthetic cohort;
    writes ``floor.json``.

    ``severity_mae`` (with ``bootstrap_95``): the maximum-likelihood observer's error (single-site cohorts;
    ``severity=False`` skips it, the renders being the slow part); beside it the Cramer-Rao figures of
    :func:`anatomy_unknown_mae`, ``severity_mae_bound_anatomy_known`` and ``severity_mae_anatomy_unknown`` (with
    ``anatomy_unknown_bootstrap_95``): the limit of an observer who must also read the anatomy from the scan.
    ``response_accuracy_limit`` (with ``response_bootstrap_95``): the accuracy of :func:`response_limit`'s observer.
    Also writes ``floor_predictions.csv`` (``subject_id``, the response columns, then ``true_severity``, ``floor_severity``,
    ``bound_anatomy_known``, ``bound_anatomy_unknown``)
    to ``output_dir`` (default: the split file's folder, i.e. the run's).

    Raises:
        CohortError: no ``cohort.json`` (not a generated cohort), a multi-site cohort for the severity (its
            acquisition chain is not in the noise model), split subjects the cohort does not have, or labels the
            generator does not give.
    """
    from monai_mtl.cohort import read_cohort
    from monai_mtl.evaluation import bootstrap_intervals
    from monai_mtl.io import atomic_write_csv, atomic_write_json
    from monai_mtl.synthetic import COHORT_JSON

    dataset_dir, split_file = Path(dataset_dir), Path(split_file)
    description_file = dataset_dir / COHORT_JSON
    if not description_file.is_file():
        raise CohortError(f"{dataset_dir}: no {COHORT_JSON}; the information limit needs a cohort made by 'generate'")
    description = json.loads(description_file.read_text())
    if severity and len(description.get("sites", [])) > 1:
        raise CohortError(f"{dataset_dir} is a multi-site cohort: its acquisition chain is not in the floor's noise model "
                          "(--response-only gives the response's limit)")
    split = json.loads(split_file.read_text())
    if part not in split:
        raise CohortError(f"{split_file} has no part {part!r} (parts: {[k for k in split if isinstance(split[k], list)]})")
    labels = read_cohort(dataset_dir).set_index("subject_id", drop=False)
    missing = sorted(set(split[part]) - set(labels.index))[:3]
    if missing:
        raise CohortError(f"{split_file} names subjects that {dataset_dir} does not have, e.g. {missing}")
    subject_ids = list(split[part])
    table = response_limit(description, labels, subject_ids)
    correct = table.assign(true_severity=0.0, pred_severity=0.0, pred_response=table["limit_response"])
    result: dict = {
        "response_accuracy_limit": float((table["limit_response"] == table["true_response"]).mean()),
        "response_bootstrap_95": bootstrap_intervals(correct)["accuracy"],
    }
    if severity:
        parameters = description["parameters"]
        jobs = [(parameters, int(str(s).rsplit("-", 1)[1]), labels.loc[s, "image"]) for s in subject_ids]
        from tqdm.auto import tqdm

        with ProcessPoolExecutor(max_workers=max(1, workers)) as pool:
            results = list(tqdm(pool.map(_subject_floor, jobs, chunksize=4), total=len(jobs), desc="floor"))
        table["true_severity"] = [r[1] for r in results]
        table["floor_severity"] = [r[2] for r in results]
        table["bound_anatomy_known"] = [r[3] for r in results]
        table["bound_anatomy_unknown"] = [r[4] for r in results]
        csv_severity = labels.loc[table["subject_id"], "severity"].to_numpy()
        if not np.allclose(csv_severity, table["true_severity"], atol=1e-6):
            raise CohortError(f"{dataset_dir}: labels.csv severities differ from what cohort.json regenerates (edited cohort?)")
        errors = (table["floor_severity"] - table["true_severity"]).abs()
        interval = bootstrap_intervals(table.assign(pred_response=table["true_response"], pred_severity=table["floor_severity"]))
        result.update({
            "severity_mae": float(errors.mean()),
            "bootstrap_95": interval["severity_mae"],
            "noise_model": {"noise_std": parameters["noise_std"], "intensity_shift": parameters["intensity_shift"]},
            # the Cramer-Rao figures: what an efficient observer's MAE would be, knowing the anatomy (a check on the
            # maximum-likelihood figure above) and having to read it from the scan too (anatomy_unknown_mae)
            "severity_mae_bound_anatomy_known": float(table["bound_anatomy_known"].mean()),
            "severity_mae_anatomy_unknown": float(table["bound_anatomy_unknown"].mean()),
            "anatomy_unknown_bootstrap_95": bootstrap_intervals(table.assign(
                pred_response=table["true_response"], true_severity=0.0, pred_severity=table["bound_anatomy_unknown"]))["severity_mae"],
        })
    result.update({
        "n": int(len(table)),
        "part": part,
        "split": str(split_file.absolute()),
        "dataset_dir": str(dataset_dir.absolute()),
        "method": ("response: the class the scan shows (the generator's draw) through the covariates' rule, the most "
                   "likely class where a covariate is missing"
                   + ("; severity: maximum likelihood over the subject's class range, its own anatomy re-rendered; "
                      "beside it the Cramer-Rao bounds with the anatomy known and unknown (linearised, Gaussian priors of "
                      "the generator's variances)" if severity else "") + " (monai_mtl.floor)"),
    })
    out = Path(output_dir) if output_dir is not None else split_file.parent
    atomic_write_csv(out / "floor_predictions.csv", table)
    atomic_write_json(out / "floor.json", result)
    logger.info("information limit on the %s part (n=%d): response accuracy %.4f%s -> %s", part, result["n"],
                result["response_accuracy_limit"],
                f", severity MAE {result['severity_mae']:.3f} {[round(v, 3) for v in result['bootstrap_95']]}"
                f" (anatomy unknown: {result['severity_mae_anatomy_unknown']:.3f})" if severity else "", out / "floor.json")
    return result


def cramer_rao_mae(render: Callable[[float], np.ndarray], severity: float, noise_std: float, shift: float,
                   step: float = 0.5) -> float:
    """``sqrt(2 / (pi I))``: the MAE of an efficient unbiased estimator, ``I`` the Fisher information of the severity.

    ``I = sum_v (dc_v/ds)**2 * (1 / v_v + (dv_v/dc_v)**2 / (2 v_v**2))`` with the voxel variance
    ``v = noise_std**2 + (shift c)**2 / 3`` (the noise's Gaussian approximation); ``dc/ds`` by central differences.
    """
    plus, minus = render(severity + step).astype(np.float64), render(severity - step).astype(np.float64)
    clean = render(severity).astype(np.float64)
    slope = (plus - minus) / (2 * step)
    variance = noise_std**2 + (shift * clean) ** 2 / 3.0
    dv_dc = 2.0 * shift**2 * clean / 3.0
    return _efficient_mae(float(np.sum(slope**2 * (1.0 / variance + dv_dc**2 / (2.0 * variance**2)))))


def _efficient_mae(information: float) -> float:
    # an unbiased estimator at the Cramer-Rao bound errs as a Gaussian of variance 1 / I: mean |error| sqrt(2 / (pi I))
    return math.sqrt(2.0 / (math.pi * information)) if information > 0 else float("inf")


def _kronecker_gram(weight: np.ndarray, factors: list[np.ndarray]) -> np.ndarray:
    """``F.T @ diag(weight.ravel()) @ F`` for ``F = kron(*factors)`` (one factor per axis), one axis at a time."""
    gram = weight
    for factor in factors:  # contract the leading voxel axis, append the factor's pair of indices at the end
        gram = np.tensordot(gram, np.einsum("xi,xj->xij", factor, factor), axes=([0], [0]))
    ranks = [f.shape[1] for f in factors]
    order = [2 * a for a in range(len(factors))] + [2 * a + 1 for a in range(len(factors))]
    return gram.transpose(order).reshape(math.prod(ranks), math.prod(ranks))


def _kronecker_project(volume: np.ndarray, factors: list[np.ndarray]) -> np.ndarray:
    """``F.T @ volume.ravel()`` for ``F = kron(*factors)``."""
    for factor in factors:
        volume = np.tensordot(volume, factor, axes=([0], [0]))  # the axis' voxel index becomes its rank index, at the end
    return volume.ravel()


#: the global nuisance an observer must read from the scan: the render's keyword, its size and the central-difference
#: step of its derivative (radians, scale, mm, ventricle scale)
GLOBAL_NUISANCE = (("rotation_rad", 3, 1e-3), ("scale", 3, 1e-3), ("translation_mm", 3, 0.05), ("ventricle_scale", 1, 1e-3))


def global_nuisance_prior(config: CohortConfig) -> tuple[list[np.ndarray], list[float]]:
    """Gaussian priors of :data:`GLOBAL_NUISANCE`: means and standard deviations (the generator's uniform ``±a`` draws
    taken as ``a / sqrt(3)``, the ventricle scale's normal draw as it is)."""
    means = [np.zeros(3), np.ones(3), np.zeros(3), np.ones(1)]
    sds = [math.radians(config.rotation_deg) / math.sqrt(3), config.scale_range / math.sqrt(3),
           config.translation_mm / math.sqrt(3), config.ventricle_scale_std]
    return means, sds


def weighted_gram(columns: list[np.ndarray], moved: list[np.ndarray], weight: np.ndarray, factors: list[np.ndarray],
                  warp_std_mm: float) -> np.ndarray:
    """``J' W J`` for ``J = [warp_std_mm * (g_k F) for k in 0..2, *columns]``, made axis by axis.

    ``F = kron(*factors)`` is the smooth deformation's basis (:func:`~monai_mtl.synthetic.warp_covariance_factors`),
    ``g_k`` (``moved``) the image's derivative by a displacement of each voxel along axis ``k``, so ``g_k F`` are the
    derivatives by the deformation's standard-normal coefficients (``3 * rank`` columns first, never built as a voxels x
    columns matrix); ``columns`` are volumes (the derivatives by other unknowns, or a residual), ``W = diag(weight)``.
    Without ``moved`` the dense columns' matrix alone. :func:`anatomy_unknown_mae` takes the bound from it;
    docs/scripts/bound_check.py the Gauss-Newton steps of a fit.
    """
    rank = math.prod(f.shape[1] for f in factors) if moved else 0
    size = len(moved) * rank
    gram = np.zeros((size + len(columns), size + len(columns)))
    for k in range(len(moved)):
        block = slice(k * rank, (k + 1) * rank)
        for m in range(k, len(moved)):
            other = slice(m * rank, (m + 1) * rank)
            gram[block, other] = warp_std_mm**2 * _kronecker_gram(moved[k] * moved[m] * weight, factors)
            gram[other, block] = gram[block, other].T
        for c, column in enumerate(columns):
            gram[block, size + c] = gram[size + c, block] = warp_std_mm * _kronecker_project(moved[k] * weight * column, factors)
    flat = np.stack([c.ravel() for c in columns])
    gram[size:, size:] = (flat * weight.ravel()) @ flat.T
    return gram


def anatomy_unknown_mae(config: CohortConfig, index: int, step: float = 0.5) -> tuple[float, float]:
    """Severity MAE bounds of subject ``index``: ``(anatomy known, anatomy unknown)``, each ``sqrt(2 / (pi I))``.

    Known: ``I = j' W j``, ``j`` the image's derivative by the severity and ``W`` the inverse voxel variances of
    the noise's Gaussian approximation (:func:`cramer_rao_mae` without its small variance term). Unknown: the
    observer must also read the subject's rotation, scale, translation, ventricle size and smooth deformation
    from the scan. Linearised around the subject's own draws, with Gaussian priors of the generator's variances
    (its uniform draws' ``a / sqrt(3)``; the deformation's covariance from :func:`~monai_mtl.synthetic.warp_covariance_factors`),
    the image is ``render + j ds + U z + noise`` with ``z`` standard normal, and what the severity keeps of
    ``I`` is the Schur complement ``j' W j - b' (1 + U' W U)^-1 b``, ``b = U' W j`` (Bayesian Cramer-Rao). The
    deformation's columns are the per-voxel derivative by its three components times the Kronecker factors, so
    ``U' W U`` (about 6,400 columns) is made axis by axis, never as a voxels x columns matrix.
    """
    from monai_mtl.synthetic import anatomy_renderer, warp_covariance_factors

    subject, render = anatomy_renderer(config, index)
    clean = render(subject.severity).astype(np.float64)

    def derivative(name: str, value, delta) -> np.ndarray:
        return (render(subject.severity, **{name: value + delta}).astype(np.float64)
                - render(subject.severity, **{name: value - delta}).astype(np.float64)) / (2.0 * float(np.max(np.abs(delta))))

    slope = (render(subject.severity + step).astype(np.float64) - render(subject.severity - step).astype(np.float64)) / (2 * step)
    weight = 1.0 / (config.noise_std**2 + (config.intensity_shift * clean) ** 2 / 3.0)
    axes = np.eye(3)
    # the global nuisance, each column scaled by its prior's standard deviation
    columns = [derivative(name, getattr(subject, name), step * e) * sd
               for (name, size, step), sd in zip(GLOBAL_NUISANCE, global_nuisance_prior(config)[1])
               for e in (axes if size > 1 else [1.0])]
    # each voxel's image moves with its own deformation: a constant offset gives every voxel's derivative at once
    gradient = [derivative("warp_offset_mm", np.zeros(3), 0.05 * e) for e in axes]
    factors = warp_covariance_factors(config.shape, config.spacing_mm, config.warp_smoothness_mm)
    # J' W J of [the deformation's columns, the global nuisance's, the severity's]: the nuisance's block, its coupling
    # to the severity, and the severity's own information
    gram = weighted_gram(columns + [slope], gradient, weight, factors, config.warp_std_mm)
    known, coupling, nuisance = float(gram[-1, -1]), gram[:-1, -1], gram[:-1, :-1]
    nuisance[np.diag_indices_from(nuisance)] += 1.0  # the standard normal prior of every column
    unknown = known - float(coupling @ cho_solve(cho_factor(nuisance, overwrite_a=True), coupling))
    return _efficient_mae(known), _efficient_mae(unknown)


__all__ = ["GRID_POINTS", "TOLERANCE", "log_likelihood", "estimate_severity", "response_limit", "information_limit",
           "cramer_rao_mae", "GLOBAL_NUISANCE", "global_nuisance_prior", "weighted_gram", "anatomy_unknown_mae"]
