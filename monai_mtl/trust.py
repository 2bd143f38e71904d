"""How far to trust a prediction: calibrated probabilities, conformal intervals and class sets, an out-of-distribution flag.

Fitted once after training (:func:`calibrate_checkpoint`), on parts the test never sees, and stored
in ``model.pt`` (metadata key ``trust``), so evaluation and inference apply exactly what was fitted:

- **temperature scaling** of the response logits (Guo et al. 2017), fitted on the validation part by
  minimising the negative log-likelihood; the class is unchanged, the probabilities are calibrated.
- **split-conformal prediction** at ``coverage`` (Vovk et al. 2005; Angelopoulos & Bates 2021), on the
  validation part: a severity interval ``prediction ± q`` from the absolute residuals, and a class set
  of the classes whose calibrated probability is at least ``1 - q`` from the scores ``1 - p(true
  class)`` (Sadinle et al. 2019). Over exchangeable scans, a new scan's interval (set) holds its
  true severity (class) with probability at least ``coverage``, and at most ``coverage + 1/(n + 1)``.
  A set may be empty: the model is less sure of that scan than of 1 - ``coverage`` of the validation
  scans; none of its classes is likely enough to be named.
- **an out-of-distribution score**: the Mahalanobis distance of the scan's pooled ``ood_layer``
  features to the nearest class mean, with a covariance shared by the classes (Lee et al. 2018),
  fitted on the training part (scikit-learn's Ledoit-Wolf estimate); ``ood`` is true above the
  ``ood_quantile`` quantile of the validation scans' scores.
- **a severity recalibration** (``severity_recalibration``, off by default), fitted on the validation part before the
  conformal interval: a least-squares line from the predicted to the true severity, one per predicted
  class (``per_class``) or one for all (``linear``). Regression networks shrink their estimates
  toward the mean of what they were trained on, here toward each class's mean (a slope under 1 and a
  class-dependent offset), which brain-age models correct the same way (Smith et al. 2019; de Lange &
  Cole 2020). The interval is then fitted on cross-fitted recalibrated residuals
  (:func:`cross_fitted_residuals`), so that fitting the lines on the same scans does not narrow it.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from ignite.engine import Engine
from torch import nn

from monai_mtl import SEVERITY_SCALE
from monai_mtl.errors import ConfigError
from monai_mtl.outputs import NUM_RESPONSE_CLASSES, decode_output, split_output

logger = logging.getLogger(__name__)

TRUST_COLUMNS = ("severity_low", "severity_high", "response_set", "ood_score", "ood")
ECE_BINS = 15


@dataclass
class TrustSettings:
    """What :func:`calibrate_checkpoint` fitted; stored in ``model.pt`` as a plain dict."""

    temperature: float
    coverage: float
    severity_quantile: float
    class_quantile: float
    ood_layer: str
    ood_means: list
    ood_precision: list
    ood_threshold: float
    ood_quantile: float
    #: scans the thresholds were fitted on (0: not recorded, checkpoints calibrated before it was stored)
    calibration_size: int = 0
    #: :data:`SEVERITY_RECALIBRATIONS`, and its ``[slope, intercept]`` per predicted class on the 0-100 scale
    #: (``None``: the network's severity as it is; checkpoints calibrated before it was stored)
    severity_recalibration: str = "none"
    severity_lines: list | None = None
    #: the voxel moves whose outputs the checkpoint's predictions average (:class:`~monai_mtl.engines.
    #: ShiftAveragingInferer`, the ``test_time_shifts`` key), as calibrated; ``[]``: one pass (and checkpoints before it)
    test_time_shifts: list = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> TrustSettings:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


# --- calibration ---------------------------------------------------------------------------------------

#: the range of the fitted temperature. A validation part classified without error drives the NLL's optimum
#: to T -> 0; the floor keeps the probabilities below 1 in float64 (logit gaps / T well under 700), so the
#: conformal class scores stay distinct numbers instead of ties at 0.
TEMPERATURE_RANGE = (0.05, 20.0)


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, max_iter: int = 200) -> float:
    """The temperature ``T`` in :data:`TEMPERATURE_RANGE` minimising the NLL of ``softmax(logits / T)`` (as ``log T``, L-BFGS)."""
    logits, labels = torch.as_tensor(logits, dtype=torch.float64), torch.as_tensor(labels, dtype=torch.long)
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.1, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(logits / log_t.exp(), labels)
        loss.backward()
        return loss

    optimizer.step(closure)
    low, high = TEMPERATURE_RANGE
    temperature = float(log_t.detach().exp())
    if not low <= temperature <= high:
        logger.info("temperature %.3g outside %s (a calibration part classified without error?): %s used",
                    temperature, TEMPERATURE_RANGE, min(max(temperature, low), high))
    return min(max(temperature, low), high)


def expected_calibration_error(probabilities: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> float:
    """ECE of the top-class confidence: ``sum_b |B_b|/n * |accuracy(B_b) - confidence(B_b)|`` over equal-width bins."""
    probabilities, labels = np.asarray(probabilities, dtype=float), np.asarray(labels)
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == labels
    which = np.minimum((confidence * bins).astype(int), bins - 1)
    error = 0.0
    for b in range(bins):
        members = which == b
        if members.any():
            error += members.mean() * abs(correct[members].mean() - confidence[members].mean())
    return float(error)


def reliability_bins(probabilities: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> pd.DataFrame:
    """Per confidence bin: count, mean confidence and accuracy (the points of a reliability diagram)."""
    probabilities = np.asarray(probabilities, dtype=float)
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == np.asarray(labels)
    which = np.minimum((confidence * bins).astype(int), bins - 1)
    rows = [{"bin": b, "n": int((which == b).sum()), "confidence": float(confidence[which == b].mean()),
             "accuracy": float(correct[which == b].mean())} for b in range(bins) if (which == b).any()]
    return pd.DataFrame(rows, columns=["bin", "n", "confidence", "accuracy"])


def decode_calibrated(output: torch.Tensor, settings: TrustSettings | None) -> tuple[np.ndarray, np.ndarray]:
    """Class probabilities and severities (0-100) of a network output with a checkpoint's calibration applied.

    The temperature divides the logits; the severity recalibration maps each severity by the line of its
    predicted class. Without settings: the network's own output (:func:`~monai_mtl.outputs.decode_output`).
    """
    if settings is None:
        return decode_output(output)
    probabilities, severity = decode_output(output, settings.temperature)
    return probabilities, recalibrate_severity(severity, probabilities.argmax(axis=1), settings.severity_lines)


def calibrated_probabilities(logits: torch.Tensor, temperature: float = 1.0) -> np.ndarray:
    """``softmax(logits / temperature)`` as a NumPy array."""
    return torch.softmax(torch.as_tensor(logits, dtype=torch.float64) / temperature, dim=1).numpy()


# --- severity recalibration ----------------------------------------------------------------------------

#: ``none``: the network's severity; ``linear``: one line for every scan; ``per_class``: one line per predicted class
SEVERITY_RECALIBRATIONS = ("none", "linear", "per_class")
#: fewer validation scans than this with one predicted class: that class gets the line fitted on all scans
#: (and fewer in all: no recalibration); a line through a handful of points would move severities at random
MIN_RECALIBRATION_SCANS = 10


def check_severity_recalibration(kind: str) -> str:
    """``kind`` if it is one of :data:`SEVERITY_RECALIBRATIONS`; else a ``ConfigError`` (before training, not after it)."""
    if kind not in SEVERITY_RECALIBRATIONS:
        raise ConfigError(f"severity_recalibration must be one of {list(SEVERITY_RECALIBRATIONS)}, got {kind!r}")
    return kind


def _line(pred: np.ndarray, true: np.ndarray) -> list[float] | None:
    """The least-squares ``[slope, intercept]`` of ``true`` on ``pred``; ``None`` if too few points or not increasing."""
    if len(pred) < MIN_RECALIBRATION_SCANS or np.ptp(pred) == 0:
        return None
    slope, intercept = np.polyfit(np.asarray(pred, dtype=float), np.asarray(true, dtype=float), 1)
    # a falling line would reverse the order of the network's severities: no map is better than that
    return [float(slope), float(intercept)] if slope > 0 else None


def fit_severity_recalibration(
    pred_severity: np.ndarray, pred_class: np.ndarray, true_severity: np.ndarray, kind: str,
    num_classes: int = NUM_RESPONSE_CLASSES, log: bool = True,
) -> list | None:
    """One ``[slope, intercept]`` (0-100 scale) per class mapping predicted to true severity, or ``None``.

    ``kind`` is one of :data:`SEVERITY_RECALIBRATIONS`. ``per_class`` fits on the scans of each *predicted*
    class (what inference knows); a class with fewer than :data:`MIN_RECALIBRATION_SCANS` of them, or whose
    line would fall, takes the line of all scans (``log``: say so). Measured in docs/experiments.md ("Severity
    recalibration"): lower MAE on scans like the validation part's, higher under noise, coarse voxels or motion,
    so the bundle's default is ``none``.
    """
    if check_severity_recalibration(kind) == "none":
        return None
    pred_severity, pred_class, true_severity = (np.asarray(a) for a in (pred_severity, pred_class, true_severity))
    overall = _line(pred_severity, true_severity)
    if overall is None:
        if log:
            logger.warning("severity recalibration %r skipped: %d validation scans, at least %d with distinct "
                           "predictions and a rising fit are needed", kind, len(pred_severity), MIN_RECALIBRATION_SCANS)
        return None
    if kind == "linear":
        return [overall] * num_classes
    lines = []
    for k in range(num_classes):
        own = _line(pred_severity[pred_class == k], true_severity[pred_class == k])
        if own is None and log:
            logger.info("severity recalibration: class %d has %d validation scans (or a falling fit); it takes "
                        "the line of all scans", k, int((pred_class == k).sum()))
        lines.append(own or overall)
    return lines


def recalibrate_severity(pred_severity: np.ndarray, pred_class: np.ndarray, lines: list | None) -> np.ndarray:
    """Each severity mapped by the line of its predicted class, within the 0-100 scale (``lines`` ``None``: unchanged)."""
    pred_severity = np.asarray(pred_severity)
    if lines is None:
        return pred_severity
    line = np.asarray(lines, dtype=float)[np.asarray(pred_class, dtype=int)]
    return np.clip(line[:, 0] * pred_severity + line[:, 1], 0.0, SEVERITY_SCALE).astype(pred_severity.dtype)


def cross_fitted_residuals(pred_severity: np.ndarray, pred_class: np.ndarray, true_severity: np.ndarray, kind: str,
                           folds: int = 5) -> np.ndarray:
    """``|recalibrated - true|`` of each scan under the lines fitted on the other folds (in order, no shuffling).

    Residuals of the scans the lines were fitted on are smaller than a new scan's, so a conformal interval
    taken from them covers less than it says (0.87 for 0.90 on the CV folds here). Each residual here is
    that of a scan the lines never saw, as a test scan's is (the CV+ idea, Barber et al. 2021); lines
    fitted on 4/5 of the scans are a little worse than those applied, so the interval errs wide.
    """
    residuals = np.empty(len(pred_severity))
    for k in range(folds):
        held_out = np.arange(len(pred_severity)) % folds == k
        lines = fit_severity_recalibration(pred_severity[~held_out], pred_class[~held_out], true_severity[~held_out], kind,
                                           log=False)
        residuals[held_out] = np.abs(recalibrate_severity(pred_severity[held_out], pred_class[held_out], lines)
                                     - true_severity[held_out])
    return residuals


# --- conformal prediction ------------------------------------------------------------------------------

def conformal_quantile(scores: Sequence[float], coverage: float) -> float:
    """The split-conformal threshold: the ``ceil((n + 1) coverage)``-th smallest of ``n`` calibration scores.

    ``inf`` when there are too few scores for that coverage (then every interval is unbounded).
    """
    scores = np.sort(np.asarray(scores, dtype=float))
    if not 0.0 < coverage < 1.0:
        raise ConfigError(f"coverage must be in (0, 1), got {coverage}")
    rank = math.ceil((len(scores) + 1) * coverage)
    return float(scores[rank - 1]) if rank <= len(scores) else float("inf")


def coverage_range(calibration_size: int, test_size: int, coverage: float, level: float = 0.95) -> tuple[float, float]:
    """The central ``level`` range of the empirical coverage on ``test_size`` scans of a valid split-conformal procedure.

    Calibrated on ``n = calibration_size`` exchangeable scans, the coverage given the calibration draw is
    ``Beta(k, n + 1 - k)`` with ``k = ceil((n + 1) coverage)``, and the count covered among ``test_size``
    new scans is beta-binomial (Vovk 2012; Angelopoulos & Bates 2021, section 3). An empirical coverage
    outside this range is evidence against exchangeability; inside it, a figure away from ``coverage`` is
    the sampling spread of parts this size (about +/- 6 points at 200 calibration and 200 test scans).
    """
    from scipy.stats import betabinom

    k = math.ceil((calibration_size + 1) * coverage)
    if k > calibration_size:
        return 1.0, 1.0
    counts = betabinom(test_size, k, calibration_size + 1 - k)
    tail = (1.0 - level) / 2.0
    return float(counts.ppf(tail) / test_size), float(counts.ppf(1.0 - tail) / test_size)


def severity_intervals(pred_severity: np.ndarray, quantile: float) -> tuple[np.ndarray, np.ndarray]:
    """``pred ± quantile``, within the 0-100 scale."""
    pred_severity = np.asarray(pred_severity, dtype=float)
    return np.clip(pred_severity - quantile, 0.0, 100.0), np.clip(pred_severity + quantile, 0.0, 100.0)


def class_scores(probabilities: np.ndarray) -> np.ndarray:
    """The conformal score ``1 - p_k`` of every class, as the sum of the other classes' probabilities.

    The sum keeps scores like 1e-30 that ``1 - p_k`` rounds to 0 when ``p_k`` is within 1e-16 of 1.
    """
    probabilities = np.asarray(probabilities, dtype=np.float64)
    return np.stack([np.delete(probabilities, k, axis=1).sum(axis=1) for k in range(probabilities.shape[1])], axis=1)


def class_sets(probabilities: np.ndarray, quantile: float) -> list[str]:
    """Each scan's prediction set: the classes ``k`` with ``1 - p_k <= quantile``, as ``"1"`` or ``"0|1"`` (``""``: none)."""
    members = class_scores(probabilities) <= quantile
    return ["|".join(str(k) for k in np.flatnonzero(row)) for row in members]


def set_contains(sets: Sequence[str], labels: Sequence[int]) -> np.ndarray:
    """Whether each set string of :func:`class_sets` holds its label."""
    return np.array([str(int(y)) in s.split("|") for s, y in zip(sets, labels)])


# --- out-of-distribution score -------------------------------------------------------------------------

class FeatureRecorder:
    """Record the globally average-pooled output of one layer on every forward pass (a forward hook).

    ``last`` holds the features ``(B, C)`` of the latest forward, e.g. the evaluator's own, read at
    ``ITERATION_COMPLETED`` before anything else (saliency) runs the network again.

    Args:
        network: the network (a ``DistributedDataParallel`` wrapper is unwrapped).
        layer: dotted name of the layer (``"encoder"``: the shared encoder of both networks here).
    """

    def __init__(self, network: nn.Module, layer: str = "encoder") -> None:
        module = getattr(network, "module", network)
        try:
            self.layer = module.get_submodule(layer)
        except AttributeError:
            raise ValueError(f"{type(module).__name__} has no layer {layer!r} for the OOD features") from None
        self.last: torch.Tensor | None = None
        self._handle = None

    def _hook(self, module: nn.Module, inputs, output: torch.Tensor) -> None:
        output = output.as_tensor() if hasattr(output, "as_tensor") else output
        self.last = output.detach().float().flatten(2).mean(dim=2).cpu() if output.ndim > 2 else output.detach().float().cpu()

    def __enter__(self) -> FeatureRecorder:
        self._handle = self.layer.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None


def fit_ood(features: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Class means and the shared (Ledoit-Wolf shrunk) precision matrix of training features."""
    from sklearn.covariance import LedoitWolf

    features, labels = np.asarray(features, dtype=np.float64), np.asarray(labels)
    classes = np.unique(labels)
    means = np.stack([features[labels == k].mean(axis=0) for k in classes])
    centred = features - means[np.searchsorted(classes, labels)]
    return means, LedoitWolf().fit(centred).precision_


def ood_scores(features: np.ndarray, means: np.ndarray, precision: np.ndarray) -> np.ndarray:
    """Mahalanobis distance of each feature vector to the nearest class mean."""
    features = np.asarray(features, dtype=np.float64)
    means, precision = np.asarray(means, dtype=np.float64), np.asarray(precision, dtype=np.float64)
    diff = features[:, None, :] - means[None, :, :]
    squared = np.einsum("nkd,de,nke->nk", diff, precision, diff)
    return np.sqrt(np.maximum(squared, 0.0).min(axis=1))


# --- applying the settings -----------------------------------------------------------------------------

def annotate(table: pd.DataFrame, features: np.ndarray | None, settings: TrustSettings | None) -> pd.DataFrame:
    """Add :data:`TRUST_COLUMNS` to a predictions table (probabilities already calibrated, see :func:`decode`).

    Without settings (a checkpoint from before calibration) the columns exist and are empty.
    """
    table = table.copy()
    if settings is None:
        for column in TRUST_COLUMNS:
            table[column] = np.nan if column != "response_set" else ""
        return table
    probabilities = table[[c for c in table.columns if c.startswith("prob_")]].to_numpy()
    table["severity_low"], table["severity_high"] = severity_intervals(table["pred_severity"], settings.severity_quantile)
    table["response_set"] = class_sets(probabilities, settings.class_quantile)
    scores = ood_scores(features, settings.ood_means, settings.ood_precision) if features is not None else np.full(len(table), np.nan)
    table["ood_score"] = scores
    table["ood"] = scores > settings.ood_threshold
    return table


def inferer_shifts(evaluator: Engine) -> list:
    """The voxel moves ``evaluator``'s inferer averages over (``[]``: one pass, e.g. MONAI's ``SimpleInferer``)."""
    return [list(shift) for shift in getattr(getattr(evaluator, "inferer", None), "shifts", ())]


def calibrated_shifts(checkpoint: str | os.PathLike | None) -> list:
    """The ``test_time_shifts`` a checkpoint was calibrated with (``[]`` without trust settings): what its predictions
    average over wherever it predicts (evaluation, inference, :class:`~monai_mtl.evaluation.CheckpointPredictor`)."""
    trust = read_trust(checkpoint)
    return [] if trust is None else [list(shift) for shift in trust.test_time_shifts]


def read_trust(checkpoint: str | os.PathLike | None) -> TrustSettings | None:
    """The trust settings stored in a checkpoint, or ``None`` (none stored, or no checkpoint)."""
    from monai_mtl.checkpoints import read_run_metadata

    if checkpoint is None or not Path(checkpoint).is_file():
        return None
    stored = read_run_metadata(checkpoint).get("trust")
    return TrustSettings.from_dict(stored) if stored else None


def trust_report(table: pd.DataFrame, raw_logits: torch.Tensor, settings: TrustSettings | None,
                 raw_severity: np.ndarray | None = None) -> dict:
    """ECE before and after temperature scaling, conformal coverage and sizes, and the flagged fraction, on labelled predictions.

    ``raw_severity``: the network's severities (0-100) before the recalibration, for its MAE beside the table's.
    """
    if settings is None:
        return {}
    recalibration = {"severity_recalibration": settings.severity_recalibration}
    if raw_severity is not None:
        recalibration["severity_mae_before_recalibration"] = float(np.mean(np.abs(np.asarray(raw_severity) - table["true_severity"])))
    labels = table["true_response"].to_numpy()
    inside = (table["true_severity"] >= table["severity_low"]) & (table["true_severity"] <= table["severity_high"])
    expected = {}
    if settings.calibration_size:
        expected = {"calibration_size": settings.calibration_size,
                    "coverage_expected_range": list(coverage_range(settings.calibration_size, len(table), settings.coverage))}
    return {
        "temperature": settings.temperature,
        "ece_before": expected_calibration_error(calibrated_probabilities(raw_logits), labels),
        "ece_after": expected_calibration_error(calibrated_probabilities(raw_logits, settings.temperature), labels),
        "coverage_level": settings.coverage,
        "severity_coverage": float(inside.mean()),
        "severity_mean_width": float((table["severity_high"] - table["severity_low"]).mean()),
        "class_set_coverage": float(set_contains(table["response_set"], labels).mean()),
        "class_mean_set_size": float(np.mean([len(s.split("|")) if s else 0 for s in table["response_set"]])),
        "class_empty_sets": float(np.mean([s == "" for s in table["response_set"]])),
        "ood_flagged_fraction": float(table["ood"].mean()),
        **recalibration,
        **expected,
    }


# --- fitting after training ----------------------------------------------------------------------------

def _outputs(evaluator: Engine, layer: str) -> tuple[torch.Tensor, np.ndarray, np.ndarray, np.ndarray]:
    """Raw network outputs, response labels, severities (0-1) and ``layer`` features of one run of ``evaluator``."""
    from monai_mtl.evaluation import PredictionCollector, predict

    collector = PredictionCollector()
    predict(evaluator, collector=collector, feature_layer=layer)
    return (torch.cat(collector.outputs), torch.cat(collector.responses).numpy().astype(int),
            torch.cat(collector.severities).numpy(), torch.cat(collector.features).numpy())


def calibrate_checkpoint(
    validation_evaluator: Engine,
    train_evaluator: Engine,
    network: nn.Module,
    checkpoint: str | os.PathLike,
    coverage: float = 0.9,
    ood_quantile: float = 0.99,
    ood_layer: str = "encoder",
    severity_recalibration: str = "none",
) -> dict:
    """Fit the temperature, the severity recalibration, the conformal thresholds and the OOD score for ``checkpoint``, and store them in it.

    ``validation_evaluator`` predicts the validation part, ``train_evaluator`` the training part without
    augmentation; both without handlers that write or select anything. Only rank 0 of a distributed
    run calibrates (the others return ``{}``). Fitting again replaces what the checkpoint held.
    """
    from monai_mtl.checkpoints import atomic_torch_save, load_state_dict_file, read_run_metadata, with_run_metadata
    from monai_mtl.evaluation import load_weights
    from monai_mtl.handlers import is_rank_zero

    check_severity_recalibration(severity_recalibration)  # before the work, not after it
    if not is_rank_zero():
        return {}
    load_weights(network, checkpoint, device=getattr(validation_evaluator.state, "device", None) or "cpu")
    output, response, severity, val_features = _outputs(validation_evaluator, ood_layer)
    logits, pred_severity = split_output(output, NUM_RESPONSE_CLASSES)
    temperature = fit_temperature(logits, torch.as_tensor(response))
    probabilities = calibrated_probabilities(logits, temperature)
    class_q = conformal_quantile(class_scores(probabilities)[np.arange(len(response)), response], coverage)
    pred_class = probabilities.argmax(axis=1)
    pred_severity, severity = pred_severity.numpy() * SEVERITY_SCALE, severity * SEVERITY_SCALE
    lines = fit_severity_recalibration(pred_severity, pred_class, severity, severity_recalibration)
    residuals = (np.abs(pred_severity - severity) if lines is None
                 else cross_fitted_residuals(pred_severity, pred_class, severity, severity_recalibration))
    severity_q = conformal_quantile(residuals, coverage)
    shifts = inferer_shifts(validation_evaluator)  # what the validation outputs above were averaged over
    _, train_response, _, train_features = _outputs(train_evaluator, ood_layer)
    means, precision = fit_ood(train_features, train_response)
    threshold = float(np.quantile(ood_scores(val_features, means, precision), ood_quantile))
    settings = TrustSettings(
        temperature=temperature, coverage=float(coverage), severity_quantile=severity_q, class_quantile=class_q,
        ood_layer=ood_layer, ood_means=means.tolist(), ood_precision=precision.tolist(), ood_threshold=threshold,
        ood_quantile=float(ood_quantile), calibration_size=len(response),
        severity_recalibration=severity_recalibration if lines is not None else "none", severity_lines=lines,
        test_time_shifts=shifts,
    )
    state = load_state_dict_file(checkpoint)
    facts = read_run_metadata(checkpoint)
    atomic_torch_save(with_run_metadata(state, **{**facts, "trust": settings.to_dict()}), checkpoint)
    logger.info(
        "calibrated %s on %d validation scans: temperature %.3f, %d%% severity interval ±%.2f, class-set threshold %.4g, "
        "OOD threshold %.2f (features of %d training scans); severity recalibration %s%s", checkpoint, len(response),
        temperature, round(100 * coverage), severity_q, class_q, threshold, len(train_response), settings.severity_recalibration,
        "" if lines is None else " (slope, intercept per class: " + ", ".join(f"{a:.3f} {b:+.2f}" for a, b in lines) + ")",
    )
    return {k: v for k, v in settings.to_dict().items() if not k.startswith("ood_m") and k != "ood_precision"}


# --- how well the OOD flag separates scans it should refuse ---------------------------------------------

#: kinds of scans the OOD flag should fire on, as made by :func:`ood_scans`
OOD_KINDS: dict[str, str] = {
    "non_brain": "smooth ellipsoids and boxes of random intensities, no brain anatomy",
    "noise": "pure noise (the magnitude of Gaussian noise), nothing imaged",
    "corrupted": "test scans under strong motion ghosting, Rician noise and a bias field together",
    "other_anatomy": "real MR volumes of nibabel's test data (another anatomy and contrast than the cohort's)",
}


def _other_anatomy_volumes() -> list[tuple[str, np.ndarray, np.ndarray]]:
    """``(name, volume, affine)`` of every 3D volume of nibabel's test-data NIfTI files big enough to resample."""
    import nibabel as nib
    from nibabel.testing import data_path

    volumes = []
    for name in ("anatomical.nii", "reoriented_anat_moved.nii", "example4d.nii.gz", "example_nifti2.nii.gz", "functional.nii"):
        image = nib.load(os.path.join(data_path, name))
        data = np.asarray(image.dataobj, dtype=np.float32)
        for t in range(data.shape[3] if data.ndim == 4 else 1):
            volume = data[..., t] if data.ndim == 4 else data
            if min(volume.shape) >= 3 and volume.max() > volume.min():
                volumes.append((f"{name.split('.')[0]}_{t}", volume, image.affine))
    return volumes


def ood_scans(dataset_dir: str | os.PathLike, test_records: list[dict], output_dir: str | os.PathLike,
              per_kind: int = 40, seed: int = 0) -> dict[str, list[dict]]:
    """Write NIfTI scans of each :data:`OOD_KINDS` kind into ``output_dir/<kind>/``; their datalists by kind.

    Synthetic kinds are drawn on the grid and affine of the cohort's first test scan. Datalist records
    carry dummy labels (response 0, severity 0): only the OOD score of these scans is used. When the test
    records carry covariate vectors (a fused model), each scan gets a test subject's, in turn.
    """
    import nibabel as nib

    from monai_mtl.artifacts import apply_artifact
    from monai_mtl.engines import COVARIATES_KEY
    from monai_mtl.io import atomic_write_nifti, nifti_image

    rng = np.random.default_rng(seed)
    reference = nib.load(test_records[0]["image"])
    shape, affine = reference.shape[:3], reference.affine
    scale = float(np.percentile(np.asarray(reference.dataobj), 99))
    grid = np.stack(np.meshgrid(*(np.linspace(-1, 1, n) for n in shape), indexing="ij"))
    volumes: dict[str, list[tuple[str, np.ndarray, np.ndarray]]] = {kind: [] for kind in OOD_KINDS}
    for i in range(per_kind):
        shapes = np.zeros(shape, np.float32)
        for _ in range(rng.integers(2, 6)):
            centre, radii = rng.uniform(-0.6, 0.6, 3)[:, None, None, None], rng.uniform(0.1, 0.5, 3)[:, None, None, None]
            inside = (((grid - centre) / radii) ** 2).sum(0) <= 1 if rng.random() < 0.6 else (np.abs((grid - centre) / radii) <= 1).all(0)
            shapes[inside] = rng.uniform(0.2, 1.0) * scale
        volumes["non_brain"].append((f"shapes_{i:03d}", shapes + rng.normal(0, 0.01 * scale, shape).astype(np.float32), affine))
        volumes["noise"].append((f"noise_{i:03d}", np.abs(rng.normal(0, rng.uniform(0.1, 1.0) * scale, shape)).astype(np.float32), affine))
    for i, record in enumerate(test_records[:per_kind]):
        image = nib.load(record["image"])
        volume = np.asarray(image.dataobj, dtype=np.float32)
        for kind, strength in (("bias_field", 0.6), ("motion", 0.5), ("noise", 0.2)):
            volume = apply_artifact(volume, kind, strength, rng)
        volumes["corrupted"].append((f"corrupted_{i:03d}", volume.astype(np.float32), image.affine))
    volumes["other_anatomy"] = _other_anatomy_volumes()
    datalists = {}
    for kind, items in volumes.items():
        datalists[kind] = []
        for name, volume, volume_affine in items:
            path = Path(output_dir) / kind / f"{name}.nii.gz"
            atomic_write_nifti(path, nifti_image(volume, volume_affine))
            datalists[kind].append({"image": str(path), "response": 0, "severity": 0.0, "subject_id": name})
    if COVARIATES_KEY in test_records[0]:
        # a fused model reads each scan with a patient's covariates: the test subjects' in turn (a corrupted scan
        # its own subject's), so only the scan differs from the in-distribution part
        for records in datalists.values():
            for i, record in enumerate(records):
                record[COVARIATES_KEY] = test_records[i % len(test_records)][COVARIATES_KEY]
    return datalists


def ood_report(run_dir: str | os.PathLike, dataset_dir: str | os.PathLike, output_dir: str | os.PathLike | None = None,
               per_kind: int = 40, seed: int = 0, device: str = "cpu") -> pd.DataFrame:
    """AUROC of the OOD score between a run's test scans and each :data:`OOD_KINDS` kind, and the fraction flagged.

    Writes ``ood.csv`` (``kind``, ``n``, ``auroc``, ``flagged``; first row ``in_distribution``: the test
    part, whose ``flagged`` should be about 1 - ``ood_quantile``) and ``ood_scores.csv`` (every scan's
    score) to ``output_dir`` (default ``<run_dir>/trust``).

    Raises:
        CheckpointError: the run's checkpoint holds no trust settings (calibrate it first).
    """
    import json
    import tempfile

    from sklearn.metrics import roc_auc_score

    from monai_mtl.checkpoints import CheckpointError, check_no_leakage
    from monai_mtl.cohort import to_datalist
    from monai_mtl.evaluation import CheckpointPredictor
    from monai_mtl.io import atomic_write_csv
    from monai_mtl.run_folder import RunLock, read_run_cohort

    run_dir = Path(run_dir)
    output_dir = Path(output_dir) if output_dir is not None else run_dir / "trust"
    checkpoint = run_dir / "model.pt"
    predictor = CheckpointPredictor(checkpoint, device)
    if predictor.trust is None:
        raise CheckpointError(f"{checkpoint} holds no trust settings: train it with this version, or calibrate it "
                              "(python -m monai.bundle run calibrating ...)")
    test_ids = json.loads((run_dir / "split.json").read_text())["test"]
    check_no_leakage(checkpoint, test_ids)
    cohort = read_run_cohort(run_dir, dataset_dir)
    test = predictor.with_covariates(to_datalist(cohort, test_ids), cohort)
    with RunLock(output_dir), tempfile.TemporaryDirectory(prefix="ood-") as tmp:
        scores = {"in_distribution": predictor.predict(test)}
        for kind, records in ood_scans(dataset_dir, test, tmp, per_kind, seed).items():
            scores[kind] = predictor.predict(records)
        inside = scores["in_distribution"]["ood_score"].to_numpy()
        rows = [{"kind": "in_distribution", "n": len(inside), "auroc": float("nan"),
                 "flagged": float(scores["in_distribution"]["ood"].mean())}]
        for kind in OOD_KINDS:
            outside = scores[kind]["ood_score"].to_numpy()
            labels = np.r_[np.zeros(len(inside)), np.ones(len(outside))]
            rows.append({"kind": kind, "n": len(outside), "auroc": float(roc_auc_score(labels, np.r_[inside, outside])),
                         "flagged": float(scores[kind]["ood"].mean())})
            logger.info("OOD %s: AUROC %.3f, %.1f%% flagged (n=%d)", kind, rows[-1]["auroc"], 100 * rows[-1]["flagged"], len(outside))
        table = pd.DataFrame(rows)
        per_scan = pd.concat([t[["subject_id", "ood_score", "ood"]].assign(kind=k) for k, t in scores.items()], ignore_index=True)
        atomic_write_csv(output_dir / "ood_scores.csv", per_scan)
        atomic_write_csv(output_dir / "ood.csv", table)
    logger.info("OOD report -> %s", output_dir / "ood.csv")
    return table


__all__ = [
    "OOD_KINDS", "ood_scans", "ood_report",
    "TRUST_COLUMNS", "TrustSettings", "fit_temperature", "expected_calibration_error", "reliability_bins",
    "TEMPERATURE_RANGE", "decode_calibrated", "calibrated_probabilities", "SEVERITY_RECALIBRATIONS", "MIN_RECALIBRATION_SCANS", "check_severity_recalibration",
    "fit_severity_recalibration", "recalibrate_severity", "cross_fitted_residuals", "conformal_quantile", "severity_intervals", "class_scores", "class_sets", "set_contains",
    "FeatureRecorder", "fit_ood", "ood_scores", "annotate", "read_trust", "trust_report", "calibrate_checkpoint",
]
