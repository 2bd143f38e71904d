"""Multi-task engines: a batch preparer for two targets, and MONAI's supervised trainer/evaluator set up for it."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Sequence
from typing import Any

import torch
from ignite.engine import Events
from monai.data import MetaTensor
from monai.engines import SupervisedEvaluator, SupervisedTrainer
from monai.engines.utils import IterationEvents, PrepareBatch
from monai.inferers import Inferer
from monai.utils import CommonKeys

from monai_mtl.errors import ConfigError

#: datalist key of a subject's encoded covariates (:mod:`monai_mtl.covariates`)
COVARIATES_KEY = "covariates"

#: test-only: the training process kills itself with SIGKILL when this global iteration completes, so a
#: kill-and-resume test interrupts a run at a deterministic point instead of racing the clock
KILL_AT_ITERATION = "MONAI_MTL_TEST_KILL_AT_ITERATION"


class MultiTaskPrepareBatch(PrepareBatch):
    """``(image, {"response": long (B,), "severity": float (B,)})`` from a collated batch dict.

    MONAI's ``default_prepare_batch`` returns ``label=None`` silently when the label is not a tensor,
    so a two-target batch needs its own preparer.

    Args:
        image_key, response_key, severity_key: keys of the batch dict.
        channels_last: hand the image to the network in ``channels_last_3d`` memory format (faster
            3D convolutions on CPU; the network should be converted the same way).
        augmentation: optional function applied to the image batch on the device (training only,
            e.g. :class:`~monai_mtl.transforms.BatchIntensityAugmentation`).
        covariate_augmentation: optional function applied to the batch's encoded covariates (training only,
            e.g. :class:`~monai_mtl.covariates.CovariateDropout`).
    """

    def __init__(
        self,
        image_key: str = CommonKeys.IMAGE,
        response_key: str = "response",
        severity_key: str = "severity",
        channels_last: bool = False,
        augmentation: Callable[[torch.Tensor], torch.Tensor] | None = None,
        covariate_augmentation: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        self.image_key, self.response_key, self.severity_key = image_key, response_key, severity_key
        self.augmentation = augmentation
        self.covariate_augmentation = covariate_augmentation
        self.memory_format = torch.channels_last_3d if channels_last else torch.contiguous_format

    def __call__(
        self, batchdata: dict[str, Any], device: str | torch.device | None = None, non_blocking: bool = False, **kwargs: Any
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        image = batchdata[self.image_key]
        if isinstance(image, MetaTensor):
            # metadata is not needed past this point, and MetaTensor's __torch_function__ slowed training by ~30%
            image = image.as_tensor()
        image = torch.as_tensor(image).to(device=device, non_blocking=non_blocking, **kwargs)
        if self.augmentation is not None:
            image = self.augmentation(image)
        if image.ndim == 5:
            image = image.contiguous(memory_format=self.memory_format)
        targets = {
            "response": torch.as_tensor(batchdata[self.response_key]).to(device=device, dtype=torch.long, non_blocking=non_blocking),
            "severity": torch.as_tensor(batchdata[self.severity_key]).to(device=device, dtype=torch.float32, non_blocking=non_blocking),
        }
        return _with_covariates(image, targets, batchdata, device, self.covariate_augmentation)


def _with_covariates(image: torch.Tensor, targets: Any, batchdata: dict[str, Any], device: str | torch.device | None,
                     augmentation: Callable[[torch.Tensor], torch.Tensor] | None = None) -> tuple:
    """``(image, targets)``, or with the batch's encoded covariates ``(image, targets, (), {"covariates": ...})``:
    MONAI's engines pass a prepared batch's args and kwargs on to the network, ``network(image, covariates=...)``."""
    if COVARIATES_KEY not in batchdata:
        return image, targets
    covariates = torch.as_tensor(batchdata[COVARIATES_KEY]).to(device=device, dtype=torch.float32)
    return image, targets, (), {"covariates": augmentation(covariates) if augmentation is not None else covariates}


class ImagePrepareBatch(PrepareBatch):
    """``(image, None)`` as a plain tensor, for inference without labels.

    Stripping MONAI's metadata before the network keeps its outputs plain tensors too: per-element
    work on MetaTensor outputs took half of the inference time. The batch itself keeps its metadata.
    """

    def __init__(self, image_key: str = CommonKeys.IMAGE) -> None:
        self.image_key = image_key

    def __call__(
        self, batchdata: dict[str, Any], device: str | torch.device | None = None, non_blocking: bool = False, **kwargs: Any
    ) -> tuple[torch.Tensor, None]:
        image = batchdata[self.image_key]
        image = image.as_tensor() if isinstance(image, MetaTensor) else torch.as_tensor(image)
        image = image.to(device=device, non_blocking=non_blocking, **kwargs)
        return _with_covariates(image, None, batchdata, device)


class MultiTaskTrainer(SupervisedTrainer):
    """``SupervisedTrainer`` for :class:`~monai_mtl.networks.DualPathNet` and :class:`~monai_mtl.losses.MultiTaskLoss`.

    Defaults to :class:`MultiTaskPrepareBatch` and ``decollate=False`` (epoch metrics read batched
    outputs), and copies the loss's task terms (``loss_response``, ``loss_severity``) into each
    iteration's output so handlers and metrics can log them. Every other argument is
    ``SupervisedTrainer``'s.
    """

    def __init__(self, *args: Any, prepare_batch: Any = None, decollate: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, prepare_batch=prepare_batch or MultiTaskPrepareBatch(), decollate=decollate, **kwargs)
        self.add_event_handler(IterationEvents.LOSS_COMPLETED, self._record_loss_components)
        kill_at = os.environ.get(KILL_AT_ITERATION)
        if kill_at:
            self.add_event_handler(Events.ITERATION_COMPLETED(once=int(kill_at)), lambda _: os.kill(os.getpid(), signal.SIGKILL))

    def run(self) -> None:
        """``SupervisedTrainer.run``, refusing a loader with no batch (MONAI would skip the run with a warning)."""
        loader = self.data_loader
        if loader is not None and len(loader) == 0:
            size = len(getattr(loader, "dataset", []))
            raise ConfigError(
                f"batch_size {loader.batch_size} is larger than the training part ({size} subjects; incomplete batches "
                "are dropped): no training step would run. Lower batch_size"
            )
        super().run()

    @staticmethod
    def _record_loss_components(engine: SupervisedTrainer) -> None:
        for key, value in getattr(engine.loss_function, "last_components", {}).items():
            if key != CommonKeys.LOSS:
                engine.state.output[key] = value


class MultiTaskEvaluator(SupervisedEvaluator):
    """``SupervisedEvaluator`` with :class:`MultiTaskPrepareBatch` and ``decollate=False`` by default."""

    def __init__(self, *args: Any, prepare_batch: Any = None, decollate: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, prepare_batch=prepare_batch or MultiTaskPrepareBatch(), decollate=decollate, **kwargs)


class ShiftAveragingInferer(Inferer):
    """The network's outputs averaged over the scan moved by each of ``shifts`` voxels and the scan as it is.

    The encoder strides and pools (32 x 32 x 8 after its stem), so a one-voxel move of the same anatomy changes
    which voxels each pooled feature sees: on a CV fold's validation part each moved copy alone errs more than the
    scan (severity MAE 2.9-3.1 against 2.63) and their mean with it less (2.37), the errors partly cancelling
    (docs/experiments.md, "Shift averaging"). The
    outputs are averaged as the network returns them: response logits (a geometric mean of the class
    probabilities, which temperature scaling then calibrates) and the sigmoid severity. Moves wrap around
    (``torch.roll``): the field of view's border is background. The scan as it is runs last, so a forward hook
    (the OOD features, :class:`~monai_mtl.trust.FeatureRecorder`) keeps its features. MONAI's
    ``TestTimeAugmentation`` inverts random spatial transforms of segmentations; a classifier's outputs need no
    inversion, so a deterministic set of moves is all there is to it.

    Args:
        shifts: voxel moves ``[dx, dy, dz]`` along the network input's axes; empty: one pass (``SimpleInferer``).

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.LazyLinear(2))
        >>> ShiftAveragingInferer([[1, 0, 0], [-1, 0, 0]])(torch.zeros(2, 1, 4, 4, 2), net).shape
        torch.Size([2, 2])
    """

    def __init__(self, shifts: Sequence[Sequence[int]] = ()) -> None:
        super().__init__()
        self.shifts = check_shifts(shifts)

    def __call__(self, inputs: torch.Tensor, network: Callable[..., torch.Tensor], *args: Any, **kwargs: Any) -> torch.Tensor:
        outputs = [network(torch.roll(inputs, shift, dims=(2, 3, 4)), *args, **kwargs) for shift in self.shifts]
        outputs.append(network(inputs, *args, **kwargs))
        return outputs[0] if len(outputs) == 1 else torch.stack(outputs).mean(dim=0)


def check_shifts(shifts: Sequence[Sequence[int]] | None) -> list[list[int]]:
    """``shifts`` as a list of ``[dx, dy, dz]`` whole voxels, none of them ``[0, 0, 0]`` (the scan as it is always counts)."""
    checked = []
    for shift in shifts or ():
        values = list(shift) if isinstance(shift, (list, tuple)) else None
        if (values is None or len(values) != 3 or any(isinstance(v, bool) or not float(v).is_integer() for v in values)
                or not any(values)):
            raise ConfigError(f"test_time_shifts needs [dx, dy, dz] moves of whole voxels, not all 0; got {shift!r}")
        checked.append([int(v) for v in values])
    return checked


def channels_last(network: torch.nn.Module, enabled: bool = True) -> torch.nn.Module:
    """Convert a 3D network's parameters to ``channels_last_3d`` memory format (in place) when ``enabled``."""
    return network.to(memory_format=torch.channels_last_3d) if enabled else network




