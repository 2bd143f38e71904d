"""Launch bundle training runs as child processes (cross-validation folds, network baselines, grid trials).

Each run is an ordinary ``python -m monai.bundle run training`` command, so it logs, checkpoints,
resumes and fails exactly like one typed by hand, and one run's memory never leaks into the next.

:func:`run_trainings` runs several at once (``--jobs N`` of ``cv``, ``grid``, ``baseline`` and
``robustness``): each child gets ``cpu_count // N`` intra-op threads (``OMP_NUM_THREADS``, read by
PyTorch at start-up), so N runs share the cores instead of oversubscribing them; on a GPU they share
the device. Each concurrent child writes its output to ``<run folder>.log`` beside its folder instead
of interleaving progress bars on the terminal.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from monai_mtl.errors import ConfigError, RunError

logger = logging.getLogger(__name__)



def bundle_dir() -> Path:
    """The MONAI bundle folder: the copy a non-editable install ships inside the package, else the repository's."""
    package = Path(__file__).resolve().parent
    shipped = package / "bundle"
    return shipped if (shipped / "configs" / "train.json").is_file() else package.parent / "bundle"


CONFIG_DIR = bundle_dir() / "configs"
DEFAULT_CONFIG = str(CONFIG_DIR / "train.json")


def training_command(
    config_files: Sequence[str], dataset_dir: str | os.PathLike, output_dir: str | os.PathLike,
    overrides: Mapping[str, object] | None = None,
) -> list[str]:
    """The ``python -m monai.bundle run training`` command line for these configs and overrides."""
    config = str(list(config_files)) if len(config_files) > 1 else str(config_files[0])
    command = [
        sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", config,
        "--dataset_dir", str(dataset_dir), "--output_dir", str(output_dir),
    ]
    for key, value in (overrides or {}).items():
        command += [f"--{key}", str(value)]
    return command


def run_training(
    config_files: Sequence[str], dataset_dir: str | os.PathLike, output_dir: str | os.PathLike,
    overrides: Mapping[str, object] | None = None, overwrite: bool = False, threads: int | None = None,
    log_file: str | os.PathLike | None = None,
) -> Path:
    """Run one training in a child process; returns its output folder.

    A finished run (``test_metrics.json``) is reused only when the settings it stored equal the ones
    these arguments give; otherwise it is refused, naming the differences, unless ``overwrite``
    (which trains it again from scratch, ``--resume False``). A finished run asked for more epochs and
    nothing else is continued from its last epoch. An unfinished run is resumed by the
    child, which refuses other settings itself. ``threads``: the child's intra-op threads (default:
    inherited); ``log_file``: write the child's output there instead of passing it through.

    Raises:
        ConfigError: a finished run of other settings, and not ``overwrite``.
        RunError: the child failed; the message ends with its last error line.
    """
    from monai_mtl.run_folder import FINISHED_OUTPUTS, SETTINGS_FILE, differences, requested_settings

    output_dir = Path(output_dir)
    overrides = dict(overrides or {})
    if (output_dir / "test_metrics.json").is_file() and not overwrite:
        requested = requested_settings(config_files, dataset_dir, output_dir, overrides)
        settings_file = output_dir / SETTINGS_FILE
        stored = json.loads(settings_file.read_text()) if settings_file.is_file() else {}
        changed = differences(stored.get("config", {}), requested["config"])
        if stored.get("cohort") != requested["cohort"]:
            changed.insert(0, "another cohort (labels.csv or images)")
        if not stored:
            changed = [f"it stores no {SETTINGS_FILE} (an older version's run)"]
        if not changed and stored.get("max_epochs") == requested["max_epochs"]:
            # the same settings (a key added since, at the value the run used, is no change)
            logger.info("%s already finished with the same settings, not rerun", output_dir)
            return output_dir
        longer = (stored.get("max_epochs") or 0) < (requested["max_epochs"] or 0)
        if changed or not longer or not (output_dir / "training_state.pt").is_file():
            if stored.get("max_epochs") != requested["max_epochs"]:
                changed.insert(0, f"max_epochs: {stored.get('max_epochs')} -> {requested['max_epochs']}")
            raise ConfigError(f"{output_dir} holds a finished run made with other settings ({'; '.join(changed)}): "
                              "pass --overwrite to train it again, or use another output folder")
        # only more epochs: the child resumes the run from its last epoch. What said it had finished goes first, so
        # an extension stopped halfway is an unfinished run (resumed next time), never the old figures under new settings
        logger.info("%s finished %s epochs: continuing it to %s", output_dir, stored.get("max_epochs"), requested["max_epochs"])
        for name in FINISHED_OUTPUTS:
            (output_dir / name).unlink(missing_ok=True)
    if overwrite:
        overrides["resume"] = False
    command = training_command(config_files, dataset_dir, output_dir, overrides)
    logger.info("run: %s", " ".join(command))
    _run_child(command, output_dir, threads, log_file)
    if not (output_dir / "test_metrics.json").is_file():
        raise RunError(f"the run in {output_dir} finished without writing test_metrics.json")
    return output_dir


