"""Reliability: resume after SIGKILL, atomic checkpoints, write faults, determinism and the leakage guard."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import TRAIN_CONFIG, raised_error, run_bundle
from monai_mtl.checkpoints import LeakageError, atomic_torch_save, check_no_leakage, read_checkpoint_split
from monai_mtl.engines import KILL_AT_ITERATION

EPOCHS = 4
TRAIN_ARGS = ["--max_epochs", str(EPOCHS), "--batch_size", "8", "--cache_workers", "1", "--spatial_size", "[48,48,16]"]


def _train_command(cohort: Path, output: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", TRAIN_CONFIG,
        "--dataset_dir", str(cohort), "--output_dir", str(output), *TRAIN_ARGS, *extra,
    ]


def _saved_epoch(path: Path) -> int:
    try:
        return int(torch.load(path, map_location="cpu", weights_only=False)["epoch"])
    except (OSError, EOFError, RuntimeError, KeyError):
        return 0


def _epoch_scalars(run: Path, tag: str) -> dict[int, float]:
    from monai_mtl.evaluation import read_scalars

    return dict(read_scalars(run / "tensorboard")[tag])


@pytest.mark.slow
def test_training_killed_with_sigkill_resumes_and_ends_like_an_uninterrupted_run(train_cohort, tmp_path):
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    subprocess.run(_train_command(train_cohort, reference), check=True, capture_output=True)

    # the run kills itself with SIGKILL when iteration 12 completes: 43 training subjects in batches of 8 make
    # 5 iterations an epoch, so that is during epoch 3 of 4, after epoch 2's training state was saved
    env = {**os.environ, KILL_AT_ITERATION: "12"}
    first = subprocess.run(_train_command(train_cohort, killed), env=env, capture_output=True, text=True)
    assert first.returncode == -signal.SIGKILL, first.stderr[-3000:]
    assert not (killed / "test_metrics.json").exists()
    killed_at = _saved_epoch(killed / "training_state.pt")
    assert killed_at == 2

    resumed = subprocess.run(_train_command(train_cohort, killed), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    log = resumed.stderr + resumed.stdout
    assert f"resuming from epoch {killed_at} of {EPOCHS}" in log
    assert f"MultiTaskTrainer - INFO - Epoch[{killed_at + 1}] Complete" in log
    assert "MultiTaskTrainer - INFO - Epoch[1] Complete" not in log

    expected = json.loads((reference / "test_metrics.json").read_text())
    got = json.loads((killed / "test_metrics.json").read_text())
    for key in ("accuracy", "severity_mae", "severity_rmse", "balanced_accuracy"):
        assert got[key] == pytest.approx(expected[key], abs=1e-6), key
    # every epoch's validation metric, before and after the kill, equals the uninterrupted run's
    want, have = _epoch_scalars(reference, "val_severity_mae"), _epoch_scalars(killed, "val_severity_mae")
    assert sorted(have) == sorted(want) == list(range(1, EPOCHS + 1))
    assert have == pytest.approx(want, abs=1e-6)


@pytest.mark.slow
def test_finished_run_is_not_retrained_and_fresh_start_is_explicit(run_copy, train_cohort, caplog):
    run = run_copy
    state_before = (run / "training_state.pt").read_bytes()
    with caplog.at_level("INFO"):
        run_bundle("training", TRAIN_CONFIG, dataset_dir=str(train_cohort), output_dir=str(run),
                   max_epochs=2, batch_size=8, cache_workers=1)
    assert "already finished at epoch 2" in caplog.text
    assert (run / "training_state.pt").read_bytes() == state_before

    caplog.clear()
    with caplog.at_level("INFO"):
        run_bundle("training", TRAIN_CONFIG, dataset_dir=str(train_cohort), output_dir=str(run),
                   max_epochs=1, batch_size=8, cache_workers=1, resume=False)
    assert "fresh start" in caplog.text
    assert torch.load(run / "training_state.pt", weights_only=False)["epoch"] == 1


def test_checkpoint_carries_the_split(trained_run):
    split = read_checkpoint_split(trained_run / "model.pt")
    stored = json.loads((trained_run / "split.json").read_text())
    assert split == {k: stored[k] for k in ("train", "validation", "test")}


def test_leakage_guard_refuses_seen_subjects_unless_allowed(trained_run, caplog):
    split = read_checkpoint_split(trained_run / "model.pt")
    check_no_leakage(trained_run / "model.pt", split["test"])  # the run's own test part: fine
    with pytest.raises(LeakageError, match=r"2 of the 3 test subjects were used to train or validate"):
        check_no_leakage(trained_run / "model.pt", [split["train"][0], split["validation"][0], split["test"][0]])
    with caplog.at_level("WARNING"):
        check_no_leakage(trained_run / "model.pt", split["train"][:1], allow_overlap=True)
    assert "allowed by allow_split_overlap" in caplog.text


def test_evaluate_on_another_split_is_refused(trained_run, train_cohort, tmp_path):
    """A checkpoint evaluated in a run folder whose split (seed 1) puts its training subjects in the test part."""
    output = tmp_path / "other_split"
    output.mkdir()
    config = [TRAIN_CONFIG, str(Path(TRAIN_CONFIG).with_name("evaluate.json"))]
    error = raised_error(LeakageError, run_bundle, "evaluating", config, dataset_dir=str(train_cohort),
                    output_dir=str(output), ckpt_path=str(trained_run / "model.pt"), seed=1)
    assert "were used to train or validate" in str(error) and "--allow_split_overlap True" in str(error)
    assert not (output / "metrics.json").exists() and not (output / "predictions.csv").exists()
    run_bundle("evaluating", config, dataset_dir=str(train_cohort), output_dir=str(output),
               ckpt_path=str(trained_run / "model.pt"), seed=1, allow_split_overlap=True)
    assert (output / "metrics.json").is_file()


def test_failed_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "model.pt"
    atomic_torch_save({"model": {"w": torch.ones(3)}}, path)

    def disk_full(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError, match=r"could not write .*model\.pt: No space left on device; the previous file"):
        atomic_torch_save({"model": {"w": torch.zeros(3)}}, path)
    monkeypatch.undo()
    assert torch.equal(torch.load(path, weights_only=True)["model"]["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]  # no partial file left behind


def test_unwritable_output_dir_is_a_clear_error(train_cohort, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    error = raised_error(OSError, run_bundle, "training", TRAIN_CONFIG, dataset_dir=str(train_cohort),
                    output_dir=str(blocker / "run"), max_epochs=1, batch_size=8, cache_workers=1)
    assert re.search(r"output_dir .*a_file/run is not writable: Not a directory", str(error))


@pytest.mark.slow
def test_write_failure_midway_through_training_keeps_the_last_good_checkpoint(run_copy, train_cohort, monkeypatch):
    run = run_copy
    model_before = (run / "model.pt").read_bytes()
    state_before = (run / "training_state.pt").read_bytes()
    real_save = torch.save

    def failing_save(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(torch, "save", failing_save)
    error = raised_error(OSError, run_bundle, "training", TRAIN_CONFIG, dataset_dir=str(train_cohort),
                    output_dir=str(run), max_epochs=3, batch_size=8, cache_workers=1)
    assert "could not write" in str(error) and "Input/output error" in str(error)
    assert (run / "model.pt").read_bytes() == model_before
    assert (run / "training_state.pt").read_bytes() == state_before
    assert not [p for p in run.iterdir() if ".partial-" in p.name]


@pytest.mark.slow
def test_same_seed_gives_identical_split_and_metrics(train_cohort, tmp_path):
    results = []
    for name in ("a", "b"):
        output = tmp_path / name
        run_bundle("training", TRAIN_CONFIG, dataset_dir=str(train_cohort), output_dir=str(output),
                   max_epochs=1, batch_size=8, cache_workers=1, spatial_size=[48, 48, 16])
        split = json.loads((output / "split.json").read_text())
        metrics = json.loads((output / "test_metrics.json").read_text())
        results.append((split, metrics))
    (split_a, metrics_a), (split_b, metrics_b) = results
    assert split_a == split_b
    for key in ("accuracy", "severity_mae", "severity_rmse"):
        assert metrics_a[key] == pytest.approx(metrics_b[key], abs=1e-6)
    assert (tmp_path / "a" / "model.pt").read_bytes() == (tmp_path / "b" / "model.pt").read_bytes()
