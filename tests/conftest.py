"""Shared fixtures: tiny synthetic cohorts generated once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from monai_mtl.synthetic import CohortConfig, generate_cohort

TINY = CohortConfig(num_samples=24, seed=7)


@pytest.fixture(scope="session")
def tiny_cohort(tmp_path_factory):
    """24 subjects at the paper's grid, generated with two workers."""
    root = tmp_path_factory.mktemp("cohort") / "tiny"
    generate_cohort(root, TINY, workers=2, progress=False)
    return root


BUNDLE_CONFIGS = Path(__file__).resolve().parents[1] / "bundle" / "configs"
TRAIN_CONFIG = str(BUNDLE_CONFIGS / "train.json")


@pytest.fixture(scope="session")
def train_cohort(tmp_path_factory):
    """60 subjects: enough for a stratified train/validation/test split of every class."""
    root = tmp_path_factory.mktemp("cohort") / "train60"
    generate_cohort(root, CohortConfig(num_samples=60, seed=11), workers=2, progress=False)
    return root


def run_bundle(run_id: str, config_file, **overrides):
    """Run a bundle workflow in this process, like ``python -m monai.bundle run RUN_ID --config_file ... --key value``."""
    from monai.bundle import run

    return run(run_id, config_file=config_file, logging_file=False, **overrides)


def raised_error(error_type, run, *args, **kwargs) -> BaseException:
    """Run ``run(*args, **kwargs)`` and return the ``error_type`` in the raised chain (bundle expressions wrap errors)."""
    with pytest.raises(Exception) as info:
        run(*args, **kwargs)
    error = info.value
    while error is not None and not isinstance(error, error_type):
        error = error.__cause__ or error.__context__
    assert error is not None, f"no {error_type.__name__} in {info.value!r}"
    return error


@pytest.fixture(scope="session")
def trained_run(train_cohort, tmp_path_factory):
    """A two-epoch training run on the 60-subject cohort; returns its output folder."""
    output = tmp_path_factory.mktemp("runs") / "train"
    run_bundle(
        "training", TRAIN_CONFIG, dataset_dir=str(train_cohort), output_dir=str(output),
        max_epochs=2, batch_size=8, cache_workers=1,
    )
    return output


@pytest.fixture
def run_copy(trained_run, tmp_path):
    """A writable copy of the two-epoch training run (tests that resume, evaluate or damage it)."""
    import shutil

    target = tmp_path / "run"
    shutil.copytree(trained_run, target)
    return target
