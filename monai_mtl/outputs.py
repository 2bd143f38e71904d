"""The output layout: what the network's one output tensor holds, and the one table of predictions made from it.

Every network of the project returns one tensor ``(B, NUM_RESPONSE_CLASSES + 1)``: the response
logits (softmax gives the class probabilities) followed by the severity in [0, 1] (MONAI's bundle
tools and TorchScript need a single ``(B, C)`` output). A network whose severity is the mean of a
distribution over bins (``DualPathNet(severity_bins=K)``) appends the K bins' logits
(:func:`severity_bin_logits`); every reader but the ``bins`` loss ignores them. :func:`split_output` takes it apart;
losses, metrics, evaluation, baselines and inference all read it through this module, and all
write their per-subject predictions with :func:`prediction_table`, so a column means the same in
``test_predictions.csv``, a baseline's predictions and ``predictions.csv`` of inference.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from monai_mtl import RESPONSE_NAMES, SEVERITY_SCALE

NUM_RESPONSE_CLASSES = len(RESPONSE_NAMES)
TASKS = ("response", "severity")
PROBABILITY_COLUMNS = tuple(f"prob_{name}" for name in RESPONSE_NAMES)


def split_output(output: torch.Tensor, num_classes: int = NUM_RESPONSE_CLASSES) -> tuple[torch.Tensor, torch.Tensor]:
    """``(response_logits (B, num_classes), severity (B,) in [0, 1])`` from a network output ``(B, num_classes + 1)``
    (or ``(B, num_classes + 1 + K)`` with K severity bins' logits at the end)."""
    if output.ndim != 2 or output.shape[1] < num_classes + 1:
        raise ValueError(f"expected a network output of shape (B, {num_classes + 1}), got {tuple(output.shape)}")
    return output[:, :num_classes], output[:, num_classes]


def severity_bin_centres(bins: int) -> torch.Tensor:
    """The centres of ``bins`` equal bins of the severity's range on [0, 1] (the values a bins network averages)."""
    return (torch.arange(bins, dtype=torch.float32) + 0.5) / max(bins, 1)


def severity_bin_logits(output: torch.Tensor, num_classes: int = NUM_RESPONSE_CLASSES) -> torch.Tensor:
    """The severity bins' logits ``(B, K)`` of a network output with bins; ``(B, 0)`` without."""
    split_output(output, num_classes)  # the same shape check
    return output[:, num_classes + 1:]


def decode_output(output: torch.Tensor, temperature: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Class probabilities ``(B, classes)`` and severities on the 0-100 scale ``(B,)`` of a network output.

    ``temperature`` divides the logits first (the calibration stored in a checkpoint; the class is unchanged).
    """
    output = output.as_tensor() if hasattr(output, "as_tensor") else output
    logits, severity = split_output(output.detach().float().cpu())
    # float64: a calibrated probability of 1 - 1e-30 keeps its other classes' 1e-30 (the conformal scores)
    return torch.softmax(logits.double() / temperature, dim=1).numpy(), severity.numpy() * SEVERITY_SCALE


def prediction_table(
    probabilities: np.ndarray,
    pred_severity: Sequence[float],
    identifiers: Mapping[str, Sequence] | None = None,
    true_response: Sequence[int] | None = None,
    true_severity: Sequence[float] | None = None,
) -> pd.DataFrame:
    """One row per subject: identifiers, [true class,] predicted class (index and name), probabilities, [true,] predicted severity.

    Args:
        probabilities: ``(N, classes)`` class probabilities; the predicted class is their argmax.
        pred_severity: predicted severities on the 0-100 scale.
        identifiers: leading columns in order (``{"subject_id": ...}`` or ``{"image": ...}``).
        true_response, true_severity: the labels, when known (evaluation), on the same scales.
    """
    probabilities = np.asarray(probabilities, dtype=float).reshape(-1, NUM_RESPONSE_CLASSES)
    pred_response = probabilities.argmax(axis=1)
    columns: dict[str, Sequence] = dict(identifiers or {})
    if true_response is not None:
        true_response = np.asarray(true_response).astype(int)
        columns["true_response"] = true_response
        columns["true_response_name"] = [RESPONSE_NAMES[i] for i in true_response]
    columns["pred_response"] = pred_response
    columns["pred_response_name"] = [RESPONSE_NAMES[i] for i in pred_response]
    columns.update({name: probabilities[:, i] for i, name in enumerate(PROBABILITY_COLUMNS)})
    if true_severity is not None:
        columns["true_severity"] = np.asarray(true_severity, dtype=float)
    columns["pred_severity"] = np.asarray(pred_severity, dtype=float)
    return pd.DataFrame(columns)


__all__ = [
    "NUM_RESPONSE_CLASSES", "TASKS", "PROBABILITY_COLUMNS", "split_output", "severity_bin_centres", "severity_bin_logits", "decode_output", "prediction_table",
]