#: ``lr_schedule`` choices: ``plateau`` (the paper's: halve the rate when the validation loss stalls, stop early when
#: the validation score does) or ``cosine`` (one cosine decay to zero over ``max_epochs``, no early stop)
LR_SCHEDULES = ("plateau", "cosine")


def optimizer_parameters(network: torch.nn.Module, loss: torch.nn.Module, learning_rate: float,
                         loss_lr_factor: float = 1.0) -> list[torch.nn.Parameter] | list[dict[str, Any]]:
    """What the optimizer trains: the network's parameters and the loss's learned ones (``uncertainty``'s task log-variances).

    ``loss_lr_factor`` 1 gives one list, the loss's parameters at the network's ``learning_rate`` (runs made before the
    factor existed did exactly this). Any other factor gives the loss's parameters their own group at ``learning_rate *
    loss_lr_factor``; above 1, so that a log-variance can reach its balance: Adam moves each parameter by about its learning rate
    per step whatever the gradient's size, and the gradient of ``exp(-s) * L + s`` keeps one sign until ``s = log L``,
    so at the network's rate both log-variances descend in lockstep, about 2 in 30 epochs at 2e-3, far from their
    terms' logarithms (about -6 and -4 here): equal task weights on a growing common scale, not Kendall's balance. A
    schedule scales every group's rate alike.
    """
    if not loss_lr_factor > 0:
        raise ConfigError(f"loss_weighting_lr_factor must be above 0, got {loss_lr_factor!r}")
    network_parameters, loss_parameters = list(network.parameters()), list(loss.parameters())
    if loss_lr_factor == 1.0 or not loss_parameters:
        return network_parameters + loss_parameters
    return [{"params": network_parameters}, {"params": loss_parameters, "lr": float(learning_rate) * float(loss_lr_factor)}]


