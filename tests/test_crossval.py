"""Cross-validation: stratified disjoint folds covering the cohort, per-fold runs, and the summary."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from monai_mtl.__main__ import main
from monai_mtl.cohort import CohortError, stratified_split
from monai_mtl.crossval import checkpoint_validation, fold_dir, summarize


def _table(n=300, seed=0):
    rng = np.random.default_rng(seed)
    return pd.DataFrame({"subject_id": [f"s{i}" for i in range(n)], "response": rng.choice(3, n, p=[0.26, 0.5, 0.24])})


def test_folds_are_disjoint_stratified_and_cover_the_cohort():
    table = _table()
    splits = [stratified_split(table, validation_fraction=0.15, seed=3, num_folds=5, fold=i) for i in range(5)]
    tests = [set(s["test"]) for s in splits]
    assert sum(map(len, tests)) == len(table) == len(set().union(*tests))
    overall = table["response"].value_counts(normalize=True).sort_index()
    by_id = table.set_index("subject_id")["response"]
    for split in splits:
        assert not set(split["test"]) & (set(split["train"]) | set(split["validation"]))
        assert len(split["train"]) + len(split["validation"]) + len(split["test"]) == len(table)
        np.testing.assert_allclose(by_id.loc[split["test"]].value_counts(normalize=True).sort_index(), overall, atol=0.03)


def test_fold_out_of_range_is_refused():
    with pytest.raises(CohortError, match="out of range"):
        stratified_split(_table(), num_folds=5, fold=5)


def test_summary_aggregates_fold_metrics(tmp_path):
    values = [(0.98, 3.0), (1.0, 2.0), (0.96, 4.0)]
    for fold, (accuracy, mae) in enumerate(values):
        folder = fold_dir(tmp_path, fold)
        folder.mkdir()
        metrics = {"n": 10, "accuracy": accuracy, "balanced_accuracy": accuracy, "severity_mae": mae,
                   "severity_rmse": mae * 1.2, "severity_r2": 0.9}
        (folder / "test_metrics.json").write_text(json.dumps(metrics))
    summary = summarize(tmp_path, 3)
    assert summary["accuracy"]["mean"] == pytest.approx(0.98)
    assert summary["severity_mae"]["std"] == pytest.approx(1.0)
    assert summary["n"] == 30
    assert len(pd.read_csv(tmp_path / "cv_folds.csv")) == 3
    assert "severity_mae | 3.0000 ± 1.0000" in (tmp_path / "cv_summary.md").read_text()


def test_the_partition_is_checked_on_the_cohort_as_the_folds_read_it(tmp_path):
    """A cohort whose labels have other column names (``response_column``): the check reads them as the folds did."""
    from monai_mtl.crossval import check_partition

    cohort = tmp_path / "cohort"
    (cohort / "images").mkdir(parents=True)
    rows = pd.DataFrame({"subject_id": [f"s{i}" for i in range(6)], "image": [f"images/s{i}.nii.gz" for i in range(6)],
                         "dx_class": [0, 1, 2, 0, 1, 2], "dx_severity": [70.0, 50.0, 10.0, 80.0, 40.0, 20.0]})
    rows.to_csv(cohort / "labels.csv", index=False)
    for i in range(7):
        (cohort / "images" / f"s{i}.nii.gz").touch()  # the labels check only that they exist
    subjects = list(rows["subject_id"])
    for fold in range(3):
        folder = fold_dir(tmp_path / "cv", fold)
        folder.mkdir(parents=True)
        test = subjects[2 * fold: 2 * fold + 2]
        split = {"train": [s for s in subjects if s not in test], "validation": [], "test": test,
                 "settings": {"num_folds": 3, "fold": fold}}
        (folder / "split.json").write_text(json.dumps(split))
        config = {"response_column": "dx_class", "severity_column": "dx_severity", "bids_session": None}
        (folder / "run_settings.json").write_text(json.dumps({"config": config}))
    check_partition(tmp_path / "cv", 3, cohort)
    pd.concat([rows, rows.iloc[[0]].assign(subject_id="s6", image="images/s6.nii.gz")]).to_csv(cohort / "labels.csv", index=False)
    with pytest.raises(CohortError, match="1 never tested"):
        check_partition(tmp_path / "cv", 3, cohort)


def test_summary_names_a_missing_fold(tmp_path):
    with pytest.raises(FileNotFoundError, match="fold 0 has not finished"):
        summarize(tmp_path, 2)


@pytest.mark.slow
def test_cv_runs_each_fold_once_then_summarizes(train_cohort, tmp_path, capsys):
    out = tmp_path / "cv"
    args = ["cv", "--folds", "2", "--dataset-dir", str(train_cohort), "--output-dir", str(out), "--max-epochs", "1",
            "--override", "batch_size=8", "cache_workers=1"]
    assert main([*args, "--fold", "1"]) == 0
    assert (fold_dir(out, 1) / "test_metrics.json").is_file() and not (out / "cv_summary.json").exists()
    finished = (fold_dir(out, 1) / "test_metrics.json").stat().st_mtime_ns
    assert main(args) == 0  # runs fold 0 only, then summarizes
    assert (fold_dir(out, 1) / "test_metrics.json").stat().st_mtime_ns == finished
    tests = [set(json.loads((fold_dir(out, i) / "split.json").read_text())["test"]) for i in range(2)]
    assert not tests[0] & tests[1] and len(tests[0] | tests[1]) == 60
    summary = json.loads((out / "cv_summary.json").read_text())
    assert summary["num_folds"] == 2 and summary["n"] == 60
    # the validation part's figures at each checkpoint's epoch sit beside the test figures, for choosing between configs
    folds = pd.read_csv(out / "cv_folds.csv")
    for fold in range(2):
        validation = checkpoint_validation(fold_dir(out, fold))
        assert set(validation) == {"val_accuracy", "val_severity_mae"} and 0 <= validation["val_accuracy"] <= 1
        assert folds.loc[fold, "val_accuracy"] == pytest.approx(validation["val_accuracy"])
    assert summary["val_severity_mae"]["mean"] == pytest.approx(folds["val_severity_mae"].mean())
    # a fold stored before a setting was added (covariate_fusion), at the value it used, is still the same run
    settings_file = fold_dir(out, 0) / "run_settings.json"
    settings = json.loads(settings_file.read_text())
    del settings["config"]["covariate_fusion"], settings["config"]["network_def#covariate_fusion"]
    settings_file.write_text(json.dumps(settings))
    first = (fold_dir(out, 0) / "test_metrics.json").stat().st_mtime_ns
    assert main(args) == 0 and (fold_dir(out, 0) / "test_metrics.json").stat().st_mtime_ns == first
    with pytest.raises(SystemExit) as refused:  # ... and another value is another run
        main([*args, "covariate_fusion=film"])
    assert refused.value.code == 2 and 'covariate_fusion: "concat" -> "film"' in capsys.readouterr().err
    # more epochs and nothing else: each finished fold continues from its last epoch, and says so in its settings
    assert main([*args[:args.index("--max-epochs")], "--max-epochs", "2", *args[args.index("--max-epochs") + 2:]]) == 0
    for fold in range(2):
        assert torch.load(fold_dir(out, fold) / "training_state.pt", weights_only=False)["epoch"] == 2
        assert json.loads((fold_dir(out, fold) / "run_settings.json").read_text())["max_epochs"] == 2
    assert (fold_dir(out, 0) / "test_metrics.json").stat().st_mtime_ns != first


def test_cv_bad_fold_is_one_error_line(train_cohort, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["cv", "--folds", "3", "--fold", "7", "--dataset-dir", str(train_cohort), "--output-dir", str(tmp_path / "o")])
    assert exit_info.value.code == 2 and "out of range" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_summary_refuses_a_fold_tested_on_its_training_subjects(trained_run, tmp_path):
    from monai_mtl.checkpoints import LeakageError, read_checkpoint_split

    split = read_checkpoint_split(trained_run / "model.pt")
    for fold, tested in enumerate([split["test"], split["train"][:2] + split["test"][:1]]):
        folder = fold_dir(tmp_path, fold)
        folder.mkdir()
        (folder / "model.pt").write_bytes((trained_run / "model.pt").read_bytes())
        pd.DataFrame({"subject_id": tested}).to_csv(folder / "test_predictions.csv", index=False)
        metrics = {"n": len(tested), "accuracy": 1.0, "balanced_accuracy": 1.0, "severity_mae": 1.0,
                   "severity_rmse": 1.0, "severity_r2": 0.9}
        (folder / "test_metrics.json").write_text(json.dumps(metrics))
    with pytest.raises(LeakageError, match="2 of the 3 test subjects"):
        summarize(tmp_path, 2)
    assert not (tmp_path / "cv_summary.json").exists()
    assert summarize(tmp_path, 2, allow_overlap=True)["n"] == len(split["test"]) + 3
