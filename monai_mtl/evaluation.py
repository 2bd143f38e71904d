"""Evaluate a checkpoint on a split part: per-subject predictions and the metrics of both tasks."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from ignite.engine import Engine, Events

from monai_mtl import SEVERITY_SCALE
from monai_mtl.checkpoints import CheckpointError, check_no_leakage, load_state_dict_file, read_run_metadata
from monai_mtl.errors import CohortError
from monai_mtl.handlers import is_rank_zero
from monai_mtl.io import atomic_write_csv, atomic_write_json
from monai_mtl.metrics import prediction_report
from monai_mtl.networks import network_config
from monai_mtl.outputs import prediction_table, split_output
from monai_mtl.trust import (FeatureRecorder, annotate, calibrated_shifts, decode_calibrated, inferer_shifts, read_trust,
                             trust_report)

logger = logging.getLogger(__name__)


class PredictionCollector:
    """Collect network outputs, targets and subject ids of every iteration of an (undecollated) evaluator.

    With ``trust`` (a checkpoint's :class:`~monai_mtl.trust.TrustSettings`) it also keeps each batch's
    OOD features (from ``recorder``, hooked by :func:`predict`), and its table has calibrated
    probabilities and the trust columns.
    """

    def __init__(self, trust=None) -> None:
        self.trust, self.recorder = trust, None
        self.outputs: list[torch.Tensor] = []
        self.responses: list[torch.Tensor] = []
        self.severities: list[torch.Tensor] = []
        self.features: list[torch.Tensor] = []
        self.subject_ids: list[str] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        output = engine.state.output
        pred = output["pred"]
        self.outputs.append((pred.as_tensor() if hasattr(pred, "as_tensor") else pred).detach().float().cpu())
        self.responses.append(output["label"]["response"].detach().cpu())
        self.severities.append(output["label"]["severity"].detach().float().cpu())
        if self.recorder is not None and self.recorder.last is not None:
            self.features.append(self.recorder.last)
        ids = engine.state.batch.get("subject_id") if isinstance(engine.state.batch, dict) else None
        n = len(self.outputs[-1])
        self.subject_ids.extend(list(ids) if ids is not None else [""] * n)

    def raw_logits(self) -> torch.Tensor:
        """The response logits before any temperature."""
        return split_output(torch.cat(self.outputs))[0]

    def raw_severity(self) -> np.ndarray:
        """The network's severities on the 0-100 scale, before any recalibration."""
        return split_output(torch.cat(self.outputs))[1].numpy() * SEVERITY_SCALE

    def table(self) -> pd.DataFrame:
        """One row per subject: ids, true/predicted class (index and name), class probabilities, severities on 0-100.

        With trust settings: calibrated probabilities and :data:`~monai_mtl.trust.TRUST_COLUMNS`.
        """
        probabilities, pred_severity = decode_calibrated(torch.cat(self.outputs), self.trust)
        table = prediction_table(
            probabilities, pred_severity, {"subject_id": self.subject_ids},
            true_response=torch.cat(self.responses).numpy(),
            true_severity=torch.cat(self.severities).numpy() * SEVERITY_SCALE,
        )
        if self.trust is None:
            return table
        features = torch.cat(self.features).numpy() if self.features else None
        return annotate(table, features, self.trust)


def predict(
    evaluator: Engine, trust=None, collector: PredictionCollector | None = None, feature_layer: str | None = None
) -> pd.DataFrame:
    """Run ``evaluator`` once over its data and return :meth:`PredictionCollector.table`.

    ``trust``: a checkpoint's :class:`~monai_mtl.trust.TrustSettings`, to add the trust columns.
    ``feature_layer``: record that layer's pooled features in ``collector.features`` (default: the trust
    settings' OOD layer, if any).
    """
    collector = collector if collector is not None else PredictionCollector(trust)
    layer = feature_layer or (collector.trust.ood_layer if collector.trust is not None else None)
    handle = evaluator.add_event_handler(Events.ITERATION_COMPLETED, collector)
    try:
        if layer is not None:
            with FeatureRecorder(evaluator.network, layer) as recorder:
                collector.recorder = recorder
                evaluator.run()
        else:
            evaluator.run()
    finally:
        handle.remove()
        collector.recorder = None
    if not collector.outputs:
        raise ValueError("the evaluation data is empty: nothing to predict")
    return collector.table()


class CheckpointPredictor:
    """A run's best checkpoint with its stored preprocessing, network and trust settings, ready to predict datalists.

    Used where scans outside a bundle run are predicted with labels: the robustness sweep, the OOD report.
    A checkpoint trained with covariates (``covariates``, its stored encoding) needs each record's vector:
    :meth:`with_covariates` attaches them from the cohort's table.
    """

    def __init__(self, checkpoint: str | os.PathLike, device: str | torch.device = "cpu", batch_size: int = 32) -> None:
        from monai_mtl.checkpoints import checkpoint_settings
        from monai_mtl.covariates import stored_covariates
        from monai_mtl.networks import build_network

        settings = checkpoint_settings(checkpoint)
        self.checkpoint = Path(checkpoint)
        self.preprocessing = settings["preprocessing"]
        self.network = build_network(settings["network"]).to(device)
        load_weights(self.network, checkpoint, device)
        self.trust = read_trust(checkpoint)
        self.covariates = stored_covariates(checkpoint)
        self.device, self.batch_size = torch.device(device), batch_size

    def with_covariates(self, datalist: list[dict], table: pd.DataFrame, source: str = "labels.csv") -> list[dict]:
        """``datalist``'s records, each with the checkpoint's covariate vector of its ``subject_id``'s row of ``table``
        (encoded as training did; a column the table lacks is a :class:`~monai_mtl.errors.CohortError` naming
        ``source``); the records unchanged for an imaging-only checkpoint."""
        from monai_mtl.engines import COVARIATES_KEY

        if self.covariates is None:
            return datalist
        rows = table.set_index("subject_id", drop=False).loc[[str(r["subject_id"]) for r in datalist]]
        return [{**r, COVARIATES_KEY: v} for r, v in zip(datalist, self.covariates.encode(rows, source))]

    def predict(self, datalist: list[dict], acquisition=()) -> pd.DataFrame:
        """:func:`predict` of a labelled datalist through the checkpoint's preprocessing (after ``acquisition`` transforms)."""
        return predict(self._evaluator(datalist, acquisition), self.trust)

    def adapt_batchnorm(self, datalist: list[dict], acquisition=(), **options) -> int:
        """Move the network's batch-norm statistics to those of ``datalist``'s scans (:func:`~monai_mtl.adaptation.
        adapt_batchnorm`, ``options``: its ``min_scans`` and ``weight``); the scans used. Later :meth:`predict` calls
        use the adapted network."""
        from monai_mtl.adaptation import adapt_batchnorm, engine_batches

        batches = engine_batches(self._evaluator(datalist, acquisition))
        return adapt_batchnorm(self.network, batches, source=f"{len(datalist)} listed scans", **options)

    def _evaluator(self, datalist: list[dict], acquisition=()) -> Engine:
        from monai.data import DataLoader, Dataset
        from monai.transforms import Compose

        from monai_mtl.engines import COVARIATES_KEY, MultiTaskEvaluator, ShiftAveragingInferer

        if self.covariates is not None and any(COVARIATES_KEY not in record for record in datalist):
            raise CohortError(f"{self.checkpoint} was trained with the covariates {self.covariates.columns}: its records "
                              "need their vectors (CheckpointPredictor.with_covariates)")
        transform = Compose(self.preprocessing.transforms(acquisition=acquisition, severity_key="severity"))
        loader = DataLoader(Dataset(datalist, transform), batch_size=self.batch_size, shuffle=False)
        return MultiTaskEvaluator(device=self.device, val_data_loader=loader, network=self.network,
                                  inferer=ShiftAveragingInferer(calibrated_shifts(self.checkpoint)))


def report_from_predictions(table: pd.DataFrame) -> dict:
    """:func:`~monai_mtl.metrics.prediction_report` of a predictions table."""
    return prediction_report(
        table["true_response"].to_numpy(),
        table["pred_response"].to_numpy(),
        table["true_severity"].to_numpy(),
        table["pred_severity"].to_numpy(),
    )


def load_weights(network: torch.nn.Module, checkpoint: str | os.PathLike, device: str | torch.device = "cpu") -> None:
    """Load ``checkpoint`` (a bare state dict, or ``{"model": state_dict}``) into ``network``.

    Raises:
        CheckpointError: the file is missing or unreadable, or its weights do not fit ``network``;
            the message names the network settings that differ when the checkpoint stores its own.
    """
    state = load_state_dict_file(checkpoint, map_location=device)
    target = network.module if hasattr(network, "module") else network
    try:
        target.load_state_dict(state)
    except RuntimeError:
        raise CheckpointError(f"{checkpoint} does not fit the network {type(target).__name__}: "
                              f"{_network_difference(checkpoint, target)}") from None


def _network_difference(checkpoint: str | os.PathLike, network: torch.nn.Module) -> str:
    """Which network settings differ between a checkpoint and ``network``, or which weights, when it stores none."""
    stored = read_run_metadata(checkpoint).get("network")
    if stored and hasattr(network, "init_args"):
        current = network_config(network)
        keys = sorted(set(stored) | set(current))
        # settings recorded only when used (the bins, the covariates, ...) are absent at their default
        shown = lambda settings, k: repr(settings[k]) if k in settings else "its default"  # noqa: E731
        differ = [f"{k}: checkpoint {shown(stored, k)}, network {shown(current, k)}" for k in keys if stored.get(k) != current.get(k)]
        if differ:
            return "; ".join(differ)
    state = load_state_dict_file(checkpoint)
    expected = network.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    shapes = [k for k in set(state) & set(expected) if state[k].shape != expected[k].shape]
    parts = [f"{len(missing)} weights missing (e.g. {missing[0]})"] if missing else []
    parts += [f"{len(unexpected)} unexpected weights (e.g. {unexpected[0]})"] if unexpected else []
    parts += [f"{len(shapes)} weights of another shape (e.g. {sorted(shapes)[0]})"] if shapes else []
    return "; ".join(parts) or "the weights do not load"


def _evaluated_subjects(evaluator: Engine) -> list[str]:
    dataset = getattr(getattr(evaluator, "data_loader", None), "dataset", None)
    return [str(r.get("subject_id", "")) for r in getattr(dataset, "data", [])]


def bootstrap_intervals(table: pd.DataFrame, n_resamples: int = 1000, seed: int = 0, level: float = 0.95) -> dict:
    """Percentile bootstrap intervals (subjects resampled with replacement) of accuracy and severity MAE."""
    rng = np.random.default_rng(seed)
    correct = (table["true_response"] == table["pred_response"]).to_numpy(dtype=float)
    errors = (table["pred_severity"] - table["true_severity"]).abs().to_numpy()
    draws = rng.integers(0, len(table), size=(n_resamples, len(table)))
    low, high = 100 * (1 - level) / 2, 100 * (1 + level) / 2
    accuracy = correct[draws].mean(axis=1)
    mae = errors[draws].mean(axis=1)
    return {
        "level": level,
        "n_resamples": n_resamples,
        "accuracy": [float(np.percentile(accuracy, low)), float(np.percentile(accuracy, high))],
        "severity_mae": [float(np.percentile(mae, low)), float(np.percentile(mae, high))],
    }


def read_scalar_events(log_dir: str | os.PathLike) -> dict[str, list]:
    """Every scalar event of a TensorBoard log folder: tag -> [ScalarEvent(wall_time, step, value)] in file order."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: events.Scalars(tag) for tag in events.Tags()["scalars"]}


def read_scalars(log_dir: str | os.PathLike) -> dict[str, list[tuple[int, float]]]:
    """Scalars of a TensorBoard log folder: tag -> [(step, value)] (the last value written per step)."""
    return {tag: sorted({e.step: e.value for e in events}.items()) for tag, events in read_scalar_events(log_dir).items()}


def evaluate_checkpoint(
    evaluator: Engine,
    network: torch.nn.Module,
    checkpoint: str | os.PathLike,
    output_dir: str | os.PathLike,
    prefix: str = "test",
    allow_overlap: bool = False,
    figures: bool = False,
    summary_writer=None,
    n_bootstrap: int = 1000,
    seed: int = 0,
    training_datalist=None,
) -> dict:
    """Load ``checkpoint`` into ``network``, predict ``evaluator``'s data once and write the results.

    The one evaluation of the project: training ends with it on the test part (``prefix="test"``:
    ``test_predictions.csv``, ``test_metrics.json``), and the bundle's ``evaluating`` workflow runs it
    with ``prefix=""`` and ``figures=True`` (``predictions.csv``, ``metrics.json`` and the figures).

    ``<prefix>_metrics.json`` holds every metric of :func:`~monai_mtl.metrics.prediction_report`
    and percentile-bootstrap 95% intervals of accuracy and MAE (``bootstrap_95``). With ``figures``:
    ``confusion_matrix.png``, ``severity_scatter.png``, ``severity_error_histogram.png`` and
    ``training_curves.png`` (from the run's TensorBoard logs), also logged to TensorBoard when
    ``summary_writer`` is given. Predictions and metrics are written last, atomically, so a failed
    evaluation leaves no metrics file that looks complete. Subjects the checkpoint was trained or
    validated on (its stored split) are refused with ``LeakageError`` unless ``allow_overlap``.
    With ``figures`` and a checkpoint trained with covariates, also the covariate attributions of
    :func:`~monai_mtl.attribution.explain_covariates` (baseline: the mean encoded covariates of
    ``training_datalist``, the training part), summarized in the metrics as ``covariate_importance``.
    In a distributed run, rank 0 evaluates and the other ranks return ``{}``.
    """
    if not is_rank_zero():
        return {}
    load_weights(network, checkpoint, device=getattr(evaluator.state, "device", None) or "cpu")
    check_no_leakage(checkpoint, _evaluated_subjects(evaluator), allow_overlap)
    trust = read_trust(checkpoint)
    if trust is not None and inferer_shifts(evaluator) != trust.test_time_shifts:
        raise CheckpointError(f"{checkpoint} was calibrated on outputs averaged over test_time_shifts "
                              f"{trust.test_time_shifts}, not {inferer_shifts(evaluator)}: its temperature and "
                              "intervals would not fit; recalibrate it with those shifts (the 'recalibrating' workflow)")
    collector = PredictionCollector(trust)
    table = predict(evaluator, collector=collector)
    metrics = {"checkpoint": str(Path(checkpoint).absolute()), **report_from_predictions(table)}
    metrics["bootstrap_95"] = bootstrap_intervals(table, n_bootstrap, seed)
    if trust is not None:
        metrics["trust"] = trust_report(table, collector.raw_logits(), trust, collector.raw_severity())
    output_dir = Path(output_dir)
    if figures:
        from monai_mtl.attribution import explain_covariates, training_mean

        explanation = explain_covariates(evaluator, network, checkpoint, output_dir, training_mean(training_datalist or []),
                                         temperature=trust.temperature if trust is not None else 1.0,
                                         severity_lines=trust.severity_lines if trust is not None else None)
        if explanation is not None:
            metrics["covariate_importance"] = explanation
        _write_figures(table, metrics, output_dir, summary_writer, collector.raw_logits(), trust)
    name = f"{prefix}_" if prefix else ""
    # predictions first, metrics last: a metrics file only exists once everything before it was written
    atomic_write_csv(output_dir / f"{name}predictions.csv", table)
    atomic_write_json(output_dir / f"{name}metrics.json", metrics)
    logger.info(
        "%s: accuracy %.4f %s, severity MAE %.2f %s (n=%d) -> %s", prefix or "evaluation",
        metrics["accuracy"], metrics["bootstrap_95"]["accuracy"], metrics["severity_mae"],
        metrics["bootstrap_95"]["severity_mae"], metrics["n"], output_dir / f"{name}metrics.json",
    )
    return metrics


def _write_figures(table: pd.DataFrame, metrics: dict, output_dir: Path, summary_writer=None,
                   raw_logits: torch.Tensor | None = None, trust=None) -> None:
    from monai_mtl import figures
    from monai_mtl.trust import calibrated_probabilities, reliability_bins

    written = [
        figures.confusion_matrix_figure(metrics["confusion_matrix"], output_dir / "confusion_matrix.png"),
        *figures.severity_figures(
            table["true_severity"], table["pred_severity"],
            output_dir / "severity_scatter.png", output_dir / "severity_error_histogram.png",
        ),
    ]
    if trust is not None and raw_logits is not None:
        labels = table["true_response"].to_numpy()
        written.append(figures.reliability_diagram(
            {"before temperature scaling": reliability_bins(calibrated_probabilities(raw_logits), labels),
             f"after (T = {trust.temperature:.2f})": reliability_bins(calibrated_probabilities(raw_logits, trust.temperature), labels)},
            output_dir / "reliability_diagram.png",
        ))
    log_dir = output_dir / "tensorboard"
    if log_dir.is_dir():
        written.append(figures.training_curves(read_scalars(log_dir), output_dir / "training_curves.png"))
    if summary_writer is not None:
        import matplotlib.image

        for path in written:
            summary_writer.add_image(f"evaluation/{path.stem}", matplotlib.image.imread(path)[..., :3], dataformats="HWC")
        summary_writer.flush()


__all__ = [
    "PredictionCollector", "predict", "CheckpointPredictor", "report_from_predictions", "load_weights", "evaluate_checkpoint",
    "bootstrap_intervals", "read_scalar_events", "read_scalars",
]
