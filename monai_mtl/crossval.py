"""Stratified k-fold cross-validation with the bundle's training config: one bundle run per fold, then a summary.

Each fold is an ordinary ``python -m monai.bundle run training`` in its own process with
``--num_folds K --fold i`` and ``--output_dir <output>/fold_<i>``: its test part is fold ``i``, its
validation part comes from the other folds, and it leaves the usual ``test_metrics.json``. A fold
whose ``test_metrics.json`` exists is not rerun, so ``--fold i`` can run folds as separate jobs on
a cluster and a later call only collects them.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from monai_mtl.checkpoints import check_no_leakage
from monai_mtl.errors import CohortError
from monai_mtl.io import atomic_write_csv, atomic_write_json, atomic_write_text
from monai_mtl.run_folder import RunLock, read_run_cohort
from monai_mtl.runs import DEFAULT_CONFIG, RunRequest, run_trainings

logger = logging.getLogger(__name__)

SUMMARY_METRICS = ("accuracy", "balanced_accuracy", "severity_mae", "severity_rmse", "severity_r2")
#: trust metrics of calibrated folds (``test_metrics.json`` key ``trust``, see :func:`monai_mtl.trust.trust_report`)
TRUST_METRICS = (
    "ece_before", "ece_after", "severity_coverage", "severity_mean_width", "class_set_coverage", "class_mean_set_size",
    "ood_flagged_fraction",
)


#: the validation part's figures at the checkpoint's epoch (from the fold's TensorBoard log): what a choice between
#: configurations compared by CV may look at, since the test figures may not pick a model
VALIDATION_METRICS = ("val_accuracy", "val_severity_mae")


def validation_at(scalars: dict[str, list[tuple[int, float]]], epoch: int | None) -> dict[str, float]:
    """:data:`VALIDATION_METRICS` of a run's TensorBoard ``scalars`` (:func:`~monai_mtl.evaluation.read_scalars`) at ``epoch`` (NaN if not logged)."""
    return {tag: dict(scalars.get(tag, [])).get(epoch, float("nan")) for tag in VALIDATION_METRICS}


def checkpoint_validation(run_dir: str | os.PathLike) -> dict[str, float]:
    """:data:`VALIDATION_METRICS` at the epoch ``run_dir/model.pt`` was saved at; empty if the run logged none."""
    from monai_mtl.checkpoints import read_run_metadata
    from monai_mtl.evaluation import read_scalars

    run_dir = Path(run_dir)
    if not (run_dir / "model.pt").is_file() or not (run_dir / "tensorboard").is_dir():
        return {}
    epoch = read_run_metadata(run_dir / "model.pt").get("epoch")
    values = validation_at(read_scalars(run_dir / "tensorboard"), epoch)
    return {tag: value for tag, value in values.items() if value == value}  # NaN: not logged at that epoch


def fold_dir(output_dir: str | os.PathLike, fold: int) -> Path:
    return Path(output_dir) / f"fold_{fold}"


def fold_request(
    fold: int, num_folds: int, dataset_dir: str | os.PathLike, output_dir: str | os.PathLike,
    config_files: Sequence[str] = (DEFAULT_CONFIG,), overrides: dict | None = None, overwrite: bool = False,
) -> RunRequest:
    """The child run of fold ``fold``: the bundle's training with ``num_folds`` / ``fold`` set, in ``fold_<fold>/``."""
    if not 0 <= fold < num_folds:
        raise ValueError(f"fold {fold} is out of range for {num_folds} folds (0 to {num_folds - 1})")
    return RunRequest(config_files, dataset_dir, fold_dir(output_dir, fold),
                      {"num_folds": num_folds, "fold": fold, **(overrides or {})}, overwrite)


def check_partition(output_dir: str | os.PathLike, num_folds: int, dataset_dir: str | os.PathLike | None = None) -> None:
    """Refuse fold folders whose test parts are not the ``num_folds``-fold partition of the cohort.

    Each fold's ``split.json`` must say it is fold ``i`` of ``num_folds``; the test parts must be
    disjoint and, with ``dataset_dir``, cover every subject of the cohort as the folds' training read it.

    Raises:
        CohortError: naming the fold or the subjects that break the partition.
    """
    tests: list[set[str]] = []
    for fold in range(num_folds):
        split_file = fold_dir(output_dir, fold) / "split.json"
        split = json.loads(split_file.read_text()) if split_file.is_file() else {}
        settings = split.get("settings", {})
        if (settings.get("num_folds"), settings.get("fold")) != (num_folds, fold):
            raise CohortError(
                f"{split_file} is fold {settings.get('fold')} of {settings.get('num_folds')}, not fold {fold} of {num_folds}: "
                "the folds do not partition the cohort (rerun with --overwrite, or use another output folder)"
            )
        tests.append(set(split["test"]))
    union = set().union(*tests)
    if sum(map(len, tests)) != len(union):
        raise CohortError(f"the test parts of the folds in {output_dir} overlap: they do not partition the cohort")
    if dataset_dir is not None:
        cohort = set(read_run_cohort(fold_dir(output_dir, 0), dataset_dir)["subject_id"])  # its label columns, session
        if union != cohort:
            raise CohortError(
                f"the folds in {output_dir} test {len(union)} subjects, the cohort in {dataset_dir} has {len(cohort)} "
                f"({len(cohort - union)} never tested, {len(union - cohort)} not in it): they do not partition it"
            )


