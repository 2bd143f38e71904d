"""Ignite/MONAI event handlers for multi-task training: gradient clipping, learning-rate and image logging,
and which handlers a process of a distributed run attaches.

Bundle configs group an engine's handlers by name (``train#named_handlers#validation``, ...) and
hand them to the engine through :func:`handlers_for_rank`, which knows in Python which of them only
rank 0 may run: those that write files or logs. (The group is not called ``train#handlers``: MONAI's
``ConfigWorkflow.check_properties`` iterates that ID as a list of components, and fails on a mapping.) A handler added to the group is attached by every rank
unless it reports or writes, so inserting one cannot silently make every rank write checkpoints or
drop a rank's learning-rate or early-stopping step (as list positions in a config could).
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from ignite.engine import Engine, Events
from monai.engines.utils import IterationEvents

from monai_mtl.errors import ConfigError

logger = logging.getLogger(__name__)


def process_rank() -> int:
    """This process's rank in the ``torch.distributed`` group; 0 when not distributed."""
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_rank_zero() -> bool:
    """Whether this process writes the run's files: always outside a distributed run, else rank 0 only."""
    return process_rank() == 0


def writes_outputs(handler: Any) -> bool:
    """Whether ``handler`` only reports or writes (logs, TensorBoard, progress bars, checkpoints), so rank 0 alone runs it.

    Handlers of this package say so with a ``rank_zero_only`` attribute; MONAI's and ignite's
    reporting handlers are known by type.
    """
    from ignite.handlers import ProgressBar
    from monai.handlers import CheckpointSaver, StatsHandler, TensorBoardImageHandler, TensorBoardStatsHandler

    explicit = getattr(handler, "rank_zero_only", None)
    if explicit is not None:
        return bool(explicit)
    return isinstance(handler, (ProgressBar, StatsHandler, TensorBoardStatsHandler, TensorBoardImageHandler, CheckpointSaver))


def handlers_for_rank(handlers: Mapping[str, Any] | Iterable[Any]) -> list:
    """The handlers this process attaches, in order: all of them on rank 0; on the other ranks those that compute.

    Args:
        handlers: handlers by name (a bundle config's handler group) or in a sequence; ``None`` entries
            (a handler switched off by an override) are skipped.
    """
    group = list(handlers.values()) if isinstance(handlers, Mapping) else list(handlers)
    rank_zero = is_rank_zero()
    return [h for h in group if h is not None and (rank_zero or not writes_outputs(h))]


