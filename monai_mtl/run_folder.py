"""A run's output folder: one run at a time, settings remembered and checked, misspelt keys and fresh starts made explicit.

A training run (and ``cv`` / ``grid`` / ``baseline`` / ``robustness`` parents) holds a lock file in
its folder while it lives. A training run stores the settings that define it in
``run_settings.json``: the bundle config as resolved from its files and overrides, without the
:data:`LOGISTICS` keys, and a fingerprint of the cohort (``labels.csv`` and every image's size and
first and last bytes). Resuming with other settings, another cohort, or a folder of an older
version is refused, naming each difference and the way out (``--resume False``). A setting added to the
configs later (:data:`ADDED_SETTINGS`) is read, in a run stored before it, as the value that run used.
Beside them, ``environment.json`` records the machine each sitting of the run trained on (:func:`record_environment`):
what its wall time and, through the CPU's kernels, the last digits of its figures depend on.

MONAI gives the expressions of a bundle config no handle on the parser that evaluates them, so
:func:`current_bundle` finds the running ``ConfigWorkflow`` (and, when started through
``monai.bundle.run``, the config files and overrides given to ``create_workflow``) on the call stack.
"""

from __future__ import annotations

import ast
import atexit
import difflib
import hashlib
import inspect
import json
import logging
import os
import shutil
import socket
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from monai_mtl.errors import ConfigError, RunLockError
from monai_mtl.io import atomic_write_json
from monai_mtl.transforms import BatchScannerAugmentation

logger = logging.getLogger(__name__)

