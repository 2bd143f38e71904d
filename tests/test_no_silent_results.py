"""No silent wrong results: each case of the report is reproduced, then refused with a message that names it.

Faults fire at deterministic points: a child process that holds a lock until told to stop, a run that
kills itself at a given iteration, a real file-size limit. Nothing here waits on the clock.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
from conftest import BUNDLE_CONFIGS, TRAIN_CONFIG, run_bundle

from monai_mtl.__main__ import main
from monai_mtl.cohort import prepare_datalists
from monai_mtl.images import check_image
from monai_mtl.errors import CheckpointError, CohortError, ConfigError, OutputError, RunLockError, project_error
from monai_mtl.evaluation import read_scalars
from monai_mtl.run_folder import FINISHED_OUTPUTS, LOCK_FILE, SETTINGS_FILE

INFER_CONFIG = str(BUNDLE_CONFIGS / "inference.json")
SMALL = {"batch_size": 8, "cache_workers": 1}


def _refused(error_type, run, *args, **kwargs) -> str:
    """Run ``run`` and return the message of the ``error_type`` in the raised chain (bundle expressions wrap errors)."""
    with pytest.raises(Exception) as info:
        run(*args, **kwargs)
    error = project_error(info.value)
    assert isinstance(error, error_type), repr(info.value)
    return str(error)


def _train(cohort, output, **overrides):
    return run_bundle("training", TRAIN_CONFIG, dataset_dir=str(cohort), output_dir=str(output), **{**SMALL, **overrides})


# --- resume checks its settings ------------------------------------------------------------------------

def test_resume_with_another_learning_rate_or_batch_size_is_refused(run_copy, train_cohort):
    before = (run_copy / "training_state.pt").read_bytes()
    message = _refused(ConfigError, _train, train_cohort, run_copy, max_epochs=4, learning_rate=0.01)
    assert "learning_rate: 0.002 -> 0.01" in message and "--resume False" in message
    message = _refused(ConfigError, _train, train_cohort, run_copy, max_epochs=4, batch_size=16)
    assert "batch_size: 8 -> 16" in message
    assert (run_copy / "training_state.pt").read_bytes() == before  # nothing trained, nothing overwritten


def test_resume_on_another_cohort_with_the_same_labels_is_refused(run_copy, train_cohort, tmp_path):
    other = tmp_path / "other_images"
    shutil.copytree(train_cohort, other)
    labels = pd.read_csv(other / "labels.csv")
    shutil.copy(other / labels["image"][1], other / labels["image"][0])  # same labels.csv, another image
    message = _refused(ConfigError, _train, other, run_copy, max_epochs=4)
    assert "differs from the one the run was trained on" in message


@pytest.mark.slow
def test_resume_may_extend_the_epochs(run_copy, train_cohort, caplog):
    with caplog.at_level("INFO"):
        _train(train_cohort, run_copy, max_epochs=3)
    assert "resuming from epoch 2 of 3" in caplog.text
    state = torch.load(run_copy / "training_state.pt", weights_only=False)
    assert state["epoch"] == 3
    # the cosine decay (the default schedule) is stretched to the new length: the finished run's rate of zero goes back
    # to the new cosine's at epoch 2 (a quarter of the start) for the added epoch, then to zero, not climbing again
    assert state["lr_scheduler"]["T_max"] == 3 and state["lr_scheduler"]["_last_lr"][0] == pytest.approx(0.0, abs=1e-12)
    rates = [rate for _, rate in read_scalars(run_copy / "tensorboard")["learning_rate"]]
    assert rates[-1] == pytest.approx(0.25 * 0.002)
    # the stored settings now say 3 epochs, so cv / baseline see a run of 3 epochs, not a stale 2
    assert json.loads((run_copy / "run_settings.json").read_text())["max_epochs"] == 3


def test_a_finished_run_continued_to_more_epochs_is_unfinished_until_the_continuation_ends(run_copy, train_cohort, monkeypatch):
    from monai_mtl import runs
    from monai_mtl.errors import RunError

    def stopped_halfway(*args, **kwargs):  # the child dies before it writes anything
        raise RunError("killed")

    monkeypatch.setattr(runs, "_run_child", stopped_halfway)
    with pytest.raises(RunError):
        runs.run_training([TRAIN_CONFIG], train_cohort, run_copy, {**SMALL, "max_epochs": 3})
    # the two-epoch results are gone with the claim that the run finished: cv resumes it instead of reusing them
    assert not any((run_copy / name).exists() for name in FINISHED_OUTPUTS)
    assert (run_copy / "training_state.pt").is_file() and (run_copy / "model.pt").is_file()
    (run_copy / "test_metrics.json").write_text("{}")  # finished again; fewer epochs than it ran is another run
    with pytest.raises(ConfigError, match="max_epochs: 2 -> 1"):
        runs.run_training([TRAIN_CONFIG], train_cohort, run_copy, {**SMALL, "max_epochs": 1})


def test_a_batch_larger_than_the_training_part_is_refused(train_cohort, tmp_path):
    message = _refused(ConfigError, _train, train_cohort, tmp_path / "run", max_epochs=1, batch_size=64)
    assert "batch_size 64 is larger than the training part (43 subjects" in message
    assert not (tmp_path / "run" / "model.pt").exists() and not (tmp_path / "run" / "test_metrics.json").exists()


def test_a_validation_interval_that_leaves_the_last_epochs_unsaved_is_refused(train_cohort, tmp_path):
    from monai_mtl.checkpoints import check_validation_interval

    # 3 epochs validated every 2: model.pt ("last") would hold epoch 2 while epoch 3 trained for nothing
    message = _refused(ConfigError, _train, train_cohort, tmp_path / "run", max_epochs=3, val_interval=2)
    assert message == ("val_interval 2 does not divide max_epochs 3: with checkpoint_selection 'last' model.pt would hold "
                       "epoch 2's weights and the last 1 epoch(s) would train for nothing; choose a val_interval that "
                       "divides max_epochs (e.g. 1)")
    assert not (tmp_path / "run" / "model.pt").exists()
    check_validation_interval(5, 40, "last")  # a divisor: every fifth epoch validated, the 40th among them
    check_validation_interval(3, 40, "best")  # the best of the validated epochs: the unvalidated ones are no candidates
    with pytest.raises(ConfigError, match="e.g. 5"):
        check_validation_interval(6, 40, "last")
    for wrong in (0, 1.5, True, "2"):
        with pytest.raises(ConfigError, match="val_interval must be a whole number of epochs >= 1"):
            check_validation_interval(wrong, 40, "best")


@pytest.mark.slow
def test_fresh_start_removes_old_events_and_outputs(run_copy, train_cohort):
    from monai_mtl.evaluation import read_scalars

    assert [step for step, _ in read_scalars(run_copy / "tensorboard")["val_loss"]] == [1, 2]
    (run_copy / "my_notes.txt").write_text("not the run's: kept")
    _train(train_cohort, run_copy, max_epochs=1, resume=False)
    assert [step for step, _ in read_scalars(run_copy / "tensorboard")["val_loss"]] == [1]
    assert (run_copy / "my_notes.txt").read_text() == "not the run's: kept"


# --- a run lock ----------------------------------------------------------------------------------------

HOLD_LOCK = textwrap.dedent("""
    import sys
    from monai_mtl.run_folder import RunLock
    RunLock(sys.argv[1]).acquire()
    print("locked", flush=True)
    sys.stdin.read()  # hold it until the test closes stdin (or kills this process)
