"""The evaluation workflow: files, metrics consistent with predictions, figures, and refusals."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import BUNDLE_CONFIGS, TRAIN_CONFIG, run_bundle

from monai_mtl.evaluation import report_from_predictions

EVAL_CONFIGS = [TRAIN_CONFIG, str(BUNDLE_CONFIGS / "evaluate.json")]


def _evaluate(cohort, run_dir):
    return run_bundle("evaluating", EVAL_CONFIGS, dataset_dir=str(cohort), output_dir=str(run_dir))


def test_evaluate_writes_predictions_metrics_and_figures(train_cohort, run_copy):
    _evaluate(train_cohort, run_copy)
    table = pd.read_csv(run_copy / "predictions.csv")
    split = json.loads((run_copy / "split.json").read_text())
    assert sorted(table["subject_id"]) == sorted(split["test"])
    for column in ("true_response", "pred_response", "true_response_name", "pred_response_name",
                   "prob_non_responder", "prob_partial_responder", "prob_responder", "true_severity", "pred_severity"):
        assert column in table.columns
    metrics = json.loads((run_copy / "metrics.json").read_text())
    recomputed = report_from_predictions(table)
    for key in ("accuracy", "balanced_accuracy", "severity_mae", "severity_rmse", "severity_r2", "confusion_matrix", "macro"):
        np.testing.assert_allclose(np.asarray(metrics[key] if key != "macro" else list(metrics[key].values())),
                                   np.asarray(recomputed[key] if key != "macro" else list(recomputed[key].values())),
                                   rtol=1e-5, atol=1e-6)
    low, high = metrics["bootstrap_95"]["severity_mae"]
    assert low <= metrics["severity_mae"] <= high
    for name in ("confusion_matrix", "severity_scatter", "severity_error_histogram", "training_curves"):
        png = run_copy / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def test_missing_checkpoint_is_refused(train_cohort, run_copy):
    (run_copy / "model.pt").unlink()
    with pytest.raises(Exception) as err:
        _evaluate(train_cohort, run_copy)
    assert "no checkpoint at" in repr(err.value) + repr(err.value.__cause__)
    assert not (run_copy / "metrics.json").exists() and not (run_copy / "predictions.csv").exists()


def test_checkpoint_of_another_tool_is_refused(train_cohort, run_copy):
    torch.save(torch.nn.Linear(3, 2).state_dict(), run_copy / "model.pt")
    with pytest.raises(Exception) as err:
        _evaluate(train_cohort, run_copy)
    assert "stores no preprocessing and network settings" in repr(err.value) + repr(err.value.__cause__)
    assert not (run_copy / "metrics.json").exists()


def test_weights_of_another_architecture_name_the_differing_setting(trained_run, tmp_path):
    from monai_mtl.checkpoints import CheckpointError, read_run_metadata
    from monai_mtl.evaluation import load_weights
    from monai_mtl.networks import DualPathNet

    stored = read_run_metadata(trained_run / "model.pt")["network"]
    assert stored["task_blocks"] > 0 and stored["severity_bins"] > 0  # the default's: task paths, severity bins
    # a setting recorded only when used (the bins) reads as the network's default where it is absent
    with pytest.raises(CheckpointError, match=rf"does not fit the network DualPathNet: severity_bins: checkpoint "
                                              rf"{stored['severity_bins']}, network its default; task_blocks: "
                                              rf"checkpoint {stored['task_blocks']}, network 0"):
        load_weights(DualPathNet(dropout=0.1, task_blocks=0), trained_run / "model.pt")


def test_dataset_that_does_not_match_the_split_is_refused(tiny_cohort, run_copy):
    with pytest.raises(Exception) as err:
        _evaluate(tiny_cohort, run_copy)
    assert "holds another split" in repr(err.value) + repr(err.value.__cause__)
    assert not (run_copy / "metrics.json").exists()


def test_empty_test_part_is_refused_and_writes_nothing(trained_run, tmp_path):
    from monai.data import DataLoader, Dataset

    from monai_mtl.engines import MultiTaskEvaluator, ShiftAveragingInferer
    from monai_mtl.evaluation import evaluate_checkpoint
    from monai_mtl.checkpoints import checkpoint_settings
    from monai_mtl.networks import build_network
    from monai_mtl.trust import calibrated_shifts

    network = build_network(checkpoint_settings(trained_run / "model.pt")["network"])
    evaluator = MultiTaskEvaluator(device=torch.device("cpu"), val_data_loader=DataLoader(Dataset([]), batch_size=4), network=network,
                                   inferer=ShiftAveragingInferer(calibrated_shifts(trained_run / "model.pt")))  # as calibrated
    with pytest.raises(ValueError, match="the evaluation data is empty"):
        evaluate_checkpoint(evaluator, network, trained_run / "model.pt", tmp_path / "out", prefix="", figures=True)
    assert not (tmp_path / "out" / "metrics.json").exists() and not (tmp_path / "out" / "predictions.csv").exists()