LOCK_FILE = ".monai_mtl.lock"
SETTINGS_FILE = "run_settings.json"
#: the machine(s) a run trained on, one entry per sitting that ran elsewhere than the one before (never compared)
ENVIRONMENT_FILE = "environment.json"
#: a finished run's test and evaluation results (the ``evaluating`` workflow's figures too): stale once the run trains on
FINISHED_OUTPUTS = (
    "test_metrics.json", "test_predictions.csv", "metrics.json", "predictions.csv", "confusion_matrix.png",
    "severity_scatter.png", "severity_error_histogram.png", "reliability_diagram.png", "training_curves.png",
    "covariate_attributions.csv", "covariate_importance.png",
)
#: what a training run writes into its folder; ``--resume False`` removes exactly these (nothing else)
RUN_OUTPUTS = ("model.pt", "training_state.pt", "split.json", SETTINGS_FILE, ENVIRONMENT_FILE, "tensorboard", *FINISHED_OUTPUTS)
#: config keys that say where and how fast a run works, not what it learns: they may change on resume
LOGISTICS = frozenset({
    "bundle_root", "dataset_dir", "synthetic_dir", "synthetic_shape", "synthetic_spacing", "synthetic_num_samples", "synthetic_covariates", "output_dir", "ckpt_path", "device", "num_workers", "cache_workers", "cache", "cache_dir",
    "validate_images", "resume", "allow_split_overlap", "max_epochs", "imports", "initialize", "finalize", "run",
    "training", "evaluating", "_meta_",
})
#: settings added after runs were made, with the value that reproduces what those runs did: a stored
#: run that lacks one of these keys was made with this value, so it is no difference on resume
_LANDMARKS_CALL = "$monai_mtl.transforms.fit_landmarks(@datalists['train'], @intensity_normalization, @pixdim, @spatial_size"
ADDED_SETTINGS = {
    "covariate_fusion": "concat",
    "network_def#covariate_fusion": "@covariate_fusion",
    "ema_momentum": 0.0,
    "weight_average": "$monai_mtl.handlers.weight_average(@network, @ema_momentum)",
    "validation_network": "$monai_mtl.handlers.validation_network(@network, @weight_average)",
    "train#named_handlers#weight_average": "@weight_average",
    "train#named_handlers#precise_batch_norm#network": "@validation_network",
    "train#named_handlers#training_state#weight_average": "@weight_average",
    "severity_recalibration": "none",
    "covariate_count_levels": 0,
    "lr_schedule": "plateau",
    "network_def#response_encoder_gradient": 1.0,
    "network_def#severity_encoder_gradient": 1.0,
    "loss_weighting_lr_factor": 1.0,
    "network_def#pooling": "max",
    "network_def#anti_alias": "none",
    "bn_recalibration_augmented": True,
    "train#named_handlers#precise_batch_norm#prepare_batch": ("$None if @bn_recalibration_augmented else "
                                                              "monai_mtl.engines.MultiTaskPrepareBatch(channels_last="
                                                              "@channels_last, augmentation=@train::batch_augmentation.clean)"),
    "bn_recalibration_final_batches": 0,
    "bn_recalibration_final_epochs": 10,
    "train#named_handlers#precise_batch_norm#final_batches": "@bn_recalibration_final_batches",
    "train#named_handlers#precise_batch_norm#final_from_epoch": "$@max_epochs - @bn_recalibration_final_epochs + 1",
    "train#batch_augmentation#scanner": "@scanner_augmentation",
    "bias_field_correction": 0,
    "preprocessing_settings#bias_field_degree": "@bias_field_correction",
    # fits nothing (returns ``()``) unless intensity_normalization is ``histogram``, which came with it
    "preprocessing_settings#landmarks": _LANDMARKS_CALL + ")",
    # no moves: the one pass of the ``SimpleInferer`` that the test and calibration evaluators had before
    "test_time_shifts": [],
    # the best validation score's epoch, the only selection there was
    "checkpoint_selection": "best",
    "validate#named_handlers#best_model#selection": "@checkpoint_selection",
    "covariate_dropout": 0.0,
    "severity_bins": 0,
    "network_def#severity_bins": "@severity_bins",
    "severity_bin_sigma": 2.0,
    "loss#severity_bin_sigma": "$@severity_bin_sigma / monai_mtl.SEVERITY_SCALE",
    "train#prepare_batch#covariate_augmentation": "$monai_mtl.covariates.covariate_dropout(@covariate_encoding, @covariate_dropout)",
    "predict_inferer#_target_": "monai_mtl.engines.ShiftAveragingInferer",
    "predict_inferer#shifts": "@test_time_shifts",
}
_DATALISTS_CALL = ("$monai_mtl.cohort.prepare_datalists(@dataset_dir, @output_dir, seed=@seed, test_fraction=@test_fraction, "
                   "validation_fraction=@validation_fraction, validate_images=@validate_images, num_folds=@num_folds, "
                   "fold=@fold, held_out_site=@held_out_site, response_column=@response_column, "
                   "severity_column=@severity_column, bids_session=@bids_session, covariates=@covariates")
