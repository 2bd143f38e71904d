"""Is the linearised bound of ``floor`` reachable? A nonlinear MAP fit of the severity with the anatomy unknown.

``monai_mtl.floor.anatomy_unknown_mae`` is a Bayesian Cramer-Rao bound linearised around each subject's own draws.
A linearised bound can be optimistic where the image is not linear in the nuisance over the prior's range (a pose
off by degrees, not by the derivative's step), or where the posterior is not Gaussian. This script fits, for each
subject, the severity together with the nuisance by maximum a posteriori, from the priors' means and the class's
middle (what a model knows before it reads the scan, the class aside), on a noisy image drawn by the generator's
noise model, and compares that estimator's MAE with the bound on the same subjects.

The nuisance is the ten global numbers (rotation 3, scale 3, translation 3, ventricle size) and, with
``--deformation``, the smooth deformation too: its ~6,400 standard-normal coefficients in the generator's own basis
(:func:`monai_mtl.synthetic.warp_covariance_factors`). Without ``--deformation`` both the fit and the bound run on the
cohort's generator with the deformation left out (``warp_std_mm`` 0).

The fit is Levenberg-Marquardt on the negative log posterior (the noise's Gaussian approximation, its variances read
from the image, plus the standard-normal priors of the scaled nuisance; the severity has none), with the same
derivatives as the bound: central differences for the severity and the global numbers, and for the deformation the
image's derivative by a displacement of each voxel times the Kronecker factors, so the normal equations are built
axis by axis (``monai_mtl.floor.weighted_gram``, the bound's own) and solved whole (6,400 x 6,400, a Cholesky factorisation).

    python docs/scripts/bound_check.py data/synthetic --split runs/cv/fold_0/split.json --subjects 100 --workers 2
    OMP_NUM_THREADS=1 python docs/scripts/bound_check.py data/synthetic --split runs/cv/fold_0/split.json \\
        --subjects 40 --deformation --csv deformation.csv

Prints, over the subjects: the bound with the anatomy known and unknown, the maximum-likelihood severity with the
anatomy known (``monai_mtl.floor.estimate_severity``) and the MAP severity with the anatomy unknown, each MAE with a
bootstrap 95% interval; ``--csv`` writes the per-subject table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.linalg import cho_factor, cho_solve

from monai_mtl.floor import GLOBAL_NUISANCE, global_nuisance_prior, weighted_gram

#: the severity's central-difference step (points) and the displacement's (mm)
SEVERITY_STEP, DISPLACEMENT_STEP = 0.5, 0.05


def _kronecker_apply(coefficients: np.ndarray, factors: list[np.ndarray]) -> np.ndarray:
    """``F @ coefficients`` for ``F = kron(*factors)``: the coefficients' field on the grid."""
    field = coefficients.reshape([f.shape[1] for f in factors])
    for factor in factors:  # the first rank axis becomes its voxel axis, at the end
        field = np.tensordot(field, factor, axes=([0], [1]))
    return field


