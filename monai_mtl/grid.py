"""The paper's hyper-parameter grid as independent bundle runs, ranked by validation loss.

The grid is learning rate x focal alpha x focal gamma x clip norm (3 x 2 x 2 x 3 = 36 trials). Trial
``i`` is always the same point (row-major order of :data:`PAPER_GRID`), so ``--trial i`` shards the
grid across machines and a later call without ``--trial`` only collects: a trial whose
``test_metrics.json`` exists is not rerun. Trials are ranked by their lowest validation loss; the
test part plays no role in the ranking (its metrics are not even read).
"""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import pandas as pd

from monai_mtl.io import atomic_write_csv, atomic_write_text
from monai_mtl.run_folder import RunLock
from monai_mtl.runs import DEFAULT_CONFIG, RunRequest, run_trainings

logger = logging.getLogger(__name__)

# bundle key -> values (SPEC: lr {1e-3, 5e-4, 1e-4} x alpha {0.25, 0.5} x gamma {1.5, 2.0} x clipnorm {0.5, 1.0, 2.0})
PAPER_GRID: dict[str, tuple[float, ...]] = {
    "learning_rate": (1e-3, 5e-4, 1e-4),
    "focal_alpha": (0.25, 0.5),
    "focal_gamma": (1.5, 2.0),
    "grad_clip_norm": (0.5, 1.0, 2.0),
}
SHORT_NAMES = {"learning_rate": "lr", "focal_alpha": "a", "focal_gamma": "g", "grad_clip_norm": "clip"}


def grid_points(grid: Mapping[str, Sequence[float]] = PAPER_GRID) -> list[dict[str, float]]:
    """Every combination of ``grid``'s values, in row-major order (the last key varies fastest)."""
    keys = list(grid)
    return [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]


def trial_dir(output_dir: str | os.PathLike, index: int, point: Mapping[str, float]) -> Path:
    name = "_".join(f"{SHORT_NAMES.get(k, k)}{v:g}" for k, v in point.items())
    return Path(output_dir) / f"trial_{index:02d}_{name}"


def trial_validation(run_dir: Path) -> dict[str, float] | None:
    """Lowest validation loss of a finished trial, with its epoch and the validation accuracy/MAE there."""
    from monai_mtl.crossval import validation_at
    from monai_mtl.evaluation import read_scalars

    if not (run_dir / "test_metrics.json").is_file():
        return None
    scalars = read_scalars(run_dir / "tensorboard")
    losses = dict(scalars.get("val_loss", []))
    if not losses:
        raise RuntimeError(f"{run_dir}: finished but its TensorBoard log has no val_loss")
    epoch = min(losses, key=losses.get)
    return {"best_val_loss": losses[epoch], "best_epoch": epoch, "epochs_run": max(losses), **validation_at(scalars, epoch)}


def collect(output_dir: str | os.PathLike, points: Sequence[Mapping[str, float]]) -> pd.DataFrame:
    """Rank the finished trials by validation loss into ``grid_results.csv`` and ``grid_results.md``."""
    rows = []
    for index, point in enumerate(points):
        result = trial_validation(trial_dir(output_dir, index, point))
        if result is not None:
            rows.append({"trial": index, **point, **result})
    table = pd.DataFrame(rows)
    if table.empty:
        logger.info("no finished grid trial in %s yet", output_dir)
        return table
    table = table.sort_values(["best_val_loss", "trial"]).reset_index(drop=True)
    table.insert(0, "rank", range(1, len(table) + 1))
    output_dir = Path(output_dir)
    atomic_write_csv(output_dir / "grid_results.csv", table)
    atomic_write_text(
        output_dir / "grid_results.md",
        f"{len(table)} of {len(points)} trials finished; ranked by lowest validation loss.\n\n"
        + table.to_markdown(index=False, floatfmt=".4g") + "\n",
    )
    best = table.iloc[0]
    logger.info("grid: best of %d finished trials is trial %d (%s), validation loss %.4f at epoch %d",
                len(table), best["trial"], {k: best[k] for k in points[0]}, best["best_val_loss"], best["best_epoch"])
    return table


def run_grid(
    dataset_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    trials: Sequence[int] | None = None,
    grid: Mapping[str, Sequence[float]] = PAPER_GRID,
    config_files: Sequence[str] = (DEFAULT_CONFIG,),
    overrides: Mapping[str, object] | None = None,
    overwrite: bool = False,
    jobs: int = 1,
) -> pd.DataFrame:
    """Run the given trials (default: all) of ``grid``, ``jobs`` at a time, then rank every finished trial.

    A finished trial is reused only when its stored settings equal the requested ones (see
    :func:`~monai_mtl.runs.run_training`); the output folder is locked while this runs.

    Raises:
        ValueError: a trial index outside the grid.
    """
    points = grid_points(grid)
    selected = list(range(len(points))) if trials is None else list(trials)
    bad = [i for i in selected if not 0 <= i < len(points)]
    if bad:
        raise ValueError(f"trial index {bad} is out of range: the grid has {len(points)} trials (0 to {len(points) - 1})")
    with RunLock(output_dir):
        logger.info("grid trials %s of %d", selected, len(points))
        run_trainings([RunRequest(config_files, dataset_dir, trial_dir(output_dir, i, points[i]),
                                  {**(overrides or {}), **points[i]}, overwrite) for i in selected], jobs)
        return collect(output_dir, points)


__all__ = ["PAPER_GRID", "grid_points", "trial_dir", "trial_validation", "collect", "run_grid"]
