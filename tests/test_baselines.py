"""Non-deep baselines on a training run's split."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from monai_mtl.__main__ import main
from monai_mtl.evaluation import report_from_predictions


@pytest.mark.parametrize("kind", ["class-median", "classical"])
def test_baseline_uses_the_run_split_and_writes_consistent_metrics(kind, trained_run, train_cohort, tmp_path):
    out = tmp_path / kind
    assert main(["baseline", "--kind", kind, "--dataset-dir", str(train_cohort),
                 "--split", str(trained_run / "split.json"), "--output-dir", str(out)]) == 0
    predictions = pd.read_csv(out / "test_predictions.csv")
    split = json.loads((trained_run / "split.json").read_text())
    assert sorted(predictions["subject_id"]) == sorted(split["test"])
    metrics = json.loads((out / "test_metrics.json").read_text())
    assert metrics["severity_mae"] == pytest.approx(report_from_predictions(predictions)["severity_mae"], rel=1e-5)
    if kind == "class-median":
        labels = pd.read_csv(train_cohort / "labels.csv").set_index("subject_id")
        fit = labels.loc[split["train"] + split["validation"]]
        medians = fit.groupby("response")["severity"].median()
        expected = predictions["true_response"].map(medians)
        assert (predictions["pred_severity"] - expected).abs().max() < 1e-3


def test_baseline_refuses_a_split_of_another_cohort(trained_run, tiny_cohort, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["baseline", "--kind", "classical", "--dataset-dir", str(tiny_cohort),
              "--split", str(trained_run / "split.json"), "--output-dir", str(tmp_path / "o")])
    assert exit_info.value.code == 2 and "does not have" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_single_task_baseline_trains_on_the_same_split_with_one_path(trained_run, train_cohort, tmp_path):
    out = tmp_path / "single"
    assert main(["baseline", "--kind", "single-task-severity", "--dataset-dir", str(train_cohort),
                 "--split", str(trained_run / "split.json"), "--output-dir", str(out), "--max-epochs", "1",
                 "--override", "batch_size=8", "cache_workers=1"]) == 0
    split = json.loads((trained_run / "split.json").read_text())
    assert json.loads((out / "split.json").read_text())["test"] == split["test"]
    predictions = pd.read_csv(out / "test_predictions.csv")
    # the response path is not built: uniform probabilities; the severity path is trained
    assert (predictions[["prob_non_responder", "prob_partial_responder", "prob_responder"]] - 1 / 3).abs().max().max() < 1e-6
    assert predictions["pred_severity"].std() > 0
    import torch

    state = torch.load(out / "model.pt", weights_only=True)
    assert not any(k.startswith("response_head") for k in state) and any(k.startswith("severity_head") for k in state)


def test_a_network_baseline_reads_the_cohort_as_the_reference_run_did(trained_run, tmp_path):
    """A reference run trained with other label columns and a BIDS session: its baseline child run gets them too."""
    import shutil

    from monai_mtl.baselines import network_baseline_request

    default = network_baseline_request("single-task-severity", "cohort", trained_run / "split.json", tmp_path / "b")
    assert not {"response_column", "severity_column", "bids_session"} & set(default.overrides)
    reference = tmp_path / "reference"
    reference.mkdir()
    shutil.copy(trained_run / "split.json", reference)
    settings = json.loads((trained_run / "run_settings.json").read_text())
    settings["config"].update(response_column="dx_class", severity_column="dx_severity", bids_session="2")
    (reference / "run_settings.json").write_text(json.dumps(settings))
    request = network_baseline_request("single-task-severity", "cohort", reference / "split.json", tmp_path / "b")
    assert {k: request.overrides[k] for k in ("response_column", "severity_column", "bids_session")} == {
        "response_column": "dx_class", "severity_column": "dx_severity", "bids_session": "2"}
    assert request.overrides["seed"] == json.loads((trained_run / "split.json").read_text())["settings"]["seed"]


def test_network_variants_keep_the_output_contract():
    import torch

    from monai_mtl.networks import DualPathNet, ResNetMultiTask

    x = torch.rand(2, 1, 64, 64, 16)
    for net in (DualPathNet(tasks=["response"]), ResNetMultiTask()):
        out = net.eval()(x)
        assert out.shape == (2, 4) and ((out[:, 3] >= 0) & (out[:, 3] <= 1)).all()
    assert (DualPathNet(tasks=["response"])(x)[:, 3] == 0.5).all()
    with pytest.raises(ValueError, match="subset of"):
        DualPathNet(tasks=["age"])


def _fold_splits(cohort, cv_dir, num_folds: int = 3) -> list[list[str]]:
    """Write the ``fold_<i>/split.json`` of a ``num_folds``-fold partition of ``cohort``, as ``cv`` does."""
    subjects = pd.read_csv(cohort / "labels.csv")["subject_id"].tolist()
    tests = [subjects[i::num_folds] for i in range(num_folds)]
    for fold, test in enumerate(tests):
        rest = [s for s in subjects if s not in test]
        (cv_dir / f"fold_{fold}").mkdir(parents=True)
        (cv_dir / f"fold_{fold}" / "split.json").write_text(json.dumps(
            {"train": rest[6:], "validation": rest[:6], "test": test, "settings": {"num_folds": num_folds, "fold": fold}}))
    return tests


def test_covariates_only_baseline_learns_from_the_columns_alone_and_runs_on_every_fold(trained_run, train_cohort, tmp_path, capsys):
    from test_covariates import _with_marker

    cohort = _with_marker(train_cohort, tmp_path / "marker")  # the response is the "marker" column, no scan shows it
    out = tmp_path / "covariates"
    assert main(["baseline", "--kind", "covariates-only", "--dataset-dir", str(cohort), "--split",
                 str(trained_run / "split.json"), "--output-dir", str(out), "--covariates", "marker", "noise"]) == 0
    metrics = json.loads((out / "test_metrics.json").read_text())
    assert metrics["accuracy"] == 1.0 and metrics["covariates"] == ["marker", "noise"]
    assert metrics["features"] == ["marker=a", "marker=b", "marker=c", "marker:missing", "noise", "noise:missing"]

    # no columns given: the reference run's covariates and count steps (covariate_count_levels), as the fused network saw
    labels = pd.read_csv(cohort / "labels.csv")
    labels["count"] = labels["response"] * 2  # whole numbers 0, 2, 4
    labels.to_csv(cohort / "labels.csv", index=False)
    reference = tmp_path / "fused_run"
    reference.mkdir()
    (reference / "split.json").write_text((trained_run / "split.json").read_text())
    (reference / "run_settings.json").write_text(json.dumps({"config": {"covariates": ["count"], "covariate_count_levels": 10}}))
    assert main(["baseline", "--kind", "covariates-only", "--dataset-dir", str(cohort), "--split",
                 str(reference / "split.json"), "--output-dir", str(tmp_path / "steps")]) == 0
    stepped = json.loads((tmp_path / "steps" / "test_metrics.json").read_text())
    assert stepped["features"] == ["count", "count>=2", "count>=4", "count:missing"] and stepped["accuracy"] == 1.0

    # with a cross-validation folder as --split: every fold's split, summarized like cv
    tests = _fold_splits(cohort, tmp_path / "cv")
    assert main(["baseline", "--kind", "covariates-only", "class-median", "--dataset-dir", str(cohort), "--split",
                 str(tmp_path / "cv"), "--covariates", "marker"]) == 0
    for kind in ("covariates_only", "class_median"):
        summary = tmp_path / f"cv_{kind}"  # default: <cv folder>_<kind>
        folds = pd.read_csv(summary / "cv_folds.csv")
        assert list(folds["fold"]) == [0, 1, 2] and folds["n"].sum() == 60
        for fold, test in enumerate(tests):
            tested = pd.read_csv(summary / f"fold_{fold}" / "test_predictions.csv")["subject_id"]
            assert sorted(tested) == sorted(test)
    assert pd.read_csv(tmp_path / "cv_covariates_only" / "cv_folds.csv")["accuracy"].min() == 1.0

    # no columns given, none in the run's settings or cohort.json: one line asking for them
    with pytest.raises(SystemExit) as exit_info:
        main(["baseline", "--kind", "covariates-only", "--dataset-dir", str(cohort), "--split",
              str(trained_run / "split.json"), "--output-dir", str(tmp_path / "none")])
    assert exit_info.value.code == 2 and "pass --covariates COLUMN" in capsys.readouterr().err.strip().splitlines()[-1]
    assert not (tmp_path / "none").exists()