#: settings an earlier version stored with another value that did what the current one does: ``key: (stored,
#: current)``; ``@validation_network`` is ``@network`` unless ``ema_momentum`` (itself compared) is set
FORMER_SETTINGS = {
    # before bias_field_correction (itself compared; 0 = the preprocessing of then): the same fit without that argument
    "preprocessing_settings#landmarks": (_LANDMARKS_CALL + ")", _LANDMARKS_CALL + ", bias_field_degree=@bias_field_correction)"),
    "validate#evaluator#network": ("@network", "@validation_network"),
    # before loss_weighting_lr_factor (itself compared; 1 = the optimizer of then): the loss's parameters beside the network's
    "optimizer#params": ("$list(@network.parameters()) + list(@loss.parameters())",
                         "$monai_mtl.engines.optimizer_parameters(@network, @loss, @learning_rate, @loss_weighting_lr_factor)"),
    # before test_time_shifts (itself compared; ``[]`` = one pass, as then): the checkpoint's predictions had the
    # per-epoch validation's inferer
    "test#evaluator#inferer": ("@validate::inferer", "@predict_inferer"),
    "calibrate#validation_evaluator#inferer": ("@validate::inferer", "@predict_inferer"),
    "validate#named_handlers#best_model#network": ("@network", "@validation_network"),
    # before covariate_count_levels (itself compared; 0 = the encoding of then): the same call without that argument
    "datalists": (_DATALISTS_CALL + ")", _DATALISTS_CALL + ", covariate_count_levels=@covariate_count_levels)"),
    # before lr_schedule (itself compared; ``plateau`` = the behaviour of then): the plateau rule written out
    "validate#named_handlers#lr_schedule#step_transform": ("$lambda e: e.state.metrics['val_loss']",
                                                           "$monai_mtl.engines.lr_step_input(@lr_schedule)"),
    "validate#early_stop#patience": ("@early_stop_patience",
                                     "$monai_mtl.engines.early_stop_patience(@early_stop_patience, @lr_schedule, @max_epochs)"),
}
#: groups of settings an earlier version stored that did what one current setting does (``FORMER_SETTINGS`` for a
#: config object written out as a dict): ``(stored keys and values, current key, current value)``
FORMER_GROUPS = (
    ({"lr_scheduler#_target_": "torch.optim.lr_scheduler.ReduceLROnPlateau", "lr_scheduler#optimizer": "@optimizer",
      "lr_scheduler#mode": "min", "lr_scheduler#factor": "@lr_factor", "lr_scheduler#patience": "@lr_patience"},
     "lr_scheduler", "$monai_mtl.engines.lr_scheduler(@optimizer, @lr_schedule, @max_epochs, @lr_factor, @lr_patience)"),
)
#: keyword arguments of ``monai.bundle.run`` / ``create_workflow`` that are not config overrides
_RUN_ARGUMENTS = frozenset({
    "run_id", "init_id", "final_id", "meta_file", "config_file", "logging_file", "tracking", "args_file",
    "workflow_type", "workflow_name", "properties_path",
})


# --- the running bundle --------------------------------------------------------------------------------

def current_bundle() -> tuple[Any, Sequence[str] | None, dict | None]:
    """``(ConfigWorkflow, config files, overrides)`` of the bundle run evaluating the caller.

    The files and overrides are ``None`` when the workflow was not made by ``monai.bundle``'s
    ``create_workflow`` (e.g. a ``ConfigWorkflow`` built by hand).

    Raises:
        ConfigError: not called from a bundle config.
    """
    from monai.bundle import ConfigWorkflow

    workflow, files, overrides = None, None, None
    for frame_info in inspect.stack(context=0):
        local = frame_info.frame.f_locals
        if workflow is None and isinstance(local.get("self"), ConfigWorkflow):
            workflow = local["self"]
        if frame_info.function == "create_workflow" and "_args" in local:
            files = local.get("config_file")
            overrides = {k: v for k, v in local["_args"].items() if k not in _RUN_ARGUMENTS}
            break
    if workflow is None:
        raise ConfigError("not inside a MONAI bundle run (python -m monai.bundle run ...)")
    if isinstance(files, (str, os.PathLike)):
        files = [str(files)]
    return workflow, files, overrides