""")


@pytest.mark.slow
def test_a_second_run_into_a_locked_folder_is_refused_and_a_stale_lock_taken_over(train_cohort, tmp_path, caplog):
    output = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(output)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        message = _refused(RunLockError, _train, train_cohort, output, max_epochs=1)
        assert f"is in use by another run (pid {holder.pid} on this host" in message
        assert not (output / "model.pt").exists()
    finally:
        holder.kill()  # SIGKILL: no chance to remove its lock
        holder.wait()
    assert (output / LOCK_FILE).is_file()
    with caplog.at_level("WARNING"):
        _train(train_cohort, output, max_epochs=1, spatial_size=[32, 32, 16])
    assert "taking over the stale lock" in caplog.text and (output / "test_metrics.json").is_file()
    assert not (output / LOCK_FILE).exists()  # released at the end of the run


# --- cohort checks -------------------------------------------------------------------------------------

def test_rows_pointing_at_the_same_image_are_refused(tiny_cohort, tmp_path):
    cohort = tmp_path / "cohort"
    shutil.copytree(tiny_cohort, cohort)
    labels = pd.read_csv(cohort / "labels.csv")
    labels.loc[[3, 7, 9], "image"] = labels["image"][2]
    labels.loc[[5], "image"] = str(cohort / labels["image"][2])  # the same file, written as an absolute path
    labels.to_csv(cohort / "labels.csv", index=False)
    message = _refused(CohortError, prepare_datalists, cohort, tmp_path / "run")
    assert "lines [4, 5, 7, 9, 11] point at the same image file" in message
    assert not (tmp_path / "run" / "split.json").exists()


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_a_header_claiming_fewer_voxels_than_stored_is_refused(tmp_path, suffix):
    full = tmp_path / f"full{suffix}"
    nib.save(nib.Nifti1Image(np.random.default_rng(0).random((64, 64, 16), dtype=np.float32), np.eye(4)), full)
    raw = full.read_bytes()
    raw = gzip.decompress(raw) if suffix == ".nii.gz" else raw
    header = nib.load(full).header.copy()
    header.set_data_shape((64, 64, 8))
    header["vox_offset"] = 352
    lying = tmp_path / f"half{suffix}"
    body = header.binaryblock + raw[348:]
    lying.write_bytes(gzip.compress(body) if suffix == ".nii.gz" else body)
    assert nib.load(lying).shape == (64, 64, 8)  # nibabel itself reads the first half silently
    with pytest.raises(CohortError, match=r"header describes 64x64x8 voxels .* its dimensions do not match its data"):
        check_image(lying)
    assert check_image(full) == (64, 64, 16)


# --- unknown config keys -------------------------------------------------------------------------------

def test_a_misspelt_override_is_refused_with_the_nearest_key(train_cohort, tmp_path):
    message = _refused(ConfigError, _train, train_cohort, tmp_path / "run", max_epoch=2)
    assert message.startswith("unknown config key 'max_epoch' (did you mean 'max_epochs'?)")
    message = _refused(ConfigError, _train, train_cohort, tmp_path / "run", **{"network_def#task_block": 0})
    assert "did you mean 'network_def#task_blocks'?" in message
    assert not (tmp_path / "run" / "split.json").exists()


# --- cv reuses only what matches -----------------------------------------------------------------------

@pytest.mark.slow
def test_cv_refuses_finished_folds_of_other_settings_and_overwrites_on_request(train_cohort, tmp_path, capsys):
    out = tmp_path / "cv"
    args = ["cv", "--folds", "2", "--dataset-dir", str(train_cohort), "--output-dir", str(out),
            "--override", "batch_size=8", "cache_workers=1", "spatial_size=[32,32,16]"]
    assert main([*args, "--max-epochs", "1"]) == 0
    stamp = (out / "fold_0" / "test_metrics.json").stat().st_mtime_ns
    assert main([*args, "--max-epochs", "1"]) == 0  # same settings: reused
    assert (out / "fold_0" / "test_metrics.json").stat().st_mtime_ns == stamp
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:  # (more epochs and nothing else would continue the folds: test_crossval)
        main([*args, "learning_rate=0.001", "--max-epochs", "1"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert exit_info.value.code == 2 and "learning_rate: 0.002 -> 0.001" in err and "--overwrite" in err
    with pytest.raises(SystemExit):
        main([*args[:2], "3", *args[3:], "--max-epochs", "1"])  # 3 folds into the 2-fold folder
    assert "num_folds: 2 -> 3" in capsys.readouterr().err.strip().splitlines()[-1]
    assert main([*args, "--max-epochs", "2", "--overwrite"]) == 0
    assert json.loads((out / "fold_0" / SETTINGS_FILE).read_text())["max_epochs"] == 2
    assert json.loads((out / "cv_summary.json").read_text())["n"] == 60


def test_cv_summary_refuses_folds_that_do_not_partition_the_cohort(train_cohort, tmp_path):
    from monai_mtl.crossval import check_partition, fold_dir

    ids = sorted(pd.read_csv(train_cohort / "labels.csv")["subject_id"])
    for fold, test in enumerate([ids[:30], ids[25:]]):
        fold_dir(tmp_path, fold).mkdir()
        (fold_dir(tmp_path, fold) / "split.json").write_text(json.dumps({"test": test, "settings": {"num_folds": 2, "fold": fold}}))
    with pytest.raises(CohortError, match="overlap"):
        check_partition(tmp_path, 2, train_cohort)
    (fold_dir(tmp_path, 1) / "split.json").write_text(json.dumps({"test": ids[30:50], "settings": {"num_folds": 2, "fold": 1}}))
    with pytest.raises(CohortError, match="10 never tested"):
        check_partition(tmp_path, 2, train_cohort)
    (fold_dir(tmp_path, 1) / "split.json").write_text(json.dumps({"test": ids[30:], "settings": {"num_folds": 3, "fold": 1}}))
    with pytest.raises(CohortError, match="is fold 1 of 3, not fold 1 of 2"):
        check_partition(tmp_path, 2, train_cohort)


# --- inference answers every input ---------------------------------------------------------------------

def test_inference_answers_every_listed_or_found_input(trained_run, train_cohort, tmp_path):
    labels = pd.read_csv(train_cohort / "labels.csv")
    scans = tmp_path / "scans"
    for folder in ("a", "b"):
        (scans / folder).mkdir(parents=True)
        shutil.copy(train_cohort / labels["image"][0 if folder == "a" else 1], scans / folder / "scan.nii.gz")
    shutil.copy(train_cohort / labels["image"][2], scans / "UPPER.NII.GZ")
    (scans / "dir.nii.gz").mkdir()
    (scans / "broken.nii.gz").symlink_to(scans / "gone.nii.gz")
    listing = tmp_path / "inputs.csv"
    pd.DataFrame({"image": ["scans/a/scan.nii.gz", "", "scans/b/scan.nii.gz", "scans/missing.nii"]}).to_csv(listing, index=False)

    out = tmp_path / "from_csv"
    run_bundle("run", INFER_CONFIG, dataset_dir=str(listing), output_dir=str(out), ckpt_path=str(trained_run / "model.pt"),
               saliency=True, saliency_png=0)
    table = pd.read_csv(out / "predictions.csv", keep_default_na=False)
    assert len(table) == 4  # one row per CSV row, in order
    assert table["error"].tolist()[0] == "" and table["error"].tolist()[2] == ""
    assert "line 3: empty 'image' cell" in table["error"][1] and "does not exist" in table["error"][3]
    saliency = sorted(p.name for p in (out / "saliency").iterdir())
    assert saliency == ["a_scan_response.nii.gz", "a_scan_severity.nii.gz", "b_scan_response.nii.gz", "b_scan_severity.nii.gz"]

    out = tmp_path / "from_folder"
    run_bundle("run", INFER_CONFIG, dataset_dir=str(scans), output_dir=str(out), ckpt_path=str(trained_run / "model.pt"))
    table = pd.read_csv(out / "predictions.csv", keep_default_na=False)
    rows = {Path(p).name: e for p, e in zip(table["image"], table["error"])}
    assert rows["UPPER.NII.GZ"] == ""
    assert "is a folder" in rows["dir.nii.gz"] and "broken symbolic link" in rows["broken.nii.gz"]


def test_a_failed_nifti_write_leaves_no_partial_file(tmp_path, monkeypatch):
    from monai_mtl.io import atomic_write_nifti

    def half_then_fail(image, path):
        Path(path).write_bytes(b"half a NIfTI")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(nib, "save", half_then_fail)
    with pytest.raises(OutputError, match="could not write .*scan_response.nii.gz: No space left on device"):
        atomic_write_nifti(tmp_path / "scan_response.nii.gz", nib.Nifti1Image(np.zeros((2, 2, 2), np.float32), np.eye(4)))
    assert list(tmp_path.iterdir()) == []


# --- one-line errors and checkpoint errors -------------------------------------------------------------

@pytest.mark.slow
def test_a_failed_bundle_run_ends_with_one_clear_line(train_cohort, tmp_path):
    command = [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", TRAIN_CONFIG,
               "--dataset_dir", str(train_cohort), "--output_dir", str(tmp_path / "run"), "--max_epoch", "2"]
    result = subprocess.run(command, capture_output=True, text=True)
    lines = result.stderr.strip().splitlines()
    assert result.returncode != 0
    assert lines[-1] == "monai-mtl: error: unknown config key 'max_epoch' (did you mean 'max_epochs'?): it is in none of train.json"
    assert "Traceback" not in result.stderr
    debug = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "MONAI_MTL_DEBUG": "1"})
    assert debug.returncode != 0 and "Traceback" in debug.stderr and "ConfigError" in debug.stderr


@pytest.mark.parametrize("case", ["truncated", "folder", "training_state", "missing"])
def test_a_bad_checkpoint_says_what_the_file_is_and_what_was_expected(trained_run, train_cohort, tmp_path, case):
    path = {
        "truncated": tmp_path / "model.pt", "folder": tmp_path, "training_state": trained_run / "training_state.pt",
        "missing": tmp_path / "nowhere.pt",
    }[case]
    if case == "truncated":
        path.write_bytes((trained_run / "model.pt").read_bytes()[:5000])
    message = _refused(CheckpointError, run_bundle, "run", INFER_CONFIG, dataset_dir=str(train_cohort / "images"),
                       output_dir=str(tmp_path / "out"), ckpt_path=str(path))
    expected = {
        "truncated": "is not a readable PyTorch checkpoint", "folder": "is a folder, not a checkpoint file",
        "training_state": "is not a model state dict: it holds other Python objects (a training_state.pt?", "missing": "no checkpoint at",
    }[case]
    assert expected in message and str(path) in message


# --- a real file-size limit ----------------------------------------------------------------------------

FILE_SIZE_LIMIT = textwrap.dedent("""
    import resource, sys, torch
    from monai_mtl.checkpoints import atomic_torch_save
    from monai_mtl.errors import OutputError
    path = sys.argv[1]
    atomic_torch_save({"w": torch.ones(10)}, path)  # a small, good checkpoint first
    resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))  # then files may not grow past 200 kB
    try:
        atomic_torch_save({"w": torch.zeros(1_000_000)}, path)  # 4 MB: EFBIG inside torch's zip writer
    except OutputError as err:
        print(err)
""")


@pytest.mark.slow
def test_a_real_file_size_limit_keeps_the_previous_checkpoint(tmp_path):
    path = tmp_path / "model.pt"
    result = subprocess.run([sys.executable, "-c", FILE_SIZE_LIMIT, str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"could not write {path}:" in result.stdout and "the previous file, if any, is unchanged" in result.stdout
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.ones(10))
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]  # no partial file