def _check_schedule(schedule: str) -> None:
    if schedule not in LR_SCHEDULES:
        raise ConfigError(f"lr_schedule must be one of {list(LR_SCHEDULES)}, got {schedule!r}")


def lr_scheduler(optimizer: torch.optim.Optimizer, schedule: str, max_epochs: int, factor: float = 0.5,
                 patience: int = 2) -> torch.optim.lr_scheduler.LRScheduler | torch.optim.lr_scheduler.ReduceLROnPlateau:
    """The training's learning-rate scheduler, stepped once per epoch after validation (:func:`lr_step_input`).

    ``cosine`` decays the rate from its start to zero at ``max_epochs`` whatever the validation does: the
    validation curve of this task jumps by a point of MAE from epoch to epoch (the batch-norm statistics'
    draw), so a plateau rule reacts to noise, and the lowest rate comes at the end instead of when it stalled.
    """
    _check_schedule(schedule)
    if schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(int(max_epochs), 1))
    return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="min", factor=factor, patience=patience)


def lr_step_input(schedule: str) -> Callable[[Any], Any]:
    """MONAI ``LrScheduleHandler``'s ``step_transform``: the validation loss for ``plateau``, nothing for ``cosine``."""
    _check_schedule(schedule)
    return (lambda engine: engine.state.metrics["val_loss"]) if schedule == "plateau" else (lambda engine: ())


def early_stop_patience(patience: int, schedule: str, max_epochs: int) -> int:
    """Epochs without a better validation score before stopping: ``patience`` for ``plateau``; never for ``cosine``,
    whose length is the schedule's (a stop half-way would end at a high rate)."""
    _check_schedule(schedule)
    return int(patience) if schedule == "plateau" else int(max_epochs) + 1


__all__: Sequence[str] = ("MultiTaskPrepareBatch", "ImagePrepareBatch", "MultiTaskTrainer", "MultiTaskEvaluator", "channels_last",
                         "LR_SCHEDULES", "optimizer_parameters", "lr_scheduler", "lr_step_input", "early_stop_patience")