def flatten(config: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a#b#0": value}`` for every leaf of a nested config (MONAI's ``#`` id separator)."""
    if isinstance(config, Mapping):
        items = config.items()
    elif isinstance(config, list) and any(isinstance(v, (Mapping, list)) for v in config):
        items = enumerate(config)
    else:
        return {prefix: config}
    flat: dict[str, Any] = {}
    for key, value in items:
        flat.update(flatten(value, f"{prefix}#{key}" if prefix else str(key)))
    return flat


# before scanner_augmentation, the robust preset drew the class defaults: MONAI's ranges, no ghosting
ADDED_SETTINGS.update(flatten({"scanner_augmentation": BatchScannerAugmentation.default_settings()}))


def check_overrides() -> None:
    """Refuse an override naming a key that none of the bundle's config files has, with the nearest known key.

    MONAI adds any ``--key value`` to the config, so ``--max_epoch 2`` would be echoed and ignored.

    Raises:
        ConfigError: ``unknown config key 'max_epoch' (did you mean 'max_epochs'?)``.
    """
    from monai.bundle import ConfigParser

    _, files, overrides = current_bundle()
    if not files or not overrides:
        return
    parser = ConfigParser()
    parser.read_config(f=list(files))
    known = list(flatten(parser.get()))
    for key in overrides:
        if key in parser:
            continue
        nearest = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
        hint = f" (did you mean '{nearest[0]}'?)" if nearest else ""
        raise ConfigError(f"unknown config key '{key}'{hint}: it is in none of {', '.join(Path(f).name for f in files)}")


# --- one run at a time ---------------------------------------------------------------------------------

class RunLock:
    """A lock file in a run folder naming the process that holds it (PID, host, start time).

    A second run refuses while the holder lives. A lock whose process has ended on this host (or a
    lock left by this very process, e.g. after a failed in-process run) is taken over with a log line.
    A lock of another host cannot be checked and is refused, naming the file to delete if that run is gone.
    """

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_FILE
        self.held = False

    def _holder(self) -> dict:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}

    @staticmethod
    def _alive(holder: Mapping) -> bool:
        if holder.get("host") != socket.gethostname():
            return bool(holder)  # another host: cannot tell, assume it lives
        pid = holder.get("pid")
        if not isinstance(pid, int) or pid == os.getpid():
            return False
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    def acquire(self) -> RunLock:
        self.folder.mkdir(parents=True, exist_ok=True)
        record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if self._alive(holder):
                    where = "this host" if holder.get("host") == socket.gethostname() else f"host {holder.get('host')}"
                    raise RunLockError(
                        f"{self.folder} is in use by another run (pid {holder.get('pid')} on {where}, started "
                        f"{holder.get('started')}); wait for it to end or use another output folder"
                        + ("" if where == "this host" else f" (delete {self.path} if that run is gone)")
                    ) from None
                logger.warning("taking over the stale lock %s of %s (that process has ended)", self.path, holder or "an unreadable record")
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(record, f)
            self.held = True
            atexit.register(self.release)
            return self
        raise RunLockError(f"could not take the lock {self.path}")

    def release(self) -> None:
        if self.held and self._holder().get("pid") == os.getpid():
            self.path.unlink(missing_ok=True)
        self.held = False

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


_LOCKS: dict[Path, RunLock] = {}


def lock_run_folder(folder: str | os.PathLike) -> RunLock:
    """Take the lock of ``folder`` for the rest of this run (released by :func:`release_run_folder` or at exit)."""
    key = Path(folder).absolute()
    lock = _LOCKS.get(key)
    if lock is None or not lock.held:
        lock = _LOCKS[key] = RunLock(folder).acquire()
    return lock


def release_run_folder(folder: str | os.PathLike) -> None:
    lock = _LOCKS.pop(Path(folder).absolute(), None)
    if lock is not None:
        lock.release()


# --- settings ------------------------------------------------------------------------------------------

def cohort_fingerprint(dataset_dir: str | os.PathLike, chunk: int = 65536, response_column: str = "response",
                       severity_column: str = "severity") -> str:
    """SHA-256 over ``labels.csv`` (a BIDS dataset's ``participants.tsv``) and each image's size and first and last ``chunk`` bytes.

    Cheap on real-size cohorts (two reads per file) and independent of where the folder lies, so a
    moved or copied cohort still resumes, while other images under the same ``labels.csv`` do not.
    ``response_column`` / ``severity_column``: the run's, so that ``labels.csv`` is read (and checked) as its training reads it.
    """
    from monai_mtl.bids import PARTICIPANTS, is_bids_root, t1w_images
    from monai_mtl.cohort import read_labels

    dataset_dir = Path(dataset_dir)
    if not (dataset_dir / "labels.csv").is_file() and is_bids_root(dataset_dir):  # participants.tsv and every T1w image
        labels_file, images = dataset_dir / PARTICIPANTS, sorted(t1w_images(dataset_dir).values())
    else:
        labels_file = dataset_dir / "labels.csv"
        images = read_labels(labels_file, response_column, severity_column)["image"]
    digest = hashlib.sha256(labels_file.read_bytes())
    for image in images:
        size = os.path.getsize(image)
        with open(image, "rb") as f:
            head = f.read(chunk)
            f.seek(max(size - chunk, 0))
            tail = f.read(chunk)
        digest.update(f"{size}:".encode() + head + tail)
    return digest.hexdigest()


