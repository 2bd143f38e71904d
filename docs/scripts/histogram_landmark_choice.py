"""Which voxels ``histogram`` standardisation should take its percentiles from: the choice behind
``monai_mtl.transforms.HISTOGRAM_PERCENTILES``.

Renders noise-free phantoms, gives each the Rician noise and contrast of the multi-site cohort's sites, and prints, for
each candidate set of percentiles (and the z-score), the mean |shift| of every atlas region's mean intensity after
normalisation against the same phantom with Rician noise 0.02, as a share of the tissue's spread. docs/experiments.md,
"Several scanners", quotes its output.

    python docs/scripts/histogram_landmark_choice.py
"""

from __future__ import annotations

import numpy as np
import torch

import monai_mtl.transforms as transforms
from monai_mtl.artifacts import gamma_contrast, rician_noise
from monai_mtl.synthetic import CohortConfig, render_atlas, render_subject

CANDIDATES = {
    "median + deciles of the brightest quarter": (50.0, 75.25, 77.5, 80.0, 82.5, 85.0, 87.5, 90.0, 92.5, 95.0, 97.5, 99.75),
    "deciles of the brightest half": (50.5, 55.0, 60.0, 65.0, 70.0, 75.0, 80.0, 85.0, 90.0, 95.0, 99.5),
    "deciles of the brightest 40% (the default)": transforms.HISTOGRAM_PERCENTILES,
}
#: (gamma, Rician std) of the sites of ``generate --sites 4 --seed 42`` (data/sites4/cohort.json), and noise alone
CONDITIONS = ((1.0, 0.033), (0.89, 0.033), (1.19, 0.019), (1.13, 0.023))


def region_shifts(percentiles: tuple[float, ...] | None, subjects: int = 3, seed: int = 0) -> np.ndarray:
    """``(subjects * conditions, regions)``: |shift| of each region's mean, a share of the tissue's spread."""
    config = CohortConfig(num_samples=subjects, seed=1, noise_std=0.0, intensity_shift=0.0)
    atlas = render_atlas(config)
    rng = np.random.default_rng(seed)
    original = transforms.HISTOGRAM_PERCENTILES
    transforms.HISTOGRAM_PERCENTILES = percentiles or original
    try:
        shifts = []
        for index in range(subjects):
            image = render_subject(config, index)[1]
            reference = torch.as_tensor(rician_noise(image, 0.02, rng))[None, None]
            if percentiles is None:
                prep = transforms.Preprocessing()
            else:
                marks = transforms.histogram_landmarks(reference)[0]
                landmarks = tuple(float(v) for v in (marks - marks[0]) / (marks[-1] - marks[0]))
                prep = transforms.Preprocessing(intensity="histogram", landmarks=landmarks)
            base = prep.normalize_batch(reference)[0, 0].numpy()
            spread = base[atlas > 0].std()
            for gamma, noise in CONDITIONS:
                scan = torch.as_tensor(rician_noise(gamma_contrast(image, gamma), noise, rng))[None, None]
                out = prep.normalize_batch(scan)[0, 0].numpy()
                shifts.append([abs(out[atlas == r].mean() - base[atlas == r].mean()) / spread for r in range(1, 10)])
        return np.asarray(shifts)
    finally:
        transforms.HISTOGRAM_PERCENTILES = original


def main() -> None:
    rows = {"z-score": region_shifts(None)}
    rows.update({name: region_shifts(percentiles) for name, percentiles in CANDIDATES.items()})
    for name, shifts in rows.items():
        print(f"{name:45s} mean |shift| {shifts.mean():.3f}  per region (atlas labels 1-9) {np.round(shifts.mean(0), 3)}")


if __name__ == "__main__":
    main()
