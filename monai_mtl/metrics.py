"""Metrics of both tasks: epoch metrics for ignite engines, and the full report of a prediction set.

Classification metrics come from scikit-learn on integer labels and arg-max predictions. (ignite's
``Accuracy`` on one-hot tensors counts per element, and MONAI's ``ConfusionMatrixMetric`` "accuracy"
is a mean of per-class binary accuracies: neither is the per-subject accuracy we report.)
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from ignite.metrics import EpochMetric
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    mean_absolute_error,
    mean_squared_error,
    precision_recall_fscore_support,
    r2_score,
)

from monai_mtl.errors import ConfigError
from monai_mtl import RESPONSE_NAMES, SEVERITY_SCALE
from monai_mtl.outputs import NUM_RESPONSE_CLASSES, split_output

#: names accepted by :class:`MultiTaskMetric`
SCORES = ("accuracy", "f1_macro", "severity_mae", "score")


def pack_targets(target: dict[str, torch.Tensor]) -> torch.Tensor:
    """``(B, 2)`` float tensor ``[response, severity in [0, 1]]`` from the two-target dict (for ignite's EpochMetric)."""
    return torch.stack([target["response"].to(torch.float32), target["severity"].to(torch.float32)], dim=1)


def unpack_targets(packed: torch.Tensor) -> dict[str, torch.Tensor]:
    """Inverse of :func:`pack_targets`."""
    return {"response": packed[:, 0].round().long(), "severity": packed[:, 1]}


def epoch_scores(pred: torch.Tensor, packed_target: torch.Tensor) -> dict[str, float]:
    """Accuracy, macro F1, severity MAE on 0-100, and the selection ``score = accuracy - MAE / 100``.

    The score ranks validation epochs on both tasks at once: one point of severity MAE weighs as
    much as one percent of accuracy.
    """
    logits, severity = split_output(pred.float())
    target = unpack_targets(packed_target)
    y_true = target["response"].cpu().numpy()
    y_pred = logits.argmax(dim=1).cpu().numpy()
    accuracy = float(accuracy_score(y_true, y_pred))
    mae = float((severity - target["severity"]).abs().mean()) * SEVERITY_SCALE
    return {
        "accuracy": accuracy,
        "f1_macro": float(f1_score(y_true, y_pred, average="macro", labels=range(NUM_RESPONSE_CLASSES), zero_division=0)),
        "severity_mae": mae,
        "score": accuracy - mae / SEVERITY_SCALE,
    }


def _engine_output(output: dict) -> tuple[torch.Tensor, torch.Tensor]:
    return output["pred"].detach(), pack_targets(output["label"])


class MultiTaskMetric(EpochMetric):
    """One of :data:`SCORES` over a whole epoch (predictions gathered across ranks under DDP).

    Expects engine outputs that are not decollated: ``{"pred": (B, 4), "label": {"response", "severity"}}``.

    Args:
        score: which value of :func:`epoch_scores` to report.
    """

    def __init__(self, score: str = "score", output_transform: Callable = _engine_output, device: str = "cpu") -> None:
        if score not in SCORES:
            raise ConfigError(f"score must be one of {SCORES}, got {score!r}")
        self.score = score
        super().__init__(
            lambda p, t: epoch_scores(p, t)[score], output_transform=output_transform, check_compute_fn=False, device=device
        )


class MultiTaskLossMetric(EpochMetric):
    """The multi-task loss over a whole epoch (an evaluator computes no loss by itself)."""

    def __init__(self, loss_fn: Callable, output_transform: Callable = _engine_output, device: str = "cpu") -> None:
        def compute(pred: torch.Tensor, packed: torch.Tensor) -> float:
            with torch.no_grad():
                return float(loss_fn(pred.float(), unpack_targets(packed)))

        super().__init__(compute, output_transform=output_transform, check_compute_fn=False, device=device)


def prediction_report(
    true_response: np.ndarray,
    pred_response: np.ndarray,
    true_severity: np.ndarray,
    pred_severity: np.ndarray,
) -> dict:
    """All metrics of both tasks; severities on the 0-100 scale.

    Returns ``accuracy``, ``balanced_accuracy``, ``per_class`` precision/recall/F1/support,
    ``macro`` averages, ``confusion_matrix`` (rows: true class), ``severity_mae``,
    ``severity_rmse``, ``severity_r2`` and ``n``.
    """
    labels = list(range(len(RESPONSE_NAMES)))
    precision, recall, f1, support = precision_recall_fscore_support(
        true_response, pred_response, labels=labels, zero_division=0
    )
    macro = precision_recall_fscore_support(true_response, pred_response, labels=labels, average="macro", zero_division=0)
    return {
        "n": int(len(true_response)),
        "accuracy": float(accuracy_score(true_response, pred_response)),
        "balanced_accuracy": float(balanced_accuracy_score(true_response, pred_response)),
        "per_class": {
            name: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]), "support": int(support[i])}
            for i, name in enumerate(RESPONSE_NAMES)
        },
        "macro": {"precision": float(macro[0]), "recall": float(macro[1]), "f1": float(macro[2])},
        "confusion_matrix": confusion_matrix(true_response, pred_response, labels=labels).tolist(),
        "severity_mae": float(mean_absolute_error(true_severity, pred_severity)),
        "severity_rmse": float(np.sqrt(mean_squared_error(true_severity, pred_severity))),
        "severity_r2": float(r2_score(true_severity, pred_severity)) if len(true_severity) > 1 else float("nan"),
    }