def defining_settings(config: Mapping) -> dict[str, Any]:
    """The flattened config without the :data:`LOGISTICS` keys (JSON round-tripped: lists stay lists)."""
    flat = {k: v for k, v in flatten(dict(config)).items() if k.split("#", 1)[0] not in LOGISTICS}
    return json.loads(json.dumps(flat, default=str))


def differences(stored: Mapping, current: Mapping, limit: int = 6) -> list[str]:
    """``key: old -> new`` for each differing key (``(unset)`` where one side lacks it).

    A key of :data:`ADDED_SETTINGS` that ``stored`` lacks and ``current`` has counts as stored with its value there;
    a value of :data:`FORMER_SETTINGS` (a group of :data:`FORMER_GROUPS`) counts as the value that replaced it.
    """
    stored = {**{k: v for k, v in ADDED_SETTINGS.items() if k in current}, **stored}
    stored.update({k: new for k, (old, new) in FORMER_SETTINGS.items() if stored.get(k) == old and current.get(k) == new})
    for group, key, value in FORMER_GROUPS:
        if key not in stored and current.get(key) == value and all(stored.get(k) == v for k, v in group.items()):
            stored = {**{k: v for k, v in stored.items() if k not in group}, key: value}
    keys = sorted(k for k in set(stored) | set(current) if stored.get(k, "(unset)") != current.get(k, "(unset)"))
    lines = [f"{k}: {json.dumps(stored.get(k, '(unset)'))} -> {json.dumps(current.get(k, '(unset)'))}" for k in keys[:limit]]
    if len(keys) > limit:
        lines.append(f"and {len(keys) - limit} more")
    return lines


def fresh_start(output_dir: str | os.PathLike) -> None:
    """Remove what an earlier run wrote into ``output_dir`` (:data:`RUN_OUTPUTS`), nothing else."""
    output_dir = Path(output_dir)
    for name in RUN_OUTPUTS:
        target = output_dir / name
        if target.is_dir():
            logger.info("fresh start (resume=False): removing %s", target)
            shutil.rmtree(target)
        elif target.exists():
            logger.info("fresh start (resume=False): removing %s", target)
            target.unlink()


def start_training_run(output_dir: str | os.PathLike, resume: bool = True) -> None:
    """Before a training run touches its folder: check the overrides, take the lock, and start afresh if asked."""
    check_overrides()
    lock_run_folder(output_dir)
    if not resume:
        fresh_start(output_dir)


# --- the machine a run trained on ------------------------------------------------------------------------

def _cpu_model() -> str:
    """The CPU's model name (Linux's ``/proc/cpuinfo``; ``platform.processor()`` elsewhere, often only the architecture)."""
    import platform

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe_machine(device: Any = None) -> dict[str, Any]:
    """What a training's speed and last digits depend on: the CPU and the instruction set torch's kernels use on it
    (``AVX2``, ``AVX512``: oneDNN picks other convolution kernels, so the same seed trains to slightly other
    weights), the cores and threads, the GPU where ``device`` is one, the process count under DDP, and the versions.

    Not MONAI's ``monai.config.deviceconfig.get_system_info()``: it has no CPU model where ``platform.processor()`` is
    empty (as on Linux), not the instruction set, and with psutil it adds readings that change by the second (CPU
    usage, free memory, open files), so two sittings on one machine would never compare equal."""
    import platform

    import monai
    import torch
    import torch.distributed as dist

    machine: dict[str, Any] = {
        "cpu": _cpu_model(), "cpu_capability": torch.backends.cpu.get_cpu_capability(), "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "architecture": platform.machine(), "system": platform.system(),
        "python": platform.python_version(), "torch": torch.__version__, "monai": monai.__version__,
    }
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type == "cuda" and torch.cuda.is_available():
        machine["gpu"] = torch.cuda.get_device_name(device)
    if dist.is_available() and dist.is_initialized():
        machine["processes"] = dist.get_world_size()
    return machine


