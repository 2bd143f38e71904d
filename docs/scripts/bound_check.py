"""Is the linearised bound of ``floor`` reachable? A nonlinear fit of the pose and the ventricles beside it.

``monai_mtl.floor.anatomy_unknown_mae`` is a Bayesian Cramer-Rao bound linearised around each subject's own draws.
A linearised bound can be optimistic where the image is not linear in the nuisance over the prior's range
(a pose off by degrees, not by the derivative's step), or where the posterior is not Gaussian. This script fits,
for each subject, the severity together with the ten global nuisance parameters (rotation 3, scale 3,
translation 3, ventricle size) by maximum a posteriori from the priors' means (what a model knows before
it reads the scan), on a noisy image drawn by the generator's noise model, and compares that estimator's
MAE with the bound on the same subjects. The smooth deformation (~6,400 columns) cannot be fitted this way,
so both run on the cohort's generator with the deformation left out (``warp_std_mm`` 0): the check covers the
global nuisance's part of the bound, not the deformation's.

    python docs/scripts/bound_check.py data/synthetic --split runs/cv/fold_0/split.json --subjects 60 --workers 2

Prints, over the subjects: the bound with the anatomy known and unknown, the maximum-likelihood severity with
the anatomy known (``monai_mtl.floor.estimate_severity``) and the MAP severity with the global nuisance unknown,
each MAE with a bootstrap 95% interval; ``--csv`` writes the per-subject table.
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
from scipy.optimize import least_squares

#: central-difference steps: severity points, radians, scale, mm, ventricle scale (the bound's own steps)
STEPS = np.array([0.5] + [1e-3] * 3 + [1e-3] * 3 + [0.05] * 3 + [1e-3])


def _fit(args: tuple[dict, int]) -> dict:
    from monai_mtl.floor import anatomy_unknown_mae, estimate_severity
    from monai_mtl.synthetic import anatomy_renderer, config_from_dict

    parameters, index = args
    config = dataclasses.replace(config_from_dict(parameters), warp_std_mm=0.0)
    subject, render = anatomy_renderer(config, index)
    clean = render(subject.severity).astype(np.float64)
    rng = np.random.default_rng(10_000 + index)  # the generator's noise model, drawn here (not the cohort's own draw)
    shift = rng.uniform(-config.intensity_shift, config.intensity_shift, size=clean.shape)
    image = clean * (1.0 + shift) + rng.normal(0.0, config.noise_std, size=clean.shape)
    # the noise's Gaussian approximation, its variance read from the image itself (an observer has no clean render)
    sqrt_weight = 1.0 / np.sqrt(config.noise_std**2 + (config.intensity_shift * image) ** 2 / 3.0)

    prior_mean = np.array([0.0] * 3 + [1.0] * 3 + [0.0] * 3 + [1.0])
    prior_std = np.array([math.radians(config.rotation_deg) / math.sqrt(3)] * 3 + [config.scale_range / math.sqrt(3)] * 3
                         + [config.translation_mm / math.sqrt(3)] * 3 + [config.ventricle_scale_std])

    def rendered(x: np.ndarray) -> np.ndarray:
        return render(float(x[0]), rotation_rad=x[1:4], scale=x[4:7], translation_mm=x[7:10],
                      ventricle_scale=float(x[10])).astype(np.float64).ravel()

    def residuals(x: np.ndarray) -> np.ndarray:
        return np.concatenate([(image.ravel() - rendered(x)) * sqrt_weight.ravel(), (x[1:] - prior_mean) / prior_std])

    def jacobian(x: np.ndarray) -> np.ndarray:
        columns = []
        for k, step in enumerate(STEPS):
            e = np.zeros_like(x)
            e[k] = step
            columns.append(-(rendered(x + e) - rendered(x - e)) / (2 * step) * sqrt_weight.ravel())
        image_part = np.stack(columns, axis=1)
        prior_part = np.zeros((10, 11))
        prior_part[:, 1:] = np.diag(1.0 / prior_std)
        return np.concatenate([image_part, prior_part])

    low, high = config.severity_ranges[subject.response]
    start = np.concatenate([[0.5 * (low + high)], prior_mean])  # the class's middle (a model reads the class first)
    fit = least_squares(residuals, start, jac=jacobian, x_scale=np.concatenate([[10.0], prior_std]), method="trf",
                        xtol=1e-10, ftol=1e-12, max_nfev=60)
    known, unknown = anatomy_unknown_mae(config, index)
    known_estimate = estimate_severity(image, lambda s: render(s), low, high, config.noise_std, config.intensity_shift)
    truth = np.concatenate([[subject.severity], subject.rotation_rad, subject.scale, subject.translation_mm,
                            [subject.ventricle_scale]])
    return {
        "index": index, "true_severity": subject.severity, "bound_anatomy_known": known, "bound_global_unknown": unknown,
        "ml_anatomy_known": known_estimate, "map_global_unknown": float(fit.x[0]), "fit_evaluations": int(fit.nfev),
        "fit_status": int(fit.status),
        "pose_error_deg": float(np.degrees(np.abs(fit.x[1:4] - truth[1:4])).max()),
        "translation_error_mm": float(np.abs(fit.x[7:10] - truth[7:10]).max()),
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
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--csv", type=Path, default=None)
    args = parser.parse_args()
    parameters = json.loads((args.dataset_dir / "cohort.json").read_text())["parameters"]
    indices = [int(s.rsplit("-", 1)[1]) for s in json.loads(args.split.read_text())["test"][: args.subjects]]
    with ProcessPoolExecutor(max_workers=args.workers) as pool:
        table = pd.DataFrame(pool.map(_fit, [(parameters, i) for i in indices]))
    if args.csv:
        table.to_csv(args.csv, index=False)
    print(f"{len(table)} subjects of {args.split} (test part), the cohort's generator without the smooth deformation")
    for label, column in (("bound, anatomy known", "bound_anatomy_known"),
                          ("bound, pose and ventricles unknown", "bound_global_unknown")):
        print(f"  {label:<62} mean {table[column].mean():.3f}")
    for label, column in (("maximum likelihood, anatomy known", "ml_anatomy_known"),
                          ("MAP fit, pose and ventricles unknown (from the priors' means)", "map_global_unknown")):
        mae, lo, hi = _mae_interval((table[column] - table["true_severity"]).abs().to_numpy())
        print(f"  {label:<62} MAE  {mae:.3f} ({lo:.3f}-{hi:.3f})")
    print(f"  fits: {table['fit_evaluations'].median():.0f} evaluations (median), status {sorted(set(table['fit_status']))}, "
          f"largest pose error {table['pose_error_deg'].max():.3f} deg, translation {table['translation_error_mm'].max():.3f} mm")


if __name__ == "__main__":
    main()