class PosteriorFit:
    """The negative log posterior of one subject's image and its Levenberg-Marquardt minimisation.

    The unknowns ``x``: the deformation's coefficients (``3 * rank``, standard normal a priori; none without
    deformation), the ten global numbers in prior standard deviations from their means, then the severity.
    """

    def __init__(self, config, render, image: np.ndarray) -> None:
        from monai_mtl.synthetic import warp_covariance_factors

        self.config, self.render, self.image = config, render, image.astype(np.float64)
        self.weight = 1.0 / (config.noise_std**2 + (config.intensity_shift * self.image) ** 2 / 3.0)
        self.mean, self.sd = global_nuisance_prior(config)  # the bound's priors
        deformed = config.warp_std_mm > 0
        self.factors = warp_covariance_factors(config.shape, config.spacing_mm, config.warp_smoothness_mm) if deformed else []
        self.rank = math.prod(f.shape[1] for f in self.factors) if deformed else 0

    def keywords(self, x: np.ndarray) -> dict:
        """The render's keywords at ``x`` (the deformation's field from its coefficients)."""
        values, start = {}, 3 * self.rank
        for (name, size, _), mean, sd in zip(GLOBAL_NUISANCE, self.mean, self.sd):
            value = mean + sd * x[start:start + size]
            values[name] = float(value[0]) if size == 1 else value
            start += size
        if self.rank:
            coefficients = x[:3 * self.rank].reshape(3, self.rank)
            values["warp_mm"] = self.config.warp_std_mm * np.stack([_kronecker_apply(c, self.factors) for c in coefficients])
        return values

    def image_at(self, x: np.ndarray, **change) -> np.ndarray:
        return self.render(float(x[-1]) + change.pop("severity", 0.0), **{**self.keywords(x), **change}).astype(np.float64)

    def objective(self, x: np.ndarray) -> float:
        residual = self.image - self.image_at(x)
        return 0.5 * float(np.sum(self.weight * residual**2)) + 0.5 * float(np.sum(x[:-1] ** 2))

    def normal_equations(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Gauss-Newton's ``H`` (the bound's matrix at ``x``, the severity included) and the gradient."""
        keywords = self.keywords(x)
        residual = self.image - self.image_at(x)
        columns = []  # the global numbers' derivatives in prior standard deviations, then the severity's
        for (name, size, step), sd in zip(GLOBAL_NUISANCE, self.sd):
            for k in range(size):
                delta = step * np.eye(size)[k] if size > 1 else step
                value = keywords[name]
                columns.append((self.image_at(x, **{name: value + delta}) - self.image_at(x, **{name: value - delta}))
                               / (2 * step) * sd)
        columns.append((self.image_at(x, severity=SEVERITY_STEP) - self.image_at(x, severity=-SEVERITY_STEP))
                       / (2 * SEVERITY_STEP))
        moved = []  # the image's derivative by a displacement of each voxel along each axis (with the deformation)
        if self.rank:
            warp = keywords["warp_mm"]
            for k in range(3):
                shift = DISPLACEMENT_STEP * np.eye(3)[k].reshape(3, 1, 1, 1)
                moved.append((self.image_at(x, warp_mm=warp + shift) - self.image_at(x, warp_mm=warp - shift))
                             / (2 * DISPLACEMENT_STEP))
        # the residual as one more column: its row of J' W J is minus the gradient of the data term
        gram = weighted_gram(columns + [residual], moved, self.weight, self.factors, self.config.warp_std_mm)
        hessian, gradient = gram[:-1, :-1], -gram[:-1, -1]
        n = len(gradient)
        prior = np.arange(n) < n - 1  # every unknown but the severity has a standard-normal prior
        hessian[np.diag_indices(n)] += prior
        gradient += np.where(prior, x, 0.0)
        return hessian, gradient

    def minimise(self, x: np.ndarray, iterations: int = 30, tolerance: float = 1e-4) -> tuple[np.ndarray, int]:
        """Levenberg-Marquardt from ``x`` until a step moves the severity by less than ``tolerance`` points."""
        value, damping = self.objective(x), 0.0
        for iteration in range(1, iterations + 1):
            hessian, gradient = self.normal_equations(x)
            while True:
                step = -cho_solve(cho_factor(hessian + damping * np.diag(np.diag(hessian))), gradient)
                candidate = self.objective(x + step)
                if candidate <= value:
                    break
                damping = max(1e-3, 10 * damping)
                if damping > 1e6:
                    return x, iteration
            x, value, damping = x + step, candidate, damping / 10 if damping > 1e-3 else 0.0
            if abs(step[-1]) < tolerance:
                return x, iteration
        return x, iterations


def _fit(args: tuple[dict, int, bool]) -> dict:
    from monai_mtl.floor import anatomy_unknown_mae, estimate_severity
    from monai_mtl.synthetic import anatomy_renderer, config_from_dict

    parameters, index, deformation = args
    config = config_from_dict(parameters)
    if not deformation:
        config = dataclasses.replace(config, warp_std_mm=0.0)
    subject, render = anatomy_renderer(config, index)
    clean = render(subject.severity).astype(np.float64)
    rng = np.random.default_rng(10_000 + index)  # the generator's noise model, drawn here (not the cohort's own draw)
    shift = rng.uniform(-config.intensity_shift, config.intensity_shift, size=clean.shape)
    image = clean * (1.0 + shift) + rng.normal(0.0, config.noise_std, size=clean.shape)

    fit = PosteriorFit(config, render, image)
    low, high = config.severity_ranges[subject.response]
    start = np.zeros(3 * fit.rank + 11)
    start[-1] = 0.5 * (low + high)  # the class's middle (a model reads the class first); the nuisance at its means
    estimate, iterations = fit.minimise(start)
    known, unknown = anatomy_unknown_mae(config, index)
    known_estimate = estimate_severity(image, lambda s: render(s), low, high, config.noise_std, config.intensity_shift)
    found = fit.keywords(estimate)
    return {
        "index": index, "true_severity": subject.severity, "bound_anatomy_known": known, "bound_anatomy_unknown": unknown,
        "ml_anatomy_known": known_estimate, "map_anatomy_unknown": float(estimate[-1]), "iterations": iterations,
        "pose_error_deg": float(np.degrees(np.abs(found["rotation_rad"] - subject.rotation_rad)).max()),
        "translation_error_mm": float(np.abs(found["translation_mm"] - subject.translation_mm).max()),
    }


def _mae_interval(errors: np.ndarray, seed: int = 0, n: int = 2000) -> tuple[float, float, float]:
    rng = np.random.default_rng(seed)
    means = [errors[rng.integers(0, len(errors), len(errors))].mean() for _ in range(n)]
    return float(errors.mean()), float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dataset_dir", type=Path)
    parser.add_argument("--split", type=Path, required=True, help="a run's split.json; its test part's first subjects")
    parser.add_argument("--subjects", type=int, default=60)
    parser.add_argument("--deformation", action="store_true", help="the smooth deformation unknown too (else left out)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--csv", type=Path, default=None)
    args = parser.parse_args()
    parameters = json.loads((args.dataset_dir / "cohort.json").read_text())["parameters"]
    indices = [int(s.rsplit("-", 1)[1]) for s in json.loads(args.split.read_text())["test"][: args.subjects]]
    with ProcessPoolExecutor(max_workers=args.workers) as pool:
        table = pd.DataFrame(pool.map(_fit, [(parameters, i, args.deformation) for i in indices]))
    if args.csv:
        table.to_csv(args.csv, index=False)
    nuisance = "pose, ventricles and deformation" if args.deformation else "pose and ventricles"
    print(f"{len(table)} subjects of {args.split} (test part), "
          + ("the cohort's generator" if args.deformation else "the cohort's generator without the smooth deformation"))
    for label, column in (("bound, anatomy known", "bound_anatomy_known"), (f"bound, {nuisance} unknown", "bound_anatomy_unknown")):
        print(f"  {label:<62} mean {table[column].mean():.3f}")
    for label, column in (("maximum likelihood, anatomy known", "ml_anatomy_known"),
                          (f"MAP fit, {nuisance} unknown", "map_anatomy_unknown")):
        mae, lo, hi = _mae_interval((table[column] - table["true_severity"]).abs().to_numpy())
        print(f"  {label:<62} MAE  {mae:.3f} ({lo:.3f}-{hi:.3f})")
    print(f"  fits: {table['iterations'].median():.0f} iterations (median, most {table['iterations'].max()}), largest "
          f"pose error {table['pose_error_deg'].max():.3f} deg, translation {table['translation_error_mm'].max():.3f} mm")


if __name__ == "__main__":
    main()