def machine_label(machine: Mapping[str, Any]) -> str:
    """``2 CPU cores (AMD EPYC, AVX2), torch 2.13.0+cpu, Python 3.11.7`` (and the GPU and processes where there were).

    Fewer torch threads than cores (``cv --jobs 2`` gives each of two runs one) are named too (``, 1 torch thread``):
    they change the wall time, and the rounding of oneDNN's reductions like another CPU's kernels do.
    """
    text = f"{machine.get('cpu_cores', '?')} CPU cores ({machine.get('cpu', '?')}, {machine.get('cpu_capability', '?')})"
    threads = machine.get("torch_threads")
    if threads is not None and threads != machine.get("cpu_cores"):
        text += f", {threads} torch thread{'s' if threads != 1 else ''}"
    if machine.get("gpu"):
        text += f", GPU {machine['gpu']}"
    if machine.get("processes", 1) > 1:
        text += f", {machine['processes']} processes"
    return f"{text}, torch {machine.get('torch', '?')}, Python {machine.get('python', '?')}"


def record_environment(output_dir: str | os.PathLike, device: Any = None) -> dict[str, Any]:
    """Add this sitting's machine to the run folder's ``environment.json``, where it differs from the last sitting's.

    A run resumed on another machine lists both, in order; one resumed where it started lists one. The file is
    never compared on resume (a run may move between machines); ``results`` reads it for the machine of each row.
    """
    path = Path(output_dir) / ENVIRONMENT_FILE
    machine = describe_machine(device)
    sittings = json.loads(path.read_text()).get("sittings", []) if path.is_file() else []
    if not sittings or {k: v for k, v in sittings[-1].items() if k != "started"} != machine:
        sittings.append({"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **machine})
        atomic_write_json(path, {"sittings": sittings})
    logger.info("%s: training on %s", output_dir, machine_label(machine))
    return machine


def run_machines(run_dir: str | os.PathLike) -> list[str] | None:
    """The labels of the machines ``run_dir`` trained on, in order (``None``: a run made before they were recorded)."""
    path = Path(run_dir) / ENVIRONMENT_FILE
    if not path.is_file():
        return None
    labels = [machine_label(sitting) for sitting in json.loads(path.read_text()).get("sittings", [])]
    return list(dict.fromkeys(labels)) or None


def _stored_settings(run_dir: str | os.PathLike) -> dict:
    """A run folder's ``run_settings.json`` (``{}`` without one: a run of an older version, or no training run)."""
    settings_file = Path(run_dir) / SETTINGS_FILE
    return json.loads(settings_file.read_text()) if settings_file.is_file() else {}


def run_setting(run_dir: str | os.PathLike, key: str, default: Any = None) -> Any:
    """The bundle setting ``key`` run ``run_dir`` was trained with (its ``run_settings.json``); ``default`` without
    that file or key."""
    return _stored_settings(run_dir).get("config", {}).get(key, default)


#: the settings that decide how a cohort is read (which label columns, which BIDS session) and their defaults
COHORT_READING = {"response_column": "response", "severity_column": "severity", "bids_session": None}


def cohort_reading(run_dir: str | os.PathLike, stored: dict | None = None) -> dict[str, Any]:
    """The :data:`COHORT_READING` settings run ``run_dir`` was trained with (the defaults for a key it does not store);
    ``stored``: its settings, when already read."""
    config = (_stored_settings(run_dir) if stored is None else stored).get("config", {})
    return {key: config.get(key, default) for key, default in COHORT_READING.items()}


def trained_dataset_dir(split_file: str | os.PathLike) -> str | None:
    """The cohort folder a run's ``split.json`` says it was made from, ``None`` when it records none."""
    split_file = Path(split_file)
    return json.loads(split_file.read_text()).get("dataset_dir") if split_file.is_file() else None


def run_dataset_dir(run_dir: str | os.PathLike | None, split_file: str | os.PathLike | None = None,
                    fallback: str = "data/synthetic") -> str:
    """Where a tool that reads a run's cohort looks when not told: the folder the run was trained on (its
    ``split.json``; ``split_file`` instead of ``<run_dir>/split.json``) while that folder exists, else ``fallback``.

    A run folder copied from another machine records a path that may not exist here; the fallback is then read and
    checked against the run's cohort fingerprint (:func:`read_run_cohort`), which names the recorded folder.
    """
    split_file = Path(split_file) if split_file is not None else Path(run_dir) / "split.json" if run_dir else None
    where = trained_dataset_dir(split_file) if split_file is not None else None
    if where and Path(where).is_dir():
        logger.info("cohort: %s, as %s records it (give the dataset dir to read another)", where, split_file)
        return where
    return fallback


def read_run_cohort(run_dir: str | os.PathLike, dataset_dir: str | os.PathLike, same_cohort: bool = True):
    """``dataset_dir``'s labels as run ``run_dir`` read them (:func:`cohort_reading`, :func:`monai_mtl.cohort.read_cohort`),
    so a tool that predicts a run's test part (the robustness sweep, the OOD report) reads the same scans and labels
    as its training did. ``same_cohort=False`` skips the check below, for tools that fit their own model on the run's
    split (the scikit-learn baselines), where the cohort may have gained columns since.

    Raises:
        CohortError: ``dataset_dir`` is not the cohort the run was trained on (its labels or images differ from the
            fingerprint in the run's ``run_settings.json``): the run's part names would pick other subjects' scans.
    """
    from monai_mtl.cohort import read_cohort
    from monai_mtl.errors import CohortError

    stored = _stored_settings(run_dir)
    reading, trained_on = cohort_reading(run_dir, stored), stored.get("cohort")
    if same_cohort and trained_on and cohort_fingerprint(dataset_dir, response_column=reading["response_column"],
                                         severity_column=reading["severity_column"]) != trained_on:
        where = trained_dataset_dir(Path(run_dir) / "split.json")
        raise CohortError(f"{dataset_dir} is not the cohort {run_dir} was trained on (its labels or images differ from "
                          f"the run's {SETTINGS_FILE})" + (f"; it was trained on {where}" if where else ""))
    return read_cohort(dataset_dir, reading["response_column"], reading["severity_column"], reading["bids_session"])


def check_run_settings(output_dir: str | os.PathLike, dataset_dir: str | os.PathLike) -> dict:
    """Store this run's settings, or refuse to resume a run that was made with other ones.

    Raises:
        ConfigError: the folder holds a training state made with other settings, another cohort, or by
            a version that stored none; names each difference and ``--resume False``.
    """
    workflow, _, _ = current_bundle()
    current = _settings(workflow.parser.get(), dataset_dir)
    output_dir = Path(output_dir)
    settings_file, state_file = output_dir / SETTINGS_FILE, output_dir / "training_state.pt"
    way_out = "pass --resume False to start afresh in it, or use another output_dir"
    if state_file.is_file():
        if not settings_file.is_file():
            raise ConfigError(f"{output_dir} holds a training state but no {SETTINGS_FILE} (an older version's run): {way_out}")
        stored = json.loads(settings_file.read_text())
        changed = differences(stored.get("config", {}), current["config"])  # max_epochs may change: a resume can extend
        if stored.get("cohort") != current["cohort"]:
            changed.insert(0, f"the cohort in {dataset_dir} (labels.csv or images) differs from the one the run was trained on")
        if changed:
            raise ConfigError(f"{output_dir} holds a run made with other settings ({'; '.join(changed)}): {way_out}")
        if stored.get("max_epochs") != current["max_epochs"]:  # an extended (or shortened) run: its settings say so
            logger.info("%s: max_epochs %s -> %s", output_dir, stored.get("max_epochs"), current["max_epochs"])
            atomic_write_json(settings_file, {**stored, "max_epochs": current["max_epochs"]})
        return current
    atomic_write_json(settings_file, current)
    return current


def record_calibration_settings(output_dir: str | os.PathLike, **values: object) -> None:
    """Record in a run folder's settings the calibration settings its checkpoint was calibrated with again.

    Calibration (:func:`~monai_mtl.trust.calibrate_checkpoint`) runs after training and changes no weight,
    so a finished run calibrated again (``run calibrating``) with, say, another ``severity_recalibration``
    is the run a training with that setting would have made; its settings say so from then on, and
    ``cv`` or a resume compares against them. A folder without settings (a bare checkpoint) is left alone.
    """
    settings_file = Path(output_dir) / SETTINGS_FILE
    if not settings_file.is_file():
        return
    stored = json.loads(settings_file.read_text())
    config = stored.get("config", {})
    # flattened as a training stores its settings (a list of moves is ``test_time_shifts#0`` ...), replacing every
    # stored leaf of each recorded key (a shorter list leaves none behind)
    recorded = flatten(json.loads(json.dumps(values, default=str)))
    kept = {k: v for k, v in config.items() if not any(k == key or k.startswith(f"{key}#") for key in values)}
    if {**kept, **recorded} != config:
        changed = {k: v for k, v in recorded.items() if config.get(k, ADDED_SETTINGS.get(k)) != v}
        logger.info("%s: calibration settings recorded: %s", settings_file, changed or values)
        atomic_write_json(settings_file, {**stored, "config": {**kept, **recorded}})


def requested_settings(
    config_files: Sequence[str], dataset_dir: str | os.PathLike, output_dir: str | os.PathLike,
    overrides: Mapping[str, object] | None = None,
) -> dict:
    """The settings a child ``python -m monai.bundle run training`` with these arguments would store.

    Override values are read back as the command line gives them (``python-fire`` parses them as
    Python literals), so a parent compares like for like.
    """
    return _settings(requested_config(config_files, dataset_dir, output_dir, overrides), dataset_dir)


def requested_config(
    config_files: Sequence[str], dataset_dir: str | os.PathLike, output_dir: str | os.PathLike,
    overrides: Mapping[str, object] | None = None,
) -> dict:
    """The bundle config of such a child run, its files merged and overrides applied (expressions not evaluated)."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(f=list(config_files))
    values = {"dataset_dir": str(dataset_dir), "output_dir": str(output_dir)}
    values.update({k: _as_cli_value(v) for k, v in (overrides or {}).items()})
    parser.update(pairs=values)
    parser.resolve_macro_and_relative_ids()  # as ConfigWorkflow.initialize does before the child stores its settings
    return parser.get()


def _settings(config: Mapping, dataset_dir: str | os.PathLike) -> dict:
    return {"config": defining_settings(config), "max_epochs": config.get("max_epochs"),
            "cohort": cohort_fingerprint(dataset_dir, response_column=config.get("response_column", "response"),
                                         severity_column=config.get("severity_column", "severity"))}


def _as_cli_value(value: object) -> object:
    text = str(value)
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


__all__ = [
    "LOCK_FILE", "SETTINGS_FILE", "ENVIRONMENT_FILE", "describe_machine", "machine_label", "record_environment", "run_machines", "FINISHED_OUTPUTS", "RUN_OUTPUTS", "LOGISTICS", "ADDED_SETTINGS", "FORMER_SETTINGS", "FORMER_GROUPS", "current_bundle", "flatten", "check_overrides", "record_calibration_settings", "RunLock",
    "lock_run_folder", "release_run_folder", "cohort_fingerprint", "defining_settings", "differences", "fresh_start",
    "start_training_run", "check_run_settings", "requested_settings", "requested_config", "run_setting", "COHORT_READING", "cohort_reading", "read_run_cohort",
]
