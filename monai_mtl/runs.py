"""Launch bundle training runs as child processes (cross-validation folds, network baselines, grid trials).

Each run is an ordinary ``python -m monai.bundle run training`` command, so it logs, checkpoints,
resumes and fails exactly like one typed by hand, and one run's memory never leaks into the next.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
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
    overrides: Mapping[str, object] | None = None, overwrite: bool = False,
) -> Path:
    """Run one training in a child process; returns its output folder.

    A finished run (``test_metrics.json``) is reused only when the settings it stored equal the ones
    these arguments give; otherwise it is refused, naming the differences, unless ``overwrite``
    (which trains it again from scratch, ``--resume False``). An unfinished run is resumed by the
    child, which refuses other settings itself.

    Raises:
        ConfigError: a finished run of other settings, and not ``overwrite``.
        RunError: the child failed; the message ends with its last error line.
    """
    from monai_mtl.run_folder import SETTINGS_FILE, differences, requested_settings

    output_dir = Path(output_dir)
    overrides = dict(overrides or {})
    if (output_dir / "test_metrics.json").is_file() and not overwrite:
        requested = requested_settings(config_files, dataset_dir, output_dir, overrides)
        settings_file = output_dir / SETTINGS_FILE
        stored = json.loads(settings_file.read_text()) if settings_file.is_file() else {}
        if stored == requested:
            logger.info("%s already finished with the same settings, not rerun", output_dir)
            return output_dir
        changed = differences(stored.get("config", {}), requested["config"])
        if stored.get("max_epochs") != requested["max_epochs"]:
            changed.insert(0, f"max_epochs: {stored.get('max_epochs')} -> {requested['max_epochs']}")
        if stored.get("cohort") != requested["cohort"]:
            changed.insert(0, "another cohort (labels.csv or images)")
        if not stored:
            changed = [f"it stores no {SETTINGS_FILE} (an older version's run)"]
        raise ConfigError(f"{output_dir} holds a finished run made with other settings ({'; '.join(changed)}): "
                          "pass --overwrite to train it again, or use another output folder")
    if overwrite:
        overrides["resume"] = False
    command = training_command(config_files, dataset_dir, output_dir, overrides)
    logger.info("run: %s", " ".join(command))
    _run_child(command, output_dir)
    if not (output_dir / "test_metrics.json").is_file():
        raise RunError(f"the run in {output_dir} finished without writing test_metrics.json")
    return output_dir


def _run_child(command: Sequence[str], output_dir: Path) -> None:
    """Run ``command``, passing its stderr through unchanged (progress bars too), and keep its last line for errors."""
    process = subprocess.Popen(command, stderr=subprocess.PIPE)
    tail = b""
    while chunk := os.read(process.stderr.fileno(), 65536):
        sys.stderr.buffer.write(chunk)
        sys.stderr.buffer.flush()
        tail = (tail + chunk)[-8192:]
    process.stderr.close()
    if process.wait() != 0:
        lines = [line.strip() for line in tail.decode(errors="replace").replace("\r", "\n").splitlines() if line.strip()]
        last = lines[-1].removeprefix("monai-mtl: error: ") if lines else f"exit status {process.returncode}"
        raise RunError(f"the run in {output_dir} failed: {last}")


__all__ = ["bundle_dir", "CONFIG_DIR", "DEFAULT_CONFIG", "training_command", "run_training"]
