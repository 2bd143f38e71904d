"""Launch bundle training runs as child processes (cross-validation folds, network baselines, grid trials).

Each run is an ordinary ``python -m monai.bundle run training`` command, so it logs, checkpoints,
resumes and fails exactly like one typed by hand, and one run's memory never leaks into the next.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

logger = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).resolve().parents[1] / "bundle" / "configs"
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
    overrides: Mapping[str, object] | None = None,
) -> Path:
    """Run one training in a child process unless its ``test_metrics.json`` exists; returns the output folder.

    Raises:
        subprocess.CalledProcessError: the run failed (its log went to this process's stderr).
        RuntimeError: it ended without writing ``test_metrics.json``.
    """
    output_dir = Path(output_dir)
    if (output_dir / "test_metrics.json").is_file():
        logger.info("%s already finished, not rerun", output_dir)
        return output_dir
    command = training_command(config_files, dataset_dir, output_dir, overrides)
    logger.info("run: %s", " ".join(command))
    subprocess.run(command, check=True)
    if not (output_dir / "test_metrics.json").is_file():
        raise RuntimeError(f"the run finished without writing {output_dir / 'test_metrics.json'}")
    return output_dir


__all__ = ["CONFIG_DIR", "DEFAULT_CONFIG", "training_command", "run_training"]
