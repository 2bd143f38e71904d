"""Which clinical covariates a fused model's predictions rest on: integrated gradients per subject and per column.

For a model trained with the ``covariates`` key, the evaluation (``evaluating`` workflow) explains every
test subject's two predictions by its covariates, with the subject's own scan held fixed:

- **integrated gradients** (Sundararajan, Taly & Yan 2017) along the straight line from a *baseline*
  covariate vector to the subject's, ``steps`` midpoint-rule points. The baseline is the mean encoded
  vector of the training part (an "average patient": numbers at their training mean, each category at
  its training share, missing indicators at their training rate), so an attribution reads "how far this
  subject's value of the column moved the prediction away from that of an average patient with the same
  scan";
- per **column**: the attributions of its encoded features summed (one-hot categories and its missing
  indicator), so ``genotype`` gets one number, not five;
- targets: the calibrated probability of the **predicted** class (in probability points, 0-1) and the
  severity (on 0-100). By the completeness of integrated gradients the columns of a subject add up to
  its prediction minus the baseline prediction; the mean deviation (``completeness_error``, from the
  finite number of steps) is reported beside them.

Written by :func:`explain_covariates` into ``covariate_attributions.csv`` (one row per subject:
``subject_id``, ``pred_response``, ``response:<column>``, ``severity:<column>``) and
``covariate_importance.png`` (mean absolute attribution per column, per task); the means go to
``metrics.json`` (``covariate_importance``). Captum is not a dependency: integrated gradients of a
small input are a dozen lines of :func:`torch.autograd.grad`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from monai_mtl import SEVERITY_SCALE
from monai_mtl.engines import COVARIATES_KEY
from monai_mtl.io import atomic_write_csv
from monai_mtl.outputs import split_output

logger = logging.getLogger(__name__)

ATTRIBUTIONS_FILE = "covariate_attributions.csv"
IMPORTANCE_FIGURE = "covariate_importance.png"


def training_mean(datalist: Sequence[dict]) -> np.ndarray | None:
    """The mean encoded covariate vector of a datalist's records (the integrated-gradients baseline), or ``None`` without covariates."""
    vectors = [record[COVARIATES_KEY] for record in datalist if COVARIATES_KEY in record]
    return np.mean(np.stack(vectors), axis=0).astype(np.float32) if vectors else None


