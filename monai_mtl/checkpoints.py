"""Checkpoints that survive a kill: atomic saves, the best model with its split, and resumable training state.

MONAI's ``CheckpointSaver`` is not used for the best model: it sets ignite's ``DiskSaver(atomic=False)``
and deletes the previous ``model.pt`` before writing the new one, so a kill or a full disk during a
save leaves no usable checkpoint. Everything here is written to a temporary sibling first and
renamed over the target only once complete.
"""

from __future__ import annotations

import logging
import math
import os
import pickle
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.transforms import Compose, Randomizable, Transform

from monai_mtl.errors import CheckpointError, ConfigError, LeakageError
from monai_mtl.handlers import is_rank_zero
from monai_mtl.io import atomic_write

logger = logging.getLogger(__name__)




def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` through :func:`monai_mtl.io.atomic_write`.

    Raises:
        OutputError: ``could not write <path>: <reason>``; ``path`` itself is then untouched.
    """

    def write(partial: Path) -> None:
        with open(partial, "wb") as f:
            torch.save(obj, f)

    return atomic_write(path, write)


def split_ids(datalists: Mapping[str, list[dict]]) -> dict[str, list[str]]:
    """``{part: [subject ids]}`` of MONAI datalists (the form stored inside checkpoints)."""
    return {part: [str(r["subject_id"]) for r in records] for part, records in datalists.items()}


# model.pt stays a bare state dict (what ckpt_export, verify_net_in_out and every MONAI loader expect);
# the run's facts ride in the state dict's own ``_metadata`` mapping, which torch.save keeps,
# torch.load(weights_only=True) restores and load_state_dict ignores.
_METADATA_KEY = "monai_mtl"


def with_run_metadata(state_dict: dict, **facts: Any) -> dict:
    """``state_dict`` with ``facts`` (e.g. ``split``, ``epoch``) stored in its ``_metadata``, loadable as usual."""
    metadata = getattr(state_dict, "_metadata", None)
    if metadata is None:
        raise TypeError("expected a state dict from nn.Module.state_dict() (it carries _metadata)")
    metadata.setdefault("", {})[_METADATA_KEY] = facts
    return state_dict


def load_state_dict_file(checkpoint: str | os.PathLike, map_location: Any = "cpu") -> dict:
    """A model state dict from ``checkpoint`` (a bare state dict, or ``{"model": state_dict}`` as ignite saves).

    Raises:
        CheckpointError: naming the file: missing, a folder, unreadable or truncated, or not a state dict
            (e.g. a ``training_state.pt``, which holds the optimizer and random states too).
    """
    path = Path(checkpoint)
    if not path.exists():
        raise CheckpointError(f"no checkpoint at {path} (expected a model.pt written by training)")
    if not path.is_file():
        raise CheckpointError(f"{path} is a folder, not a checkpoint file (expected a model.pt written by training)")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        # a whole torch file, but holding more than tensors (NumPy random states, optimizer objects...)
        raise CheckpointError(f"{path} is not a model state dict: it holds other Python objects "
                              "(a training_state.pt? expected the run's model.pt)") from None
    except Exception as err:  # torch raises RuntimeError, EOFError... for damaged or foreign files
        reason = str(err).splitlines()[0][:200] if str(err) else type(err).__name__
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint ({type(err).__name__}: {reason})") from None
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} is not a model state dict (a training_state.pt? expected the run's model.pt)")
    return state


def read_run_metadata(checkpoint: str | os.PathLike) -> dict:
    """The facts :func:`with_run_metadata` stored in a checkpoint (``{}`` for any other checkpoint)."""
    state = load_state_dict_file(checkpoint)
    return dict(getattr(state, "_metadata", {}).get("", {}).get(_METADATA_KEY, {}))


def checkpoint_settings(checkpoint: str | os.PathLike, **explicit: Any) -> dict[str, Any]:
    """The preprocessing and network a checkpoint was trained with, for evaluation and inference.

    ``explicit`` holds :class:`~monai_mtl.transforms.Preprocessing` fields given on the command line
    (``None``: not given, take the checkpoint's). A given value that contradicts the checkpoint is
    refused: the model would be fed another input than it was trained on and predict wrongly without
    a sign. A value equal to the checkpoint's is accepted.

    Returns:
        ``{"preprocessing": Preprocessing, "network": dict}`` (``network``: see
        :func:`~monai_mtl.networks.network_config`).

    Raises:
        CheckpointError: a contradiction (naming the key, the checkpoint's value and the given one), or a
            checkpoint that stores no settings (not written by this package's training).
    """
    from monai_mtl.transforms import Preprocessing

    metadata = read_run_metadata(checkpoint)
    if "preprocessing" not in metadata or "network" not in metadata:
        raise CheckpointError(
            f"{checkpoint} stores no preprocessing and network settings: expected a model.pt written by "
            "'python -m monai.bundle run training' of monai-mtl >= 0.2 (retrain older runs)"
        )
    trained = Preprocessing.from_dict(metadata["preprocessing"])
    for key, value in explicit.items():
        if value is None:
            continue
        if key not in Preprocessing.__dataclass_fields__:
            raise CheckpointError(f"unknown preprocessing setting {key!r}")
        wanted = getattr(Preprocessing(**{**trained.to_dict(), key: value}), key)  # normalised like the stored value
        if wanted != getattr(trained, key):
            raise CheckpointError(
                f"{key}={_plain(value)} contradicts {checkpoint}, which was trained with {key}={_plain(getattr(trained, key))}; "
                f"leave {key} unset to use the checkpoint's"
            )
    return {"preprocessing": trained, "network": dict(metadata["network"])}


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def read_checkpoint_split(checkpoint: str | os.PathLike) -> dict[str, list[str]] | None:
    """The split stored in a checkpoint written by :class:`BestModelSaver`, or ``None`` for any other checkpoint."""
    split = read_run_metadata(checkpoint).get("split")
    return split if isinstance(split, dict) else None


def check_no_leakage(
    checkpoint: str | os.PathLike, subject_ids: list[str] | set[str], allow_overlap: bool = False
) -> None:
    """Refuse to test ``subject_ids`` with a checkpoint that was trained or validated on any of them.

    The split travels inside the checkpoint (see :class:`BestModelSaver`), so this also holds when a
    checkpoint is evaluated in another run folder or on another split.

    Raises:
        LeakageError: overlap found and ``allow_overlap`` is false.
    """
    split = read_checkpoint_split(checkpoint)
    if split is None:
        logger.warning("%s stores no split: cannot check that the test subjects were unseen in training", checkpoint)
        return
    seen = set(split.get("train", [])) | set(split.get("validation", []))
    overlap = sorted(seen & set(subject_ids))
    if not overlap:
        return
    message = (
        f"{len(overlap)} of the {len(set(subject_ids))} test subjects were used to train or validate {checkpoint}, "
        f"e.g. {overlap[:3]}"
    )
    if allow_overlap:
        logger.warning("%s (allowed by allow_split_overlap)", message)
        return
    raise LeakageError(f"{message}; its metrics would be biased. Pass --allow_split_overlap True to evaluate anyway")


class BestModelSaver:
    """Save the network's state dict, with the split, epoch and metric in its metadata, when the key metric improves
    (``selection`` ``best``) or after every validation (``last``).

    Attach to the validation evaluator after its key metric is computed (MONAI's ``Workflow``
    updates ``state.best_metric_epoch`` on ``EPOCH_COMPLETED`` before any handler). The file is
    replaced atomically, so a kill during the save leaves the previous best intact.

    Args:
        path: checkpoint file (e.g. ``<output_dir>/model.pt``).
        network: the network (a ``DistributedDataParallel`` wrapper is unwrapped).
        split: subject ids of each split part, stored for the leakage check of later evaluations.
        preprocessing: the input definition (:class:`~monai_mtl.transforms.Preprocessing` or its dict),
            stored so that evaluation and inference feed the model as it was trained.
        selection: which epoch's weights the file holds: ``best``, the epoch with the best key metric (the
            paper's protocol); ``last``, every validated epoch replaces it, so a finished run holds its final
            epoch's. With the cosine schedule the best of 30 noisy validation scores is partly luck: picked on one
            half of each CV fold's validation part and measured on the other, the final epoch predicted better
            (docs/experiments.md, "Which epoch becomes the model").

    Only rank 0 of a distributed run attaches it (:func:`monai_mtl.handlers.handlers_for_rank`), and it
    writes nothing on another rank should one attach it anyway.
    """

    rank_zero_only = True
    SELECTIONS = ("best", "last")

    def __init__(
        self, path: str | os.PathLike, network: torch.nn.Module, split: Mapping[str, list[str]] | None = None,
        preprocessing: Any = None, covariates: Any = None, selection: str = "best",
    ) -> None:
        if selection not in self.SELECTIONS:
            raise ConfigError(f"checkpoint_selection must be one of {list(self.SELECTIONS)}, got {selection!r}")
        self.path, self.network, self.selection = Path(path), network, selection
        self.split = {k: list(v) for k, v in (split or {}).items()}
        self.preprocessing = preprocessing.to_dict() if hasattr(preprocessing, "to_dict") else preprocessing
        self.covariates = covariates.to_dict() if hasattr(covariates, "to_dict") else covariates

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        from monai_mtl.networks import network_config

        improved = engine.state.best_metric_epoch == engine.state.epoch
        if not (improved or self.selection == "last") or not is_rank_zero():
            return

        module = getattr(self.network, "module", self.network)
        facts = {"network": network_config(module)} if hasattr(module, "init_args") else {}
        if self.preprocessing is not None:
            facts["preprocessing"] = dict(self.preprocessing)
        if self.covariates is not None:  # the encoding fitted on the training part, for evaluation and inference
            facts["covariates"] = dict(self.covariates)
        name = str(engine.state.key_metric_name)
        metric = engine.state.best_metric if improved else engine.state.metrics[name]
        state = with_run_metadata(
            module.state_dict(), split=self.split, epoch=int(engine.state.epoch), metric=float(metric), metric_name=name,
            selection=self.selection, **facts,
        )
        atomic_torch_save(state, self.path)
        if improved:
            logger.info("epoch %d: new best %s %.4f -> %s", engine.state.epoch, name, metric, self.path)
        else:  # the best so far is named, so a run that ends past its best (early stopping) says so in its log
            logger.info("epoch %d: %s %.4f -> %s (checkpoint_selection last; best %.4f at epoch %d)", engine.state.epoch,
                        name, metric, self.path, engine.state.best_metric, engine.state.best_metric_epoch)


def check_validation_interval(val_interval: Any, max_epochs: int, selection: str) -> None:
    """Refuse a ``val_interval`` that is not a whole number >= 1, and, under ``checkpoint_selection`` ``last``, one
    that does not divide ``max_epochs``.

    The checkpoint is written after a validation (:class:`BestModelSaver`), and precise BN re-estimates the statistics
    before one, both every ``val_interval`` epochs: with 40 epochs validated every 3, ``model.pt`` would hold epoch
    39's weights while the log shows 40 epochs trained, the last one's work lost without a word.

    Raises:
        ConfigError: ``val_interval 3 does not divide max_epochs 40: ...``.
    """
    if isinstance(val_interval, bool) or not isinstance(val_interval, (int, float)) or val_interval < 1 \
            or int(val_interval) != val_interval:
        raise ConfigError(f"val_interval must be a whole number of epochs >= 1, got {val_interval!r}")
    val_interval = int(val_interval)
    if selection == "last" and int(max_epochs) % val_interval:
        last = int(max_epochs) // val_interval * val_interval
        raise ConfigError(
            f"val_interval {val_interval} does not divide max_epochs {max_epochs}: with checkpoint_selection 'last' "
            f"model.pt would hold epoch {last}'s weights and the last {int(max_epochs) - last} epoch(s) would train for "
            f"nothing; choose a val_interval that divides max_epochs (e.g. {_largest_divisor(int(max_epochs), val_interval)})")


def _largest_divisor(number: int, at_most: int) -> int:
    return max(d for d in range(1, at_most + 1) if number % d == 0)


def _random_transforms(dataset: Any) -> list[Randomizable]:
    """Every randomizable object of a MONAI dataset's transform chain, in a fixed order.

    Dictionary transforms keep their own random state *and* an inner array transform with another
    (e.g. ``RandShiftIntensityd.shifter``), so attributes are searched too, not only ``Compose`` lists.
    """
    found: list[Randomizable] = []
    seen: set[int] = set()

    def walk(obj: Any) -> None:
        if id(obj) in seen or not isinstance(obj, (Randomizable, Transform)):
            return
        seen.add(id(obj))
        if isinstance(obj, Randomizable):
            found.append(obj)
        children = obj.transforms if isinstance(obj, Compose) else []
        for child in [*children, *vars(obj).values()]:
            if isinstance(child, (list, tuple)):
                for item in child:
                    walk(item)
            else:
                walk(child)

    walk(getattr(dataset, "transform", None))
    return found


def _stretch_cosine(scheduler: torch.optim.lr_scheduler.CosineAnnealingLR, length: int) -> None:
    """A cosine decay continued to a new ``length`` (a finished run given more ``max_epochs``): the rate of the epoch
    reached on the cosine of the new length, which then goes on to zero at its end.

    The stored ``T_max`` would make the rate climb back up after it, and PyTorch's step rule, which scales the last
    rate, would keep a finished run's rate of zero forever; so the closed form (PyTorch's own) is set once here.
    """
    scheduler.T_max = length
    progress = (1 + math.cos(math.pi * min(scheduler.last_epoch, length) / length)) / 2
    rates = [scheduler.eta_min + (base - scheduler.eta_min) * progress for base in scheduler.base_lrs]
    for group, rate in zip(scheduler.optimizer.param_groups, rates):
        group["lr"] = rate
    scheduler._last_lr = rates  # what get_last_lr() reports, as step() would have set it


class TrainingStateCheckpoint:
    """Save everything needed to continue training after each epoch; restore it when the run starts again.

    After each epoch (attach it after the ``ValidationHandler``, so validation, the LR scheduler,
    early stopping and the best model are already updated) it writes ``path`` atomically with: the
    network, optimizer, LR scheduler, AMP scaler, early-stopping counter, the evaluator's best
    metric, the epoch and iteration counters, and the random states (torch, NumPy, Python, and every
    random transform of the training data). When training starts and ``path`` exists, ``resume=True``
    restores all of it and continues with the next epoch ("resuming from epoch N"), so a killed run
    ends with the same metrics as an uninterrupted one (identical on CPU). A run that had already
    finished is not trained further. ``resume=False`` starts fresh (the run folder was already cleared
    by :func:`monai_mtl.run_folder.fresh_start`, before the split and the cohort check).

    Args:
        path: training-state file (e.g. ``<output_dir>/training_state.pt``).
        network, optimizer: trained objects.
        lr_scheduler: optional scheduler with ``state_dict``.
        early_stop: optional MONAI ``EarlyStopHandler`` (its ignite handler holds the counter).
        evaluator: optional validation evaluator (its best metric decides when the best model is saved).
        loss: optional loss module with state (learned task weights, their history): saved and restored too.
        weight_average: optional ignite ``EMAHandler`` (:func:`monai_mtl.handlers.weight_average`): its
            averaged weights are saved and restored too.
        resume: continue from ``path`` when it exists.
        save: write the state; ``None`` (default): on rank 0 of a distributed run only. Every rank
            attaches it and loads the state, so every rank resumes.
    """

    rank_zero_only = False  # every rank restores the state; only rank 0 writes it

    def __init__(
        self,
        path: str | os.PathLike,
        network: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        lr_scheduler: Any = None,
        early_stop: Any = None,
        evaluator: Engine | None = None,
        resume: bool = True,
        save: bool | None = None,
        loss: torch.nn.Module | None = None,
        weight_average: Any = None,
    ) -> None:
        self.path = Path(path)
        self.loss, self.weight_average = loss, weight_average
        self.network, self.optimizer, self.lr_scheduler = network, optimizer, lr_scheduler
        self.early_stop, self.evaluator = early_stop, evaluator
        self.resume, self.save = bool(resume), save

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self.load)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.store)

    def _early_stopping(self):
        return getattr(self.early_stop, "_handler", None)

    def state_dict(self, engine: Engine) -> dict[str, Any]:
        module = getattr(self.network, "module", self.network)
        early = self._early_stopping()
        scaler = getattr(engine, "scaler", None)
        return {
            "epoch": int(engine.state.epoch),
            "iteration": int(engine.state.iteration),
            "finished": bool(engine.should_terminate),
            "model": module.state_dict(),
            "loss": self.loss.state_dict() if self.loss is not None else None,
            "averaged_model": self.weight_average.ema_model.state_dict() if self.weight_average is not None else None,
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.lr_scheduler.state_dict() if self.lr_scheduler is not None else None,
            "scaler": scaler.state_dict() if scaler is not None else None,
            "early_stopping": early.state_dict() if early is not None else None,
            "best_metric": float(self.evaluator.state.best_metric) if self.evaluator is not None else None,
            "best_metric_epoch": int(self.evaluator.state.best_metric_epoch) if self.evaluator is not None else None,
            "rng": {
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                "numpy": np.random.get_state(),
                "python": random.getstate(),
                "transforms": [t.R.get_state() for t in _random_transforms(engine.data_loader.dataset)],
            },
        }

    def store(self, engine: Engine) -> None:
        if self.save if self.save is not None else is_rank_zero():
            atomic_torch_save(self.state_dict(engine), self.path)

    def load(self, engine: Engine) -> None:
        if not self.resume or not self.path.is_file():  # resume=False: run_folder.fresh_start cleared the folder
            return
        try:
            # the file holds NumPy RNG states and Python tuples besides tensors, hence weights_only=False;
            # it is only ever read from the run's own output folder
            state = torch.load(self.path, map_location="cpu", weights_only=False)
        except Exception as err:  # an atomic save cannot leave a torn file: this is another kind of damage
            raise CheckpointError(f"cannot read the training state {self.path} ({err}); pass --resume False to start afresh") from err
        getattr(self.network, "module", self.network).load_state_dict(state["model"])
        if self.loss is not None and state.get("loss") is not None:
            self.loss.load_state_dict(state["loss"])
        if self.weight_average is not None and state.get("averaged_model") is not None:
            self.weight_average.ema_model.load_state_dict(state["averaged_model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.lr_scheduler is not None and state["lr_scheduler"] is not None:
            length = getattr(self.lr_scheduler, "T_max", None)
            self.lr_scheduler.load_state_dict(state["lr_scheduler"])
            if length is not None and length != self.lr_scheduler.T_max:
                _stretch_cosine(self.lr_scheduler, length)
        scaler = getattr(engine, "scaler", None)
        if scaler is not None and state["scaler"] is not None:
            scaler.load_state_dict(state["scaler"])
        early = self._early_stopping()
        if early is not None and state["early_stopping"] is not None:
            early.load_state_dict(state["early_stopping"])
        if self.evaluator is not None and state["best_metric"] is not None:
            self.evaluator.state.best_metric = state["best_metric"]
            self.evaluator.state.best_metric_epoch = state["best_metric_epoch"]
        rng = state["rng"]
        torch.set_rng_state(rng["torch"])
        if rng["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        np.random.set_state(rng["numpy"])
        random.setstate(rng["python"])
        transforms = _random_transforms(engine.data_loader.dataset)
        if len(transforms) != len(rng["transforms"]):
            raise CheckpointError(
                f"{self.path} was written with {len(rng['transforms'])} random transforms, the config now has "
                f"{len(transforms)}; pass --resume False to start afresh"
            )
        for transform, transform_state in zip(transforms, rng["transforms"]):
            transform.R.set_state(transform_state)
        engine.state.epoch, engine.state.iteration = state["epoch"], state["iteration"]
        if state["finished"] or state["epoch"] >= engine.state.max_epochs:
            logger.info("training in %s already finished at epoch %d: nothing to resume (resume=False retrains)",
                        self.path.parent, state["epoch"])
            engine.terminate()
        else:
            logger.info("resuming from epoch %d of %d (%s)", state["epoch"], engine.state.max_epochs, self.path)


__all__ = [
    "LeakageError", "CheckpointError", "load_state_dict_file", "checkpoint_settings", "atomic_torch_save", "split_ids", "with_run_metadata", "read_run_metadata", "read_checkpoint_split", "check_no_leakage",
    "BestModelSaver", "TrainingStateCheckpoint", "check_validation_interval",
]