def summarize(
    output_dir: str | os.PathLike, num_folds: int, allow_overlap: bool = False, dataset_dir: str | os.PathLike | None = None
) -> dict:
    """Collect the folds' ``test_metrics.json`` into ``cv_folds.csv``, ``cv_summary.json`` and ``cv_summary.md``.

    Each fold's tested subjects are checked against the split stored in its checkpoint, so a fold
    folder copied from another run or split cannot slip biased metrics into the summary.

    Raises:
        FileNotFoundError: a fold has not finished yet (its name is given).
        LeakageError: a fold tested subjects its checkpoint was trained or validated on.
        CohortError: the folds do not partition the cohort (:func:`check_partition`, when their splits are there).
    """
    output_dir = Path(output_dir)
    if all((fold_dir(output_dir, i) / "split.json").is_file() for i in range(num_folds)):
        check_partition(output_dir, num_folds, dataset_dir)
    rows = []
    for fold in range(num_folds):
        path = fold_dir(output_dir, fold) / "test_metrics.json"
        if not path.is_file():
            raise FileNotFoundError(f"fold {fold} has not finished: no {path}")
        metrics = json.loads(path.read_text())
        predictions, checkpoint = path.with_name("test_predictions.csv"), path.with_name("model.pt")
        if predictions.is_file() and checkpoint.is_file():
            tested = pd.read_csv(predictions, dtype={"subject_id": str})["subject_id"]
            check_no_leakage(checkpoint, tested.tolist(), allow_overlap)
        else:
            logger.warning("fold %d: no test_predictions.csv or model.pt, cannot check it for leakage", fold)
        trust = {k: metrics.get("trust", {}).get(k) for k in TRUST_METRICS if k in metrics.get("trust", {})}
        rows.append({"fold": fold, "n": metrics["n"], **{k: metrics[k] for k in SUMMARY_METRICS}, **trust,
                     **checkpoint_validation(path.parent)})
    folds = pd.DataFrame(rows)
    # coverage, interval width, set size... of folds whose checkpoints were calibrated (monai_mtl.trust), and the
    # validation figures where every fold logged them
    summarized = [*SUMMARY_METRICS, *(k for k in (*TRUST_METRICS, *VALIDATION_METRICS) if k in folds and folds[k].notna().all())]
    summary = {
        "num_folds": num_folds,
        "n": int(folds["n"].sum()),
        **{k: {"mean": float(folds[k].mean()), "std": float(folds[k].std(ddof=1)) if num_folds > 1 else 0.0,
               "min": float(folds[k].min()), "max": float(folds[k].max())} for k in summarized},
    }
    atomic_write_csv(output_dir / "cv_folds.csv", folds)
    atomic_write_json(output_dir / "cv_summary.json", summary)
    lines = ["| metric | mean ± std | min | max |", "|---|---|---|---|"]
    lines += [f"| {k} | {summary[k]['mean']:.4f} ± {summary[k]['std']:.4f} | {summary[k]['min']:.4f} | {summary[k]['max']:.4f} |"
              for k in summarized]
    atomic_write_text(output_dir / "cv_summary.md", "\n".join(lines) + "\n")
    logger.info("cross-validation (%d folds): accuracy %.4f ± %.4f, severity MAE %.2f ± %.2f", num_folds,
                summary["accuracy"]["mean"], summary["accuracy"]["std"],
                summary["severity_mae"]["mean"], summary["severity_mae"]["std"])
    return summary


def cross_validate(
    num_folds: int,
    dataset_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    fold: int | None = None,
    config_files: Sequence[str] = (DEFAULT_CONFIG,),
    overrides: dict | None = None,
    allow_overlap: bool = False,
    overwrite: bool = False,
    jobs: int = 1,
    threads: int | None = None,
) -> dict | None:
    """Run every fold (or only ``fold``), ``jobs`` at a time, and summarize once all folds have finished.

    The output folder is locked while this runs (each fold's own folder too, by its run). ``jobs`` and
    ``threads``: see :func:`~monai_mtl.runs.run_trainings`.
    """
    if num_folds < 2:
        raise ValueError(f"cross-validation needs at least 2 folds, got {num_folds}")
    if fold is not None and not 0 <= fold < num_folds:
        raise ValueError(f"fold {fold} is out of range for {num_folds} folds (0 to {num_folds - 1})")
    with RunLock(output_dir):
        run_trainings([fold_request(i, num_folds, dataset_dir, output_dir, config_files, overrides, overwrite)
                       for i in ([fold] if fold is not None else range(num_folds))], jobs, threads)
        done = [i for i in range(num_folds) if (fold_dir(output_dir, i) / "test_metrics.json").is_file()]
        if len(done) < num_folds:
            logger.info("folds finished: %s of %d; the summary is written once all have finished", done, num_folds)
            return None
        return summarize(output_dir, num_folds, allow_overlap, dataset_dir)


__all__ = ["SUMMARY_METRICS", "TRUST_METRICS", "VALIDATION_METRICS", "validation_at", "checkpoint_validation", "fold_request", "check_partition", "summarize",
           "cross_validate", "fold_dir"]