def _run_child(command: Sequence[str], output_dir: Path, threads: int | None = None,
               log_file: str | os.PathLike | None = None) -> None:
    """Run ``command``, passing its stderr through unchanged (progress bars too) or into ``log_file``; keep its last line for errors."""
    env = dict(os.environ)
    if threads is not None:
        env.update({"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)})
    sink = open(log_file, "wb") if log_file is not None else None
    try:
        process = subprocess.Popen(command, stderr=subprocess.PIPE, stdout=sink, env=env)
        tail = b""
        while chunk := os.read(process.stderr.fileno(), 65536):
            target = sink if sink is not None else sys.stderr.buffer
            target.write(chunk)
            target.flush()
            tail = (tail + chunk)[-8192:]
        process.stderr.close()
        returncode = process.wait()
    finally:
        if sink is not None:
            sink.close()
    if returncode != 0:
        lines = [line.strip() for line in tail.decode(errors="replace").replace("\r", "\n").splitlines() if line.strip()]
        last = lines[-1].removeprefix("monai-mtl: error: ") if lines else f"exit status {returncode}"
        raise RunError(f"the run in {output_dir} failed: {last}" + (f" (its output: {log_file})" if log_file else ""))


@dataclass
class RunRequest:
    """One child training run: the arguments of :func:`run_training`."""

    config_files: Sequence[str]
    dataset_dir: str | os.PathLike
    output_dir: str | os.PathLike
    overrides: Mapping[str, object] = field(default_factory=dict)
    overwrite: bool = False


def threads_per_run(jobs: int) -> int:
    """Intra-op threads for each of ``jobs`` concurrent runs: the cores divided among them, at least 1."""
    return max(1, (os.cpu_count() or 1) // max(1, jobs))


def run_trainings(requests: Sequence[RunRequest], jobs: int = 1, threads: int | None = None) -> list[Path]:
    """Run ``requests`` with at most ``jobs`` at once; returns their folders in order.

    ``jobs`` 1 runs them one after another in the terminal (threads inherited unless ``threads``).
    With more, each child gets ``threads`` (default :func:`threads_per_run`) and its own log file
    ``<output_dir>.log``; every run is attempted, and then the failures are raised together.

    Raises:
        ValueError: ``jobs`` below 1.
        ConfigError, RunError: as :func:`run_training`; several failures in one ``RunError``.
    """
    if jobs < 1:
        raise ValueError(f"--jobs must be at least 1, got {jobs}")
    if jobs == 1:
        return [run_training(r.config_files, r.dataset_dir, r.output_dir, r.overrides, r.overwrite, threads)
                for r in requests]
    threads = threads or threads_per_run(jobs)
    logger.info("%d runs, %d at a time with %d threads each; their output goes to <run folder>.log",
                len(requests), jobs, threads)

    def one(request: RunRequest) -> Path:
        output_dir = Path(request.output_dir)
        output_dir.parent.mkdir(parents=True, exist_ok=True)
        done = run_training(request.config_files, request.dataset_dir, output_dir, request.overrides,
                            request.overwrite, threads, log_file=output_dir.with_name(output_dir.name + ".log"))
        logger.info("finished %s", done)
        return done

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = [pool.submit(one, request) for request in requests]
    failures = [f.exception() for f in futures if f.exception() is not None]
    if len(failures) == 1:
        raise failures[0]
    if failures:
        raise RunError(f"{len(failures)} of {len(requests)} runs failed: " + "; ".join(str(e) for e in failures))
    return [f.result() for f in futures]


__all__ = ["bundle_dir", "CONFIG_DIR", "DEFAULT_CONFIG", "training_command", "run_training", "RunRequest",
           "threads_per_run", "run_trainings"]
