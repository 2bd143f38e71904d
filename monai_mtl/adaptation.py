"""Test-time adaptation to a new scanner: the batch-norm statistics re-estimated on its scans (AdaBN).

A network's batch-norm layers hold the mean and variance of their inputs over the training scans. A scanner
with another contrast, resolution or noise moves the features those layers see, and every later layer reads
them shifted: on a held-out site the severity moves by several points in one direction. Re-estimating the
statistics on scans of the new scanner, without their labels, moves the features back (Li et al. 2016,
"Revisiting batch normalization for practical domain adaptation"). What it did on held-out sites:
docs/experiments.md, "`area` on the held-out sites, and the batch-norm statistics of the new scanner".

What it asks of the user: enough scans of one scanner (``min_scans``) read before predicting, all of them from
that scanner (a mixed folder gets the mixture's statistics). What it changes beyond the predictions: the
calibration, conformal sets and OOD score stored in ``model.pt`` were fitted with the training statistics, so
after adaptation they are approximate (logged).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine, Events
from torch import nn

from monai_mtl.errors import ConfigError
from monai_mtl.io import atomic_write_json

logger = logging.getLogger(__name__)

#: the record of an adapted inference, beside its ``predictions.csv``
ADAPTATION_FILE = "batchnorm_adaptation.json"
#: fewer scans give statistics noisier than the shift they correct (the held-out sites had 113-405)
DEFAULT_MIN_SCANS = 20
#: the new scanner's share of the statistics, the training's the rest (Schneider et al. 2020 blend them the same
#: way): chosen on the held-out sites of the seed-42 four-site cohort, over 0.25 / 0.5 / 0.75 / 1 (docs/experiments.md)
DEFAULT_WEIGHT = 0.75


def batchnorm_layers(network: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """The batch-norm layers whose running statistics :func:`adapt_batchnorm` re-estimates."""
    return [m for m in network.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


def _check_weight(weight: float) -> None:
    if not 0.0 < float(weight) <= 1.0:
        raise ConfigError(f"adapt_batchnorm_weight must be in (0, 1] (the new scanner's share of the statistics), got {weight!r}")


def adapt_batchnorm(network: nn.Module, batches: Iterable[tuple[torch.Tensor, dict[str, Any]]],
                    min_scans: int = DEFAULT_MIN_SCANS, source: str = "the input", weight: float = DEFAULT_WEIGHT) -> int:
    """Move ``network``'s batch-norm running statistics to their average over ``batches``; the scans used.

    ``batches``: ``(images, network keyword arguments)`` (the covariates of a fused model), as
    :func:`engine_batches` gives them. The statistics are a cumulative average over the batches (momentum
    ``None``), computed in one pass with the batch-norm layers in training mode and every other layer in
    evaluation mode (dropout off); the weights do not change. ``torch.optim.swa_utils.update_bn`` does the same
    for a network called with one tensor; a fused network also takes its covariates. Each layer then keeps
    ``weight`` x the new mean and variance + (1 - ``weight``) x the training's (1: the new scanner's alone, AdaBN):
    the statistics of a few hundred scans of one scanner are themselves noisy, and a full swap over-corrected
    the severity offset of held-out sites (docs/experiments.md).

    Raises:
        ConfigError: ``network`` has no batch-norm layer, or ``batches`` hold fewer than ``min_scans`` scans
            (the statistics are left as they were, as on any error during the pass).
    """
    _check_weight(weight)
    layers = batchnorm_layers(network)
    if not layers:
        raise ConfigError(f"adapt_batchnorm: {type(network).__name__} has no batch-norm layer to adapt")
    saved = [(m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone(), m.momentum) for m in layers]
    was_training = network.training
    network.eval()
    for m in layers:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    scans = 0
    try:
        with torch.no_grad():
            for images, kwargs in batches:
                if len(images):
                    network(images, **kwargs)
                    scans += len(images)
        if scans < min_scans:
            raise ConfigError(f"adapt_batchnorm needs at least {min_scans} usable scans of one scanner "
                              f"(adapt_batchnorm_min_scans), {source} has {scans}: predict without it, or add scans")
    except BaseException:  # too few scans, or a failure mid-pass: the statistics as they were, never half-made
        for m, (mean, var, tracked, _) in zip(layers, saved):
            m.running_mean.copy_(mean)
            m.running_var.copy_(var)
            m.num_batches_tracked.copy_(tracked)
        raise
    finally:
        network.train(was_training)
        for m, (_, _, _, momentum) in zip(layers, saved):
            m.momentum = momentum
    for m, (mean, var, _, _) in zip(layers, saved):
        m.running_mean.mul_(weight).add_(mean, alpha=1.0 - weight)
        m.running_var.mul_(weight).add_(var, alpha=1.0 - weight)
    return scans


def engine_batches(engine: Engine) -> Iterator[tuple[torch.Tensor, dict[str, Any]]]:
    """An evaluator's data as its own ``prepare_batch`` hands it to the network: ``(images, keyword arguments)``."""
    for batch in engine.data_loader:
        prepared = engine.prepare_batch(batch, engine.state.device, engine.non_blocking)
        yield prepared[0], (prepared[3] if len(prepared) > 3 else {})


class BatchNormAdaptation:
    """Inference handler: before the first prediction, adapt the network to the input's scans (``enabled``).

    Attached after the checkpoint loader (both on ``STARTED``, in the order of the bundle's handlers). It reads the
    evaluator's whole input once (a second pass over the scans), writes ``batchnorm_adaptation.json`` beside the
    predictions, and, when not ``enabled``, removes an earlier run's record so the folder never claims an
    adaptation its predictions did not have.
    """

    def __init__(self, output_dir: str | os.PathLike, enabled: bool = False, min_scans: int = DEFAULT_MIN_SCANS,
                 weight: float = DEFAULT_WEIGHT, source: str | os.PathLike = "the input") -> None:
        if not isinstance(enabled, bool):
            raise ConfigError(f"adapt_batchnorm must be true or false, got {enabled!r}")
        if int(min_scans) < 2:
            raise ConfigError(f"adapt_batchnorm_min_scans must be 2 or more, got {min_scans!r}")
        _check_weight(weight)
        self.record = Path(output_dir) / ADAPTATION_FILE
        self.enabled, self.min_scans, self.weight, self.source = enabled, int(min_scans), float(weight), str(source)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self)

    def __call__(self, engine: Engine) -> None:
        if not self.enabled:
            self.record.unlink(missing_ok=True)
            return
        scans = adapt_batchnorm(engine.network, engine_batches(engine), self.min_scans, self.source, self.weight)
        layers = len(batchnorm_layers(engine.network))
        logger.info("batch-norm statistics of %d layers moved to those of %d scans of %s (weight %g); the stored "
                    "calibration, conformal sets and OOD score were fitted before and are approximate now",
                    layers, scans, self.source, self.weight)
        atomic_write_json(self.record, {"method": "batch-norm running statistics re-estimated on the input (AdaBN), "
                                                  "blended with the training's", "weight": self.weight,
                                        "scans": scans, "layers": layers, "source": self.source})


def read_adaptation(output_dir: str | os.PathLike) -> dict | None:
    """The record :class:`BatchNormAdaptation` wrote in an inference folder, or ``None`` (not adapted)."""
    record = Path(output_dir) / ADAPTATION_FILE
    return json.loads(record.read_text()) if record.is_file() else None


__all__ = ["ADAPTATION_FILE", "DEFAULT_MIN_SCANS", "DEFAULT_WEIGHT", "batchnorm_layers", "adapt_batchnorm", "engine_batches",
           "BatchNormAdaptation", "read_adaptation"]
