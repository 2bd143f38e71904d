"""Every published figure, generated from the runs' outputs and TensorBoard logs (never typed by hand).

``python -m monai_mtl results`` reads the reference training run, the cross-validation summary and
the baselines' ``test_metrics.json``, and writes a markdown table (paper vs ours vs each baseline)
with each row's command, seed, epochs and training wall time. With ``--readme README.md`` it
replaces the generated blocks of the README (``<!-- NAME:start -->`` ... ``<!-- NAME:end -->``):
``results`` (that table), ``robustness`` (the artifact sweep of the default model beside the paper
preset), ``leave-site-out``, ``trust`` (calibration and conformal coverage), ``ood`` (the OOD flag per
kind of scan) and ``cv-comparison`` (the default model's CV beside other recipes' and the single-task
models' on the same folds, paired by fold; also written to ``docs/results/cv_comparison.md``); a block
whose runs are missing is left as it is. With ``--bundle
bundle`` it also writes the ``results`` block of ``bundle/docs/README.md`` and the ``eval_metrics``
of ``bundle/configs/metadata.json``.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from monai_mtl.io import atomic_write, atomic_write_json, atomic_write_text

logger = logging.getLogger(__name__)

START, END = "<!-- results:start -->", "<!-- results:end -->"
PAPER_PRESET_COMMAND = (
    "`python -m monai.bundle run training --config_file \"['bundle/configs/train.json','bundle/configs/paper.json']\" "
    "--output_dir runs/paper_preset`"
)

# the paper's reported figures (SPEC / paper: test accuracy 100%, MAE 8.03; 5-fold CV > 99%, MAE 7.9-8.4)
PAPER_ROW = ("paper (de Filippis & Al Foysal 2025), dual-path 3D CNN", "—", "100%", "8.03", "> 99%", "7.9–8.4", "—", "—")


@dataclass(frozen=True)
class Row:
    """One model of the table: where its run is, the command that made it, and which tasks it was trained for."""

    label: str
    run_dir: str
    command: str
    tasks: tuple[str, ...] = ("response", "severity")
    accuracy_note: str = "not trained"  # why the accuracy cell is empty when "response" is not a trained task


DEFAULT_ROWS = (
    Row("**ours**: `DualPathNet` multi-task", "runs/train",
        "`python -m monai.bundle run training --config_file bundle/configs/train.json`"),
    Row("ours with the paper's recipe (`paper.json`: its preprocessing, augmentation and MSE loss)", "runs/paper_preset", PAPER_PRESET_COMMAND),
    Row("single-task CNN, response only (same encoder)", "runs/baselines/single-task-response",
        "`python -m monai_mtl baseline --kind single-task-response`", ("response",)),
    Row("single-task CNN, severity only (same encoder)", "runs/baselines/single-task-severity",
        "`python -m monai_mtl baseline --kind single-task-severity`", ("severity",)),
    Row("MONAI 3D ResNet-18, two heads", "runs/baselines/resnet18",
        "`python -m monai_mtl baseline --kind resnet18`"),
    Row("class-median severity (true class given; no imaging)", "runs/baselines/class-median",
        "`python -m monai_mtl baseline --kind class-median`", ("severity",), "true class given"),
    Row("scikit-learn on atlas-region intensities", "runs/baselines/classical",
        "`python -m monai_mtl baseline --kind classical`"),
)


def run_timing(run_dir: Path) -> dict:
    """Epochs run, the epoch ``model.pt`` holds (the best validation score's where it has no record) and training wall
    time, from a run's TensorBoard event timestamps."""
    from monai_mtl.checkpoints import read_run_metadata
    from monai_mtl.evaluation import read_scalar_events

    log_dir = run_dir / "tensorboard"
    if not log_dir.is_dir():
        return {}
    events = read_scalar_events(log_dir)
    times = [e.wall_time for tag_events in events.values() for e in tag_events]
    score = {e.step: e.value for e in events.get("val_score", [])}
    return {
        "epochs": max(score) if score else None,
        "model_epoch": (read_run_metadata(run_dir / "model.pt").get("epoch") if (run_dir / "model.pt").is_file() else None)
        or (max(score, key=score.get) if score else None),
        "wall_seconds": max(times) - min(times) if times else None,
        "span": (min(times), max(times)) if times else None,
    }


def busy_seconds(spans: Sequence[tuple[float, float] | None]) -> float:
    """Seconds during which at least one of ``spans`` (start, end) was running: runs side by side (``cv --jobs 2``)
    count once, so a CV's training time is its wall time however its folds were scheduled.

    Example:
        >>> busy_seconds([(0, 10), (5, 12), (20, 25), None])
        17.0
    """
    total, end = 0.0, float("-inf")
    for start, stop in sorted(span for span in spans if span is not None):
        if stop > end:
            total += stop - max(start, end)
            end = stop
    return total


def _minutes(seconds: float | None) -> str:
    return "—" if seconds is None else f"{seconds / 60:.1f} min"


def _model_row(row: Row, root: Path) -> tuple[str, ...] | None:
    run_dir = root / row.run_dir
    metrics_file = run_dir / "test_metrics.json"
    if not metrics_file.is_file():
        return None
    metrics = json.loads(metrics_file.read_text())
    # runs of older versions have bootstrap intervals only in the evaluate workflow's metrics.json
    evaluated = run_dir / "metrics.json"
    interval = metrics.get("bootstrap_95") or (json.loads(evaluated.read_text()).get("bootstrap_95", {}) if evaluated.is_file() else {})
    accuracy = f"{100 * metrics['accuracy']:.1f}%"
    mae = f"{metrics['severity_mae']:.2f}"
    if "severity_mae" in interval:
        low, high = interval["severity_mae"]
        mae += f" ({low:.2f}–{high:.2f})"
    if "response" not in row.tasks:
        accuracy = f"— ({row.accuracy_note})"
    if "severity" not in row.tasks:
        mae = "— (not trained)"
    timing = run_timing(run_dir)
    epochs = f"{timing['epochs']} (model {timing['model_epoch']})" if timing.get("epochs") else "—"
    return (row.label, row.command, accuracy, mae, "—", "—", epochs, _minutes(timing.get("wall_seconds")))


FLOOR_LABEL = "information limit: an observer who knows everything but the noise"
FLOOR_ANATOMY_LABEL = ("information limit of a model: an observer who must also read the anatomy (pose, size, "
                       "deformation) from the scan (Cramér–Rao)")


def _floor_rows(root: Path, run_dir: str) -> list[str] | None:
    # the information limits on the reference run's test part (python -m monai_mtl floor), when they were computed;
    # a floor.json made before the anatomy-unknown bound gives the first row only
    floor_file = root / run_dir / "floor.json"
    if not floor_file.is_file():
        return None
    floor = json.loads(floor_file.read_text())
    command = f"`python -m monai_mtl floor --split {run_dir}/split.json`"
    rows = [(FLOOR_LABEL, floor["severity_mae"], floor["bootstrap_95"])]
    if "severity_mae_anatomy_unknown" in floor:
        rows.append((FLOOR_ANATOMY_LABEL, floor["severity_mae_anatomy_unknown"], floor["anatomy_unknown_bootstrap_95"]))
    return ["| " + " | ".join((label, command, "—", f"{mae:.2f} ({low:.2f}–{high:.2f})", "—", "—", "—", "—")) + " |"
            for label, mae, (low, high) in rows]


def _training_settings(run_dir: Path) -> dict | None:
    # a run's hyper-parameters (the config's top-level keys, the ones users override) and its epochs, without
    # the split's own settings, in which a CV fold differs from the reference run by design
    settings_file = run_dir / "run_settings.json"
    if not settings_file.is_file():
        return None
    settings = json.loads(settings_file.read_text())
    config = {k: v for k, v in settings.get("config", {}).items() if "#" not in k}
    for key in ("num_folds", "fold", "test_fraction", "held_out_site"):
        config.pop(key, None)
    return {**config, "max_epochs": settings.get("max_epochs")}


def _cv_cells(cv_dir: Path, reference: Path | None = None) -> tuple[str, str, str] | None:
    summary_file = cv_dir / "cv_summary.json"
    if not summary_file.is_file():
        return None
    summary = json.loads(summary_file.read_text())
    folds = [cv_dir / f"fold_{i}" for i in range(summary["num_folds"])]
    if reference is not None and _training_settings(folds[0]) != _training_settings(reference):
        logger.warning("%s was trained with other settings than %s: its CV figures are left out", cv_dir, reference)
        return None
    wall = busy_seconds([run_timing(f).get("span") for f in folds])
    accuracy = f"{100 * summary['accuracy']['mean']:.1f}% ± {100 * summary['accuracy']['std']:.1f}"
    mae = f"{summary['severity_mae']['mean']:.2f} ± {summary['severity_mae']['std']:.2f}"
    return accuracy, mae, _minutes(wall)


@dataclass(frozen=True)
class CvComparison:
    """A cross-validation compared fold by fold with the default model's (the same folds, other config files)."""

    label: str
    cv_dir: str
    config_files: tuple[str, ...]
    tasks: tuple[str, ...] = ("response", "severity")
    #: the command that makes ``cv_dir``, when it is not ``cv`` with ``config_files`` (e.g. a baseline on every fold)
    make: str | None = None
    #: the cohort the CV ran on (named in the information limit's command)
    dataset_dir: str = "data/synthetic"

    @property
    def command(self) -> str:
        return self.make or (f"`python -m monai_mtl cv --folds 5 --config-file {' '.join(self.config_files)} "
                             f"--output-dir {self.cv_dir}`")


CV_COMPARISONS = (
    CvComparison("the paper's recipe (`paper.json`)", "runs/cv_paper",
                 ("bundle/configs/train.json", "bundle/configs/paper.json")),
    CvComparison("single-task CNN, response only", "runs/cv_single_task_response",
                 ("bundle/configs/train.json", "bundle/configs/baselines/single_task_response.json"), ("response",)),
    CvComparison("single-task CNN, severity only", "runs/cv_single_task_severity",
                 ("bundle/configs/train.json", "bundle/configs/baselines/single_task_severity.json"), ("severity",)),
    CvComparison("MONAI 3D ResNet-18, two heads", "runs/cv_resnet18",
                 ("bundle/configs/train.json", "bundle/configs/baselines/resnet18.json")),
)


#: the fused model's CV on the multimodal cohort (``generate --covariates``), compared with each modality alone
MULTIMODAL_REFERENCE = CvComparison(
    "**fused**: imaging + covariates (`multimodal.json`: concatenation, count steps, 60 epochs)", "runs/cv_multimodal",
    ("bundle/configs/train.json", "bundle/configs/multimodal.json"),
    make="`python -m monai_mtl cv --folds 5 --config-file bundle/configs/train.json bundle/configs/multimodal.json "
         "--dataset-dir data/multimodal --output-dir runs/cv_multimodal`", dataset_dir="data/multimodal")
#: (the 30-epoch and FiLM variants were measured with an earlier recipe: docs/experiments.md, not in this table)
MULTIMODAL_COMPARISONS = (
    # the imaging-only model trained as the fused one is: the default's schedule, task weighting, final batch-norm
    # statistics, final epoch and moves at prediction, the fused recipe's 60 epochs and nearest down-sampling at 0.2
    # (multimodal.json sets them), so that the covariates are the one difference left (at the default's 30 epochs its
    # severity was 0.26 worse: docs/experiments.md); and the L1 severity with one task block each, which the fused
    # recipe pins since train.json moved to the bins with task blocks (session 29)
    CvComparison("imaging only (`train.json` with the fused model's 60 epochs, `nearest` down-sampling, L1 severity)",
                 "runs/cv_multimodal_imaging_only", ("bundle/configs/train.json",),
                 make="`python -m monai_mtl cv --folds 5 --dataset-dir data/multimodal --output-dir runs/cv_multimodal_imaging_only "
                      "--override scanner_augmentation#downsample_mode=nearest scanner_augmentation#low_resolution_prob=0.2 "
                      "max_epochs=60 severity_loss=l1 severity_bins=0 severity_bin_sigma=2.0 network_def#task_blocks=1`"),
    CvComparison("imaging only, scikit-learn on atlas regions", "runs/cv_multimodal_classical", (),
                 make="`python -m monai_mtl baseline --kind classical --dataset-dir data/multimodal --split runs/cv_multimodal`"),
    CvComparison("covariates only (scikit-learn, no imaging)", "runs/cv_multimodal_covariates_only", (),
                 make="`python -m monai_mtl baseline --kind covariates-only --dataset-dir data/multimodal --split runs/cv_multimodal`"),
)
DEFAULT_REFERENCE = CvComparison("**ours** (default)", "runs/cv", ("bundle/configs/train.json",),
                                 make="`python -m monai_mtl cv --folds 5`")


def _fold_tests(cv_dir: Path, num_folds: int) -> list[list[str]] | None:
    """Each fold's tested subjects (sorted): from its ``split.json``, or, for a scikit-learn baseline's fold, its predictions."""
    tests = []
    for fold in (cv_dir / f"fold_{i}" for i in range(num_folds)):
        if (fold / "split.json").is_file():
            tests.append(sorted(json.loads((fold / "split.json").read_text())["test"]))
        elif (fold / "test_predictions.csv").is_file():
            tests.append(sorted(pd.read_csv(fold / "test_predictions.csv", dtype={"subject_id": str})["subject_id"]))
        else:
            return None
    return tests


def _cv_limit_row(root: Path, reference: CvComparison, ours: pd.DataFrame, spread: Callable[..., str]) -> str | None:
    """The information limit on each fold's test part (``floor`` run on the CV folder), when every fold has it."""
    files = [root / reference.cv_dir / f"fold_{int(fold)}" / "floor.json" for fold in ours["fold"]]
    if not all(f.is_file() for f in files):
        return None
    floors = [json.loads(f.read_text()) for f in files]
    if not all("response_accuracy_limit" in floor for floor in floors):
        return None
    accuracy = pd.Series([floor["response_accuracy_limit"] for floor in floors])
    difference = ours["accuracy"].reset_index(drop=True) - accuracy
    has_mae = all("severity_mae" in floor for floor in floors)
    mae = spread(pd.Series([floor["severity_mae"] for floor in floors])) if has_mae else "—"
    command = (f"`python -m monai_mtl floor --dataset-dir {reference.dataset_dir} --split {reference.cv_dir}"
               f"{'' if has_mae else ' --response-only'}`")
    return ("| information limit: an observer who knows the class the scan shows and the covariates' rule "
            f"(a missing genotype hides a few) | {command} | {spread(accuracy, True)} | {mae} | {spread(difference, True)} | |")


def cv_comparison_table(root: str | os.PathLike = ".", reference: CvComparison = DEFAULT_REFERENCE,
                        comparisons: tuple[CvComparison, ...] = CV_COMPARISONS, cohort: str = "") -> str | None:
    """The ``reference`` CV (default: the default model's) beside each finished comparison CV of the same folds,
    with paired per-fold differences.

    A difference is the reference's figure minus the other's, per fold (accuracy: positive favours
    the reference; MAE: negative favours it); ``k/5`` counts the folds where the reference is at least as good.
    """
    root = Path(root)
    label, reference = reference, reference.cv_dir
    folds_file = root / reference / "cv_folds.csv"
    if not folds_file.is_file():
        return None
    ours = pd.read_csv(folds_file).sort_values("fold").reset_index(drop=True)
    tests = _fold_tests(root / reference, len(ours))

    def spread(values: pd.Series, percent: bool = False) -> str:
        scale, unit, digits = (100.0, "%", 1) if percent else (1.0, "", 2)
        return f"{scale * values.mean():.{digits}f}{unit} ± {scale * values.std(ddof=1):.{digits}f}"

    lines = ["| model | command | CV accuracy | CV severity MAE | ours − it: accuracy (folds ours ≥) "
             "| ours − it: MAE (folds ours ≤) |", "|---|---|---|---|---|---|",
             f"| {label.label} | {label.command} | {spread(ours['accuracy'], True)} "
             f"| {spread(ours['severity_mae'])} | | |"]
    found = 0
    for comparison in comparisons:
        other_file = root / comparison.cv_dir / "cv_folds.csv"
        if not other_file.is_file():
            continue
        other = pd.read_csv(other_file).sort_values("fold").reset_index(drop=True)
        if len(other) != len(ours) or _fold_tests(root / comparison.cv_dir, len(other)) != tests:
            logger.warning("%s was not run on the folds of %s: left out of the comparison", comparison.cv_dir, reference)
            continue
        found += 1
        cells = []
        for task, column, percent, better in (("response", "accuracy", True, lambda d: d >= 0),
                                              ("severity", "severity_mae", False, lambda d: d <= 0)):
            if task not in comparison.tasks:
                cells += ["— (not trained)", "—"]
                continue
            difference = ours[column] - other[column]
            cells += [spread(other[column], percent),
                      f"{spread(difference, percent)} ({int(better(difference).sum())}/{len(difference)})"]
        lines.append(f"| {comparison.label} | {comparison.command} | {cells[0]} | {cells[2]} | {cells[1]} | {cells[3]} |")
    if not found:
        return None
    limit = _cv_limit_row(root, label, ours, spread)
    if limit is not None:
        lines.append(limit)
    return (f"Generated by `python -m monai_mtl results --readme README.md` from `{reference}/cv_folds.csv` and each "
            f"compared CV's{cohort}; every CV on the same five folds (split seed 42), differences paired by fold "
            "(\"ours\": the first row).\n\n"
            + "\n".join(lines) + "\n")


def _table_rows(block: str) -> dict[str, str]:
    """The body rows of a generated markdown table by their first cell (a model's label): label -> the row's line."""
    lines = [line for line in block.splitlines() if line.startswith("|")]
    return {line.strip().strip("|").split("|")[0].strip(): line for line in lines[2:]}


def results_table(root: str | os.PathLike = ".", rows: tuple[Row, ...] = DEFAULT_ROWS, cv_dir: str = "runs/cv",
                  previous: str | None = None) -> str | None:
    """The markdown results section: a header line on the data and machine, then one row per model found.

    ``None`` without the first row's run (ours): the header describes its split, and a table of baselines
    alone would read as if ours had not been made (a fresh clone has no runs). Another row (or the information
    limit) whose run is absent under ``root`` keeps its line from ``previous`` (the block as it stands), said in
    the header, so that making the reference run again does not drop what another machine made (a ResNet-18
    training of over an hour). Each row is a run of its own, so a kept line stays true beside new ones, as long
    as its recipe did not change (the configs that override ``train.json`` pin what they were measured with).
    """
    root = Path(root)
    if not (root / rows[0].run_dir / "test_metrics.json").is_file():
        return None
    lines = [
        "| model | command | test accuracy | test severity MAE (95% CI) | 5-fold CV accuracy | 5-fold CV MAE "
        "| epochs (the model's) | training wall time |",
        "|---|---|---|---|---|---|---|---|",
        "| " + " | ".join(PAPER_ROW) + " |",
    ]
    cv = _cv_cells(root / cv_dir, root / rows[0].run_dir)
    kept_lines, kept = _table_rows(previous or ""), []
    shown = []
    for i, row in enumerate(rows):
        cells = _model_row(row, root)
        shown.append(cells)
        if cells is None:
            if i > 0 and row.label in kept_lines:
                lines.append(kept_lines[row.label])
                kept.append(row.run_dir)
            logger.warning("%s: no %s/test_metrics.json, row %s", row.label, row.run_dir,
                           "kept as the table had it" if row.run_dir in kept else "left out")
            continue
        if i == 0 and cv is not None:  # cross-validation was run for our model
            cells = (*cells[:4], cv[0], cv[1], cells[6], f"{cells[7]}; CV {cv[2]}")
        lines.append("| " + " | ".join(cells) + " |")
    floor = _floor_rows(root, rows[0].run_dir)
    if floor is None:
        floor = [kept_lines[label] for label in (FLOOR_LABEL, FLOOR_ANATOMY_LABEL) if label in kept_lines]
        if floor:
            kept.append(f"{rows[0].run_dir}/floor.json")
    lines[3:3] = floor
    split_file = root / rows[0].run_dir / "split.json"
    split = json.loads(split_file.read_text()) if split_file.is_file() else {}
    seed = split.get("settings", {}).get("seed", "?")
    header = (
        f"Generated by `python -m monai_mtl results --readme README.md` from the runs' JSON outputs. Synthetic "
        f"cohort `data/synthetic` (1500 volumes, generation seed 42); split seed {seed}: test part of "
        f"{len(split.get('test', []))} subjects, the same for every row (5-fold CV: every subject tested once). "
        f"{_machines_sentence(root, [row.run_dir for row, cells in zip(rows, shown) if cells is not None] + ([cv_dir] if cv else []))} "
        "Wall time: first to last TensorBoard event of the training (without cohort generation, caching and the final "
        "test pass); CV: the time any of its folds was training (folds run side by side by `--jobs` count once); it "
        "scales with the machine's training-step rate (`benchmarks/run.py --only train`), and a CPU whose torch kernels differ (`AVX2`, `AVX512`) trains the same seed to slightly other "
        "weights (one machine repeats its own figures to the last digit)."
    )
    if kept:
        header += (" The rows of " + ", ".join(f"`{k}`" for k in kept) + " (absent where this was made) are kept as the "
                   "table had them.")
    return header + "\n\n" + "\n".join(lines) + "\n"


NOT_RECORDED = "not recorded (trained before bundle 0.10.1)"


def _machines_sentence(root: Path, run_dirs: Sequence[str]) -> str:
    """Which machine trained which of ``run_dirs`` (a CV folder: its folds), from their ``environment.json``."""
    from monai_mtl.run_folder import run_machines

    by_machine: dict[str, list[str]] = {}
    for run_dir in run_dirs:
        folder = root / run_dir
        folds = sorted(folder.glob("fold_*")) if (folder / "cv_summary.json").is_file() else []
        # the classical and class-median baselines train no network: no machine to name
        trained = folds or ([folder] if (folder / "tensorboard").is_dir() else [])
        labels = {label for run in trained for label in (run_machines(run) or [NOT_RECORDED])}
        for label in sorted(labels):
            by_machine.setdefault(label, []).append(f"`{run_dir}`")
    if not by_machine:
        return ""
    parts = [f"{', '.join(dirs)}: {label}" for label, dirs in by_machine.items()]
    return "Machines (each run's `environment.json`): " + "; ".join(parts) + "."


def _percent_and_mae(accuracy: float, mae: float) -> str:
    return f"{100 * accuracy:.1f}% / {mae:.2f}"


ROBUSTNESS_RUNS = (("`paper` preset", "runs/paper_preset"), ("default (`robust`)", "runs/train"))


def _flagged_cell(row) -> str:
    """``12.5% (98.5% / 2.40)``: the share flagged OOD, then the accuracy / MAE of the scans not flagged."""
    rest = "—" if pd.isna(row.unflagged_accuracy) else _percent_and_mae(row.unflagged_accuracy, row.unflagged_severity_mae)
    return f"{100 * row.ood_flagged:.1f}% ({rest})"


def robustness_table(root: str | os.PathLike = ".", runs: tuple[tuple[str, str], ...] = ROBUSTNESS_RUNS,
                     compact: bool = False, previous: str | None = None) -> str | None:
    """Accuracy / severity MAE per artifact and strength, one column per run (``<run>/robustness/robustness.csv``),
    one more for a run swept with ``--adapt-batchnorm`` and one for a calibrated run's OOD flags (the share flagged,
    and the accuracy / MAE of the scans not flagged).

    ``compact`` keeps the clean row, the middle strength of each artifact and every grid (the README's). A run
    absent under ``root`` keeps its columns from ``previous`` (the table as it stands), said in the sources line,
    as in :func:`leave_site_out_table`; with no run here at all, ``None``.
    """
    columns: dict[str, dict] = {}  # header -> {(kind, strength): cell}
    kept, kept_headers = [], []
    earlier = _table_columns(previous or "", key_cells=2)
    for label, run_dir in runs:
        path = Path(root) / run_dir / "robustness" / "robustness.csv"
        if path.is_file():
            table = pd.read_csv(path, dtype={"strength": str}, keep_default_na=False, na_values={
                c: ["", "nan", "NaN"] for c in ("unflagged_accuracy", "unflagged_severity_mae")})
            key = lambda r: (r.kind, r.strength)  # noqa: E731
            columns[f"{label}: accuracy / MAE"] = {key(r): _percent_and_mae(r.accuracy, r.severity_mae) for r in table.itertuples()}
            if "ood_flagged" in table.columns:  # calibrated: does it flag the scans an artifact breaks?
                columns[f"{label}: flagged OOD (the rest: accuracy / MAE)"] = {key(r): _flagged_cell(r) for r in table.itertuples()}
            if "adapted_accuracy" in table.columns:  # swept with --adapt-batchnorm: its own column beside the run's
                columns[f"{label}, adapted: accuracy / MAE"] = {key(r): _percent_and_mae(r.adapted_accuracy, r.adapted_severity_mae)
                                                                for r in table.itertuples()}
        else:
            for name in (label, f"{label}, adapted"):
                if name in earlier:  # the table's cells are keyed as shown: "slice thickness", "—" for no strength
                    headers, cells = earlier[name]
                    for i, header in enumerate(headers):
                        columns[header] = {(kind.replace(" ", "_"), "" if strength == "—" else strength): row[i]
                                           for (kind, strength), row in cells.items()}
                        kept_headers.append(header)
            kept += [run_dir] if label in earlier else []
    swept = [header for header in columns if header not in kept_headers]
    if not swept:
        return None
    # the rows (and the compact table's middle strengths) are those of the sweeps made here, in their order; a kept
    # column holds only what its table showed, "—" elsewhere
    keys = list(dict.fromkeys(k for header in swept for k in columns[header]))
    if compact:
        by_kind: dict[str, list] = {}
        for kind, strength in keys:
            by_kind.setdefault(kind, []).append(strength)
        keys = [(kind, strength) for kind, strength in keys
                if kind in ("clean", "grid") or strength == by_kind[kind][len(by_kind[kind]) // 2]]
    lines = [
        "| artifact | strength | " + " | ".join(columns) + " |",
        "|---|---|" + "---|" * len(columns),
    ]
    for kind, strength in keys:
        cells = [columns[header].get((kind, strength), "—") for header in columns]
        lines.append(f"| {kind.replace('_', ' ')} | {strength or '—'} | " + " | ".join(cells) + " |")
    sources = ", ".join(f"`{run_dir}/robustness/robustness.csv`" for _, run_dir in runs if run_dir not in kept)
    if kept:
        sources += "; the columns of " + ", ".join(f"`{d}`" for d in kept) + " (absent where this was made) kept as the table had them"
    return f"Generated by `python -m monai_mtl results --readme README.md` from {sources}.\n\n" + "\n".join(lines) + "\n"


#: every leave-site-out run here was trained with the plateau schedule at 5e-4, fixed task weights and the L1 severity
#: (``multisite.json`` sets them; the other two were made before ``lr_schedule``, the ``uncertainty`` default and the bins,
#: with what is now ``--override lr_schedule=plateau learning_rate=0.0005 loss_weighting=fixed checkpoint_selection=best
#: severity_loss=l1 severity_bins=0 severity_bin_sigma=2.0 network_def#task_blocks=1 max_epochs=30``, one pass;
#: ``multisite.json`` trains 40 epochs and averages over the default's moves since bundle 0.9.2)
LEAVE_SITE_OUT_RUNS = (("`multisite.json`", "runs/loso_multisite"), ("`robust`", "runs/loso_robust"),
                       ("`paper`", "runs/loso_paper"))


def leave_site_out_table(root: str | os.PathLike = ".", runs: tuple[tuple[str, str], ...] = LEAVE_SITE_OUT_RUNS,
                         previous: str | None = None) -> str | None:
    """Held-out vs within-site-CV accuracy / MAE per site, for each run of ``robustness --leave-site-out``.

    A run's held-out figures after the batch-norm adaptation get their own column where its table has them. A run
    absent under ``root`` keeps its columns from ``previous`` (the block as it stands), said in the sources line,
    so one run made again does not drop the others' figures from the document.
    """
    tables = {label: pd.read_csv(Path(root) / d / "leave_site_out.csv") for label, d in runs
              if (Path(root) / d / "leave_site_out.csv").is_file()}
    if not tables:
        return None
    kept = {label: columns for label, columns in _table_columns(previous or "").items()
            if label not in tables and label in dict(runs)}
    first = next(iter(tables.values()))
    headers, rows = [], {str(site): [] for site in first["site"]}
    for label, _ in runs:
        if label in tables:
            table = tables[label].set_index(tables[label]["site"].astype(str))
            adapted = "held_out_adapted_accuracy" in table.columns
            headers += [f"{label}: held out", *([f"{label}: held out, adapted"] if adapted else []),
                        f"{label}: within-site CV", f"{label}: MAE ratio"]
            for site, cells in rows.items():
                r = table.loc[site]
                cells += [_percent_and_mae(r.held_out_accuracy, r.held_out_severity_mae),
                          *([_percent_and_mae(r.held_out_adapted_accuracy, r.held_out_adapted_severity_mae)] if adapted else []),
                          *((_percent_and_mae(r.within_site_cv_accuracy, r.within_site_cv_severity_mae), f"{r.mae_ratio:.2f}")
                            if "mae_ratio" in table.columns else ("—", "—"))]  # --folds 0: no within-site CV
        elif label in kept:
            names, cells_of = kept[label]
            headers += names
            for site, cells in rows.items():
                cells += cells_of.get(site, ["—"] * len(names))
    lines = ["| held-out site | n | " + " | ".join(headers) + " |", "|---|---|" + "---|" * len(headers)]
    n_of = dict(zip(first["site"].astype(str), first["n"]))
    lines += [f"| {site} | {n_of[site]} | " + " | ".join(cells) + " |" for site, cells in rows.items()]
    sources = ", ".join(f"`{d}/leave_site_out.csv`" for label, d in runs if label in tables)
    if kept:
        sources += "; the columns of " + ", ".join(f"`{d}`" for label, d in runs if label in kept) + \
                   " (absent where this was made) kept as the table had them"
    return f"Generated by `python -m monai_mtl results --readme README.md` from {sources}.\n\n" + "\n".join(lines) + "\n"


def _table_columns(block: str, key_cells: int = 1) -> dict[str, tuple[list[str], dict]]:
    """The per-run columns of a generated table: run label -> (headers, cells per row), a row keyed by its first
    cell (a leave-site-out table's site) or, with ``key_cells`` 2, by its first two (a robustness table's artifact
    and strength).

    A header ``LABEL: ...`` starts or continues that run's columns; one without a label (an earlier version's
    ``MAE ratio``) belongs to the run before it. The first two columns are never a run's.
    """
    lines = [line for line in block.splitlines() if line.startswith("|")]
    if len(lines) < 3:
        return {}
    split = lambda line: [cell.strip() for cell in line.strip().strip("|").split("|")]  # noqa: E731
    header, rows = split(lines[0]), [split(line) for line in lines[2:]]
    columns: dict[str, list[int]] = {}
    label = None
    for i, name in enumerate(header[2:], start=2):
        label = name.split(": ", 1)[0] if ": " in name else label
        if label is not None:
            columns.setdefault(label, []).append(i)
    key = (lambda row: row[0]) if key_cells == 1 else (lambda row: tuple(row[:key_cells]))
    return {label: ([header[i] if ": " in header[i] else f"{label}: {header[i]}" for i in index],
                    {key(row): [row[i] for i in index] for row in rows if len(row) == len(header)})
            for label, index in columns.items()}


def trust_table(root: str | os.PathLike = ".", run_dir: str = "runs/train", cv_dir: str = "runs/cv") -> str | None:
    """Calibration and conformal coverage of the reference run's test part (and its CV's mean, when made with the same settings)."""
    metrics_file = Path(root) / run_dir / "test_metrics.json"
    trust = json.loads(metrics_file.read_text()).get("trust") if metrics_file.is_file() else None
    if not trust:
        return None
    cv = {}
    summary_file = Path(root) / cv_dir / "cv_summary.json"
    if _cv_cells(Path(root) / cv_dir, Path(root) / run_dir) is not None:
        cv = json.loads(summary_file.read_text())
    level = f"{100 * trust['coverage_level']:.0f}%"

    expected = trust.get("coverage_expected_range")
    split_file = Path(root) / run_dir / "split.json"
    if expected is None and split_file.is_file():
        # runs calibrated before the range was stored: calibrate_checkpoint always fits on the whole validation part
        from monai_mtl.trust import coverage_range

        split = json.loads(split_file.read_text())
        trust = {**trust, "calibration_size": len(split["validation"])}
        expected = list(coverage_range(len(split["validation"]), len(split["test"]), trust["coverage_level"]))

    def cells(key: str, percent: bool = False, digits: int = 3) -> str:
        value = f"{100 * trust[key]:.1f}%" if percent else f"{trust[key]:.{digits}f}"
        if key.endswith("_coverage") and expected:
            value += f" (expected {100 * expected[0]:.1f}–{100 * expected[1]:.1f}%)"
        if key in cv:
            mean, std = cv[key]["mean"], cv[key]["std"]
            value += f" | {100 * mean:.1f}% ± {100 * std:.1f}" if percent else f" | {mean:.{digits}f} ± {std:.{digits}f}"
        else:
            value += " | —"
        return value

    lines = [
        "| measure | test part | CV mean ± std |",
        "|---|---|---|",
        f"| expected calibration error, before temperature scaling | {cells('ece_before')} |",
        f"| expected calibration error, after (T = {trust['temperature']:.2f}) | {cells('ece_after')} |",
        f"| coverage of the {level} severity intervals | {cells('severity_coverage', percent=True)} |",
        f"| mean width of the severity intervals (points) | {cells('severity_mean_width', digits=2)} |",
        f"| coverage of the {level} class sets | {cells('class_set_coverage', percent=True)} |",
        f"| mean class-set size (empty sets: {100 * trust['class_empty_sets']:.1f}%) | {cells('class_mean_set_size', digits=2)} |",
        f"| test scans flagged out-of-distribution | {cells('ood_flagged_fraction', percent=True)} |",
    ]
    if expected:
        lines += ["", f"Expected: the central 95% range of the coverage that a valid conformal procedure, calibrated on "
                      f"{trust['calibration_size']} validation scans, shows on a test part of this size (beta-binomial, "
                      "`monai_mtl.trust.coverage_range`): a figure inside it is the sampling spread of parts this small."]
    return (f"Generated by `python -m monai_mtl results --readme README.md` from `{run_dir}/test_metrics.json`"
            + (f" and `{cv_dir}/cv_summary.json`" if cv else "") + ".\n\n" + "\n".join(lines) + "\n")


def ood_table(root: str | os.PathLike = ".", run_dir: str = "runs/train") -> str | None:
    """The OOD flag's AUROC and flagged fraction per kind (``<run>/trust/ood.csv`` of ``python -m monai_mtl trust``)."""
    from monai_mtl.trust import OOD_KINDS

    path = Path(root) / run_dir / "trust" / "ood.csv"
    if not path.is_file():
        return None
    table = pd.read_csv(path)
    lines = ["| scans | n | AUROC against the test scans | flagged |", "|---|---|---|---|"]
    for r in table.itertuples():
        what = "the test part (in distribution)" if r.kind == "in_distribution" else f"{r.kind.replace('_', ' ')}: {OOD_KINDS.get(r.kind, '')}"
        auroc = "—" if pd.isna(r.auroc) else f"{r.auroc:.3f}"
        lines.append(f"| {what} | {r.n} | {auroc} | {100 * r.flagged:.1f}% |")
    return (f"Generated by `python -m monai_mtl results --readme README.md` from `{run_dir}/trust/ood.csv` "
            f"(`python -m monai_mtl trust --run {run_dir}`).\n\n" + "\n".join(lines) + "\n")


def _block_text(text: str, name: str) -> str | None:
    """What a document's generated block ``name`` holds now (``None`` without the block)."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    return text.split(start, 1)[1].split(end, 1)[0] if start in text and end in text else None


def _checked_block(document: Path, name: str) -> str:
    """``document``'s text; a ``ValueError`` naming the markers when it has no ``name`` block."""
    text = document.read_text()
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    if start not in text or end not in text:
        raise ValueError(f"{document} has no '{start}' ... '{end}' block to replace")
    return text


def update_block(document: str | os.PathLike, section: str, name: str = "results") -> Path:
    """Replace the text between ``<!-- NAME:start -->`` and ``<!-- NAME:end -->`` of ``document`` with ``section``."""
    document = Path(document)
    text = _checked_block(document, name)
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    before, rest = text.split(start, 1)
    after = rest.split(end, 1)[1]
    return atomic_write_text(document, f"{before}{start}\n{section}{end}{after}")


def update_readme(readme: str | os.PathLike, section: str) -> Path:
    """Replace the ``results`` block of ``readme`` with ``section``."""
    return update_block(readme, section, "results")


def update_bundle_metadata(metadata: str | os.PathLike, root: str | os.PathLike = ".", run_dir: str = DEFAULT_ROWS[0].run_dir,
                           cv_dir: str = "runs/cv") -> Path | None:
    """Write the reference run's test figures (and its CV's, when made with the same settings) as ``eval_metrics``."""
    metrics_file = Path(root) / run_dir / "test_metrics.json"
    if not metrics_file.is_file():
        logger.warning("no %s: %s left as it is", metrics_file, metadata)
        return None
    metrics = json.loads(metrics_file.read_text())
    figures = {"test_accuracy": round(metrics["accuracy"], 4), "test_severity_mae": round(metrics["severity_mae"], 2)}
    summary_file = Path(root) / cv_dir / "cv_summary.json"
    if _cv_cells(Path(root) / cv_dir, Path(root) / run_dir) is not None:
        summary = json.loads(summary_file.read_text())
        figures.update(cv_accuracy_mean=round(summary["accuracy"]["mean"], 4),
                       cv_severity_mae_mean=round(summary["severity_mae"]["mean"], 2))
    data = json.loads(Path(metadata).read_text())
    data["eval_metrics"] = figures
    return atomic_write_json(metadata, data)


#: figures of the reference run the README shows, copied to its ``docs/results`` (source in the run -> name there)
README_FIGURES = {
    "training_curves.png": "training_curves.png", "confusion_matrix.png": "confusion_matrix.png",
    "severity_scatter.png": "severity_scatter.png", "reliability_diagram.png": "reliability_diagram.png",
    "robustness/robustness.png": "robustness.png",
}


#: figures of other runs the documentation shows (source under the root -> name in ``docs/results``)
OTHER_FIGURES = {"runs/cv_multimodal/fold_0/covariate_importance.png": "covariate_importance.png"}


def copy_figures(root: str | os.PathLike, target: str | os.PathLike, run_dir: str = DEFAULT_ROWS[0].run_dir) -> list[Path]:
    """Copy the reference run's figures (:data:`README_FIGURES`) and :data:`OTHER_FIGURES` that exist into ``target`` (atomically)."""
    copied = []
    sources = {**{f"{run_dir}/{source}": name for source, name in README_FIGURES.items()}, **OTHER_FIGURES}
    for source, name in sources.items():
        path = Path(root) / source
        if path.is_file():
            data = path.read_bytes()
            copied.append(atomic_write(Path(target) / name, lambda partial, data=data: partial.write_bytes(data)))
    return copied


def write_all(root: str | os.PathLike = ".", readme: str | os.PathLike | None = None,
              bundle: str | os.PathLike | None = None) -> str | None:
    """The results table; with ``readme`` every generated block of it and its figures, with ``bundle`` its docs and metadata.

    A block or figure whose runs are absent is left as it is (``None`` is returned for the results table then).
    """
    text = Path(readme).read_text() if readme else ""
    section = results_table(root, previous=_block_text(text, "results"))
    if section is None:
        logger.warning("no %s under %s: the results table, its figures, the bundle's docs and metadata are left as they are",
                       DEFAULT_ROWS[0].run_dir, Path(root).absolute())
    if readme:
        if section is None:
            _checked_block(Path(readme), "results")  # a README without the block is refused all the same
        else:
            update_block(readme, section, "results")
        # the figures whose runs are here (the fused model's without the reference run too); the others are left as they are
        copy_figures(root, Path(readme).parent / "docs" / "results")
        full_file = Path(readme).parent / "docs" / "results" / "robustness.md"
        full = robustness_table(root, previous=full_file.read_text() if full_file.is_file() else None)
        if full is not None:  # the README shows the compact table; the whole sweep is a generated file beside it
            atomic_write_text(full_file, "# Robustness sweep\n\n" + full)
        comparison = cv_comparison_table(root)
        if comparison is not None:  # the fold-by-fold comparison, a generated file beside the README
            atomic_write_text(Path(readme).parent / "docs" / "results" / "cv_comparison.md",
                              "# Cross-validation, fold by fold\n\n" + comparison)
        multimodal = cv_comparison_table(root, MULTIMODAL_REFERENCE, MULTIMODAL_COMPARISONS,
                                         cohort=" on the multimodal cohort `data/multimodal` (`generate --covariates`, 1500 subjects, seed 42)")
        if multimodal is not None:
            atomic_write_text(Path(readme).parent / "docs" / "results" / "multimodal.md",
                              "# Imaging and clinical covariates, fold by fold\n\n" + multimodal)
        text = Path(readme).read_text()
        blocks = (("robustness", robustness_table(root, compact=True, previous=_block_text(text, "robustness"))),
                  ("leave-site-out", leave_site_out_table(root, previous=_block_text(text, "leave-site-out"))),
                  ("trust", trust_table(root)), ("ood", ood_table(root)), ("cv-comparison", comparison),
                  ("multimodal", multimodal))
        for name, block in blocks:
            if block is None:
                logger.warning("no runs for the %s block of %s: left as it is", name, readme)
            elif f"<!-- {name}:start -->" in Path(readme).read_text():
                update_block(readme, block, name)
    if bundle and section is not None:
        update_block(Path(bundle) / "docs" / "README.md", section, "results")
        update_bundle_metadata(Path(bundle) / "configs" / "metadata.json", root)
    return section


__all__ = [
    "Row", "DEFAULT_ROWS", "CvComparison", "CV_COMPARISONS", "MULTIMODAL_REFERENCE", "MULTIMODAL_COMPARISONS", "cv_comparison_table", "run_timing", "results_table", "robustness_table", "leave_site_out_table", "trust_table",
    "ood_table", "README_FIGURES", "copy_figures", "update_block",
    "update_readme", "update_bundle_metadata", "write_all",
]