class GradientClipHandler:
    """Clip the global gradient norm after backward, before the optimizer step.

    MONAI's ``SupervisedTrainer`` has no clipping option; this handler runs on
    ``IterationEvents.BACKWARD_COMPLETED``. Under AMP the gradients are unscaled first (the
    ``GradScaler`` remembers it and does not unscale again in ``step``). The norm before clipping is
    put in the iteration output as ``grad_norm``.

    Args:
        max_norm: largest allowed L2 norm of all gradients together (paper: 1.0); ``None`` or <= 0 disables.
    """

    def __init__(self, max_norm: float | None = 1.0) -> None:
        self.max_norm = max_norm

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(IterationEvents.BACKWARD_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        if not self.max_norm or self.max_norm <= 0:
            return
        scaler = getattr(engine, "scaler", None)
        if getattr(engine, "amp", False) and scaler is not None:
            scaler.unscale_(engine.optimizer)
        params = [p for group in engine.optimizer.param_groups for p in group["params"] if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, self.max_norm)
        if isinstance(engine.state.output, dict):
            engine.state.output["grad_norm"] = norm.detach()


class LearningRateRecorder:
    """Put the optimizer's learning rate of the epoch into ``engine.state.metrics[name]`` when the epoch starts.

    Recorded at the start so that it is the rate the epoch trained with, even when a scheduler on
    the validation run changes it at the epoch's end; stats and TensorBoard handlers log it with the
    other epoch metrics.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, name: str = "learning_rate") -> None:
        self.optimizer, self.name = optimizer, name

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self)

    def __call__(self, engine: Engine) -> None:
        engine.state.metrics[self.name] = float(self.optimizer.param_groups[0]["lr"])


class LossWeightingHandler:
    """Give a :class:`~monai_mtl.losses.MultiTaskLoss` each epoch's mean training loss per task (for ``dwa``).

    Reads the trainer's ``train_loss_response`` and ``train_loss_severity`` metrics (averaged over the
    epoch, and over the ranks under DDP) on ``EPOCH_COMPLETED``; attach it before the training-state
    checkpoint so that the saved state holds the updated weights.
    """

    def __init__(self, loss, response_metric: str = "train_loss_response", severity_metric: str = "train_loss_severity") -> None:
        self.loss, self.response_metric, self.severity_metric = loss, response_metric, severity_metric

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        metrics = engine.state.metrics
        if self.response_metric in metrics and self.severity_metric in metrics and hasattr(self.loss, "end_epoch"):
            self.loss.end_epoch(float(metrics[self.response_metric]), float(metrics[self.severity_metric]))
            weights = getattr(self.loss, "task_weights", None)
            if weights is not None:
                metrics["loss_weight_response"], metrics["loss_weight_severity"] = (float(w) for w in weights)
            log_variances = getattr(self.loss, "log_variances", None)
            if log_variances is not None:
                metrics["loss_log_variance_response"], metrics["loss_log_variance_severity"] = (float(v) for v in log_variances.detach())


class TensorBoardSliceHandler:
    """Log the middle axial slice of the first input of each evaluation run as a TensorBoard image.

    MONAI's ``TensorBoardImageHandler`` renders 3D volumes as animated GIFs and expects image/label
    pairs; a plain slice is what a reader compares across epochs.

    Args:
        summary_writer: a ``torch.utils.tensorboard.SummaryWriter`` (shared with the stats handler).
        tag: image tag.
        global_epoch_transform: maps the engine's epoch to the step (e.g. the trainer's epoch).
    """

    rank_zero_only = True

    def __init__(
        self,
        summary_writer,
        tag: str = "val_input_axial_slice",
        global_epoch_transform: Callable[[int], int] = lambda e: e,
    ) -> None:
        self.writer, self.tag, self.global_epoch_transform = summary_writer, tag, global_epoch_transform
        self._slice: torch.Tensor | None = None

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._grab)
        engine.add_event_handler(Events.EPOCH_STARTED, self._reset)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._write)

    def _reset(self, engine: Engine) -> None:
        self._slice = None

    def _grab(self, engine: Engine) -> None:
        if self._slice is not None:
            return
        image = engine.state.output["image"] if isinstance(engine.state.output, dict) else None
        if image is not None and image.ndim == 5:
            volume = image[0, 0].detach().float().cpu()
            self._slice = volume[:, :, volume.shape[2] // 2].T.flip(0)  # x right, anterior up

    def _write(self, engine: Engine) -> None:
        if self._slice is None:
            return
        s = self._slice
        s = (s - s.min()) / (s.max() - s.min()).clamp_min(1e-8)
        self.writer.add_image(self.tag, s.unsqueeze(0), self.global_epoch_transform(engine.state.epoch))
        self.writer.flush()


class PreciseBatchNormHandler:
    """Recompute batch-norm running statistics with the current weights before validation ("precise BN").

    Running statistics are an exponential average over the last ~10 training batches, taken while
    the weights were still moving. Early in training (small convolution weights, Adam steps) they lag
    so far behind that the network in eval mode predicted one class for every validation subject,
    while the same weights with fresh statistics were right. This handler resets the statistics and
    re-estimates them as a plain average over ``num_batches`` training batches (no gradients), so
    validation, checkpoint selection and the saved model all use statistics of the current weights.

    Attach it to the trainer before the ``ValidationHandler`` (handlers of one event run in order).
    Under DDP the ranks' estimates are averaged, so every rank validates with the saved statistics.

    Args:
        num_batches: training batches to average over.
        interval: recalibrate every ``interval`` epochs (use the validation interval).
        data_loader: loader to draw batches from (default: the trainer's).
        network: the network to recalibrate (default: the trainer's); the averaged weights of
            :func:`weight_average` when validation uses them.
        prepare_batch: how a drawn batch becomes the network's input (default: the trainer's, with its augmentation;
            e.g. a :class:`~monai_mtl.engines.MultiTaskPrepareBatch` with ``TrainingAugmentation.clean`` for the
            statistics of scans as validation sees them).
        final_batches: from epoch ``final_from_epoch`` on, average over this many batches instead (0: never). Where
            the best checkpoint is picked, late in a decaying schedule, a whole epoch's statistics remove the noise of
            25 batches' at a fraction of the cost of doing so every epoch.
        final_from_epoch: the first epoch (1-based) of ``final_batches``.
    """

    def __init__(self, num_batches: int = 25, interval: int = 1, data_loader=None, network: torch.nn.Module | None = None,
                 prepare_batch=None, final_batches: int = 0, final_from_epoch: int = 1) -> None:
        self.num_batches, self.interval, self.data_loader, self.network = num_batches, interval, data_loader, network
        self.prepare_batch = prepare_batch
        self.final_batches, self.final_from_epoch = int(final_batches), int(final_from_epoch)

    def batches_at(self, epoch: int) -> int:
        """How many batches the statistics of ``epoch`` (1-based) are averaged over."""
        return self.final_batches if self.final_batches > 0 and epoch >= self.final_from_epoch else self.num_batches

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.interval), self)

    def __call__(self, engine: Engine) -> None:
        network = self.network if self.network is not None else engine.network
        norms = [m for m in network.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
        num_batches = self.batches_at(engine.state.epoch)
        if not norms or num_batches <= 0:
            return
        momenta = [m.momentum for m in norms]
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the batches below
        was_training = network.training
        network.train()
        loader = self.data_loader if self.data_loader is not None else engine.data_loader
        prepare_batch = self.prepare_batch if self.prepare_batch is not None else engine.prepare_batch
        with torch.no_grad():
            for batch in itertools.islice(loader, num_batches):  # no batch drawn beyond the last one averaged
                prepared = prepare_batch(batch, engine.state.device, engine.non_blocking)
                kwargs = prepared[3] if len(prepared) == 4 else {}  # e.g. the covariates
                network(prepared[0], **kwargs)
        _average_across_ranks(norms)
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        network.train(was_training)


def weight_average(network: torch.nn.Module, momentum: float):
    """ignite's ``EMAHandler`` of ``network``'s weights, updated after every training iteration, or ``None``.

    The average ``w_ema <- (1 - momentum) w_ema + momentum w`` spans about ``1 / momentum`` iterations.
    Validation, the best-model checkpoint and so the saved model use the averaged weights
    (:func:`validation_network`); the optimizer keeps stepping the network's own. Batch-norm
    statistics are averaged like the weights (``handle_buffers="update"``) and, with
    :class:`PreciseBatchNormHandler` given the averaged network, re-estimated for the averaged weights
    before each validation, as SWA's ``update_bn`` does. ignite's default, ``"copy"``, would make the
    average share the network's statistics tensors, so that re-estimating them for the average would
    overwrite the network's.

    Args:
        network: the trained network (a ``DistributedDataParallel`` is unwrapped by ignite).
        momentum: weight of the newest weights per iteration, in [0, 1); 0: no average (``None``).

    Raises:
        ConfigError: ``momentum`` outside [0, 1).
    """
    from ignite.handlers import EMAHandler

    if not 0 <= float(momentum) < 1:
        raise ConfigError(f"ema_momentum must be in [0, 1) (0: no weight average), got {momentum}")
    if not momentum:
        return None
    # "update" still shares the integer num_batches_tracked (ignite copies what it cannot average); with a
    # momentum set, as here, batch norm does not read it, so re-estimating the average's statistics changes nothing in training
    return EMAHandler(network, momentum=float(momentum), handle_buffers="update")


def validation_network(network: torch.nn.Module, average: Any = None) -> torch.nn.Module:
    """The network validation, the best-model checkpoint and precise BN use: ``average``'s averaged copy, else ``network``."""
    return network if average is None else average.ema_model


def _average_across_ranks(norms: list[torch.nn.Module]) -> None:
    """Under DDP, make every rank hold the mean of the ranks' re-estimated statistics.

    Each rank re-estimates on its own shard; without this the ranks would validate with different
    statistics, and the gathered validation metrics would not be those of the saved checkpoint.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    for m in norms:
        for buffer in (m.running_mean, m.running_var):
            if buffer is not None:
                dist.all_reduce(buffer, op=dist.ReduceOp.SUM)
                buffer /= dist.get_world_size()


class LazySummaryWriter:
    """A ``SummaryWriter`` that creates its event file on first use, not on construction.

    Bundle configs resolve every referenced component on every process; under DDP, handlers that
    only rank 0 attaches would otherwise still leave an empty event file per rank.
    """

    def __init__(self, log_dir: str, **kwargs) -> None:
        self.log_dir, self.kwargs = log_dir, kwargs
        self._writer = None

    def __getattr__(self, name: str):
        if name.startswith("_"):
            raise AttributeError(name)
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=self.log_dir, **self.kwargs)
        return getattr(self._writer, name)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