def integrated_gradients(
    network: torch.nn.Module, image: torch.Tensor, covariates: torch.Tensor, baseline: torch.Tensor,
    steps: int = 32, temperature: float = 1.0, severity_lines: list | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Integrated gradients of one subject's two predictions with respect to its encoded covariates.

    The scan goes through the shared encoder once; only the task paths run at each of the ``steps`` points.

    Args:
        network: a :class:`~monai_mtl.networks.DualPathNet` trained with covariates, in eval mode.
        image: the subject's preprocessed scan ``(1, C, X, Y, Z)``, held fixed along the path.
        covariates, baseline: ``(F,)`` encoded vectors, the subject's and the reference one.
        severity_lines: the checkpoint's severity recalibration (:mod:`monai_mtl.trust`): the severity
            attributions are scaled by the slope of the predicted class's line, so that they add up to
            the change of the reported severity (the clipping to 0-100 aside).

    Returns:
        ``(response (F,), severity (F,), deltas (2,))``: the attributions to the probability of the
        class predicted at ``covariates`` and to the severity (0-100), and each target's prediction
        minus its baseline prediction (what the attributions add up to, up to the discretisation).
    """
    alphas = (torch.arange(steps, dtype=torch.float32, device=covariates.device) + 0.5) / steps  # midpoint rule
    path = baseline + alphas[:, None] * (covariates - baseline)
    path.requires_grad_(True)
    with torch.no_grad():
        features = network.encoder(image)
        ends = network.task_outputs(features.expand(2, *features.shape[1:]), torch.stack([baseline, covariates]))
    end_logits, end_severity = split_output(ends.float())
    predicted = int(end_logits[1].argmax())
    scale = SEVERITY_SCALE * (severity_lines[predicted][0] if severity_lines is not None else 1.0)
    logits, severity = split_output(network.task_outputs(features.expand(steps, *features.shape[1:]), path).float())
    probability = torch.softmax(logits / temperature, dim=1)[:, predicted]
    gradients = [torch.autograd.grad(target.sum(), path, retain_graph=i == 0)[0].mean(dim=0)
                 for i, target in enumerate((probability, severity * scale))]
    difference = (covariates - baseline).detach()
    end_probability = torch.softmax(end_logits / temperature, dim=1)[:, predicted]
    deltas = np.array([float(end_probability[1] - end_probability[0]),
                       float((end_severity[1] - end_severity[0]) * scale)])
    return ((gradients[0] * difference).cpu().numpy(), (gradients[1] * difference).cpu().numpy(), deltas)


def column_groups(feature_names: Sequence[str], columns: Sequence[str]) -> dict[str, list[int]]:
    """The encoded feature indices of each column (``col``, ``col=category``, ``col:missing``)."""
    return {column: [i for i, name in enumerate(feature_names)
                     if name == column or name.startswith(f"{column}=") or name == f"{column}:missing"]
            for column in columns}


def covariate_attributions(
    network: torch.nn.Module, batches: Iterable[dict], prepare_batch: Callable, encoding, baseline: np.ndarray,
    device: str | torch.device = "cpu", steps: int = 32, temperature: float = 1.0, severity_lines: list | None = None,
) -> tuple[pd.DataFrame, float]:
    """Per-subject, per-column attributions of every subject of ``batches`` (see the module), and the completeness error.

    ``prepare_batch``: the evaluator's (it hands the encoded covariates over as the network's keyword).
    """
    groups = column_groups(encoding.feature_names, encoding.columns)
    reference = torch.as_tensor(baseline, dtype=torch.float32, device=device)
    rows, errors = [], []
    network.eval()
    for batch in batches:
        prepared = prepare_batch(batch, device)
        images, covariates = prepared[0], prepared[3]["covariates"]
        for k in range(len(images)):
            response, severity, deltas = integrated_gradients(network, images[k:k + 1], covariates[k], reference, steps, temperature,
                                                           severity_lines)
            errors += [abs(response.sum() - deltas[0]), abs(severity.sum() - deltas[1]) / SEVERITY_SCALE]
            subject = batch["subject_id"][k] if "subject_id" in batch else str(len(rows))
            rows.append({"subject_id": subject,
                         **{f"response:{c}": float(response[i].sum()) for c, i in groups.items()},
                         **{f"severity:{c}": float(severity[i].sum()) for c, i in groups.items()}})
    return pd.DataFrame(rows), float(np.mean(errors)) if errors else 0.0


def importance(table: pd.DataFrame, columns: Sequence[str]) -> dict[str, dict[str, float]]:
    """Mean absolute attribution of each column, per task (``{"response": {...}, "severity": {...}}``)."""
    return {task: {c: float(table[f"{task}:{c}"].abs().mean()) for c in columns} for task in ("response", "severity")}


def explain_covariates(
    evaluator, network: torch.nn.Module, checkpoint: str | os.PathLike, output_dir: str | os.PathLike,
    baseline: np.ndarray | None, steps: int = 32, temperature: float = 1.0, severity_lines: list | None = None,
) -> dict | None:
    """Write ``covariate_attributions.csv`` and ``covariate_importance.png`` for ``evaluator``'s data; the summary for ``metrics.json``.

    ``None`` (and nothing written) for a checkpoint trained without covariates.
    """
    from monai_mtl import figures
    from monai_mtl.covariates import stored_covariates

    encoding = stored_covariates(checkpoint)
    if encoding is None:
        return None
    if baseline is None:
        raise ValueError("covariate attributions need the training part's mean covariates (the datalists of a covariate run)")
    device = getattr(evaluator.state, "device", None) or "cpu"
    table, error = covariate_attributions(network, evaluator.data_loader, evaluator.prepare_batch, encoding, baseline,
                                          device, steps, temperature, severity_lines)
    output_dir = Path(output_dir)
    atomic_write_csv(output_dir / ATTRIBUTIONS_FILE, table)
    means = importance(table, encoding.columns)
    figures.importance_figure(means, output_dir / IMPORTANCE_FIGURE, units={"response": "probability of the predicted class",
                                                                             "severity": "severity points (0-100)"})
    logger.info("covariate attributions (integrated gradients, %d steps, completeness error %.4f) -> %s", steps, error,
                output_dir / ATTRIBUTIONS_FILE)
    return {"method": f"integrated gradients, {steps} steps, baseline: the training part's mean covariates",
            "completeness_error": error, **means}


__all__ = ["training_mean", "integrated_gradients", "column_groups", "covariate_attributions", "importance", "explain_covariates"]
