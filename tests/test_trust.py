"""How far to trust a prediction: temperature scaling, conformal coverage, the OOD flag, and their columns."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import BUNDLE_CONFIGS, raised_error, run_bundle
from monai_mtl.trust import (
    TRUST_COLUMNS,
    calibrated_probabilities,
    class_sets,
    conformal_quantile,
    coverage_range,
    expected_calibration_error,
    fit_ood,
    fit_temperature,
    ood_scores,
    read_trust,
    set_contains,
    severity_intervals,
)

REPO = Path(__file__).resolve().parents[1]


def test_conformal_intervals_cover_a_regression_with_known_noise_at_the_nominal_rate():
    rng = np.random.default_rng(0)
    for coverage in (0.8, 0.9):
        x_cal, x_test = rng.uniform(20, 80, 5000), rng.uniform(20, 80, 20000)
        y_cal, y_test = x_cal + rng.normal(0, 3, 5000), x_test + rng.normal(0, 3, 20000)
        q = conformal_quantile(np.abs(y_cal - x_cal), coverage)
        low, high = severity_intervals(x_test, q)
        assert ((y_test >= low) & (y_test <= high)).mean() == pytest.approx(coverage, abs=0.02)
        # with known Gaussian noise the threshold approaches the noise's own quantile (1.645 sigma at 90%)
        assert q == pytest.approx(3 * {0.8: 1.2816, 0.9: 1.6449}[coverage], rel=0.08)


def test_class_sets_cover_at_the_nominal_rate_and_are_empty_when_unsure():
    rng = np.random.default_rng(1)
    probabilities = rng.dirichlet([0.3, 0.3, 0.3], size=21000)
    labels = np.array([rng.choice(3, p=p) for p in probabilities])  # calibrated by construction
    scores = 1.0 - probabilities[np.arange(1000), labels[:1000]]
    q = conformal_quantile(scores, 0.9)
    sets = class_sets(probabilities[1000:], q)
    assert set_contains(sets, labels[1000:]).mean() == pytest.approx(0.9, abs=0.02)
    assert class_sets(np.array([[0.98, 0.01, 0.01], [0.5, 0.5, 0.0], [0.34, 0.33, 0.33]]), 0.6) == ["0", "0|1", ""]


def test_conformal_quantile_is_the_finite_sample_rank():
    scores = np.arange(1, 20, dtype=float)  # n = 19: rank ceil(20 * 0.9) = 18
    assert conformal_quantile(scores, 0.9) == 18.0
    assert conformal_quantile(scores[:5], 0.9) == float("inf")  # too few scores for 90%: unbounded
    with pytest.raises(ValueError, match="coverage"):
        conformal_quantile(scores, 1.0)


def test_coverage_range_holds_the_empirical_coverage_of_repeated_conformal_splits():
    # 2000 repetitions of calibrate-on-192 / test-on-225 (the default run's parts) on exchangeable scores
    rng = np.random.default_rng(3)
    low, high = coverage_range(192, 225, 0.9)
    assert low < 0.9 < high and high - low == pytest.approx(0.11, abs=0.02)
    coverages = []
    for _ in range(2000):
        scores = rng.exponential(size=192 + 225)
        q = conformal_quantile(scores[:192], 0.9)
        coverages.append((scores[192:] <= q).mean())
    inside = np.mean([low <= c <= high for c in coverages])
    assert inside == pytest.approx(0.95, abs=0.02)
    assert np.mean(coverages) == pytest.approx(np.ceil(193 * 0.9) / 193, abs=0.003)  # E[coverage] = k / (n + 1)
    assert coverage_range(5, 10, 0.9) == (1.0, 1.0)  # too few scans: every interval unbounded


def test_temperature_scaling_lowers_the_ece_of_an_over_confident_model():
    torch.manual_seed(0)
    true_logits = torch.randn(4000, 3) * 1.5
    labels = torch.multinomial(torch.softmax(true_logits, 1), 1).squeeze(1)
    over_confident = true_logits * 4  # the same ranking, four times too sharp
    temperature = fit_temperature(over_confident[:2000], labels[:2000])
    assert temperature == pytest.approx(4.0, rel=0.15)
    before = expected_calibration_error(calibrated_probabilities(over_confident[2000:]), labels[2000:].numpy())
    after = expected_calibration_error(calibrated_probabilities(over_confident[2000:], temperature), labels[2000:].numpy())
    assert before > 0.1 and after < 0.03


def test_mahalanobis_score_is_low_inside_the_training_classes_and_high_away_from_them():
    rng = np.random.default_rng(2)
    means = np.array([[0.0] * 8, [3.0] * 8, [-3.0] * 8])
    labels = rng.integers(0, 3, 3000)
    features = means[labels] + rng.normal(0, 1, (3000, 8))
    fitted_means, precision = fit_ood(features, labels)
    inside = ood_scores(means[[0, 1, 2]] + rng.normal(0, 1, (3, 8)), fitted_means, precision)
    outside = ood_scores(rng.normal(0, 1, (3, 8)) + 20.0, fitted_means, precision)
    assert inside.max() < 6 < 20 < outside.min()


def test_training_calibrates_the_checkpoint_and_reports_coverage(trained_run):
    trust = read_trust(trained_run / "model.pt")
    assert trust is not None and trust.coverage == 0.9 and trust.temperature > 0 and trust.ood_layer == "encoder"
    metrics = json.loads((trained_run / "test_metrics.json").read_text())["trust"]
    assert set(metrics) >= {"ece_before", "ece_after", "severity_coverage", "severity_mean_width", "class_set_coverage",
                            "class_mean_set_size", "ood_flagged_fraction", "coverage_expected_range"}
    assert metrics["calibration_size"] == trust.calibration_size > 0
    predictions = pd.read_csv(trained_run / "test_predictions.csv", keep_default_na=False)
    inside = (predictions["true_severity"] >= predictions["severity_low"]) & (predictions["true_severity"] <= predictions["severity_high"])
    assert inside.mean() == pytest.approx(metrics["severity_coverage"])
    width = predictions["severity_high"] - predictions["severity_low"]
    assert width.max() <= 2 * trust.severity_quantile + 1e-4
    probabilities = predictions[[c for c in predictions if c.startswith("prob_")]].to_numpy()
    assert np.allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)


@pytest.mark.slow
def test_the_ood_flag_fires_on_noise_and_not_on_the_cohort(trained_run, train_cohort, tmp_path):
    from monai_mtl.trust import ood_report

    table = ood_report(trained_run, train_cohort, tmp_path / "trust", per_kind=6, seed=0).set_index("kind")
    assert list(table.index) == ["in_distribution", "non_brain", "noise", "corrupted", "other_anatomy"]
    assert table.loc["noise", "auroc"] > 0.95 and table.loc["noise", "flagged"] == 1.0
    scores = pd.read_csv(tmp_path / "trust" / "ood_scores.csv")
    assert set(scores["kind"]) == set(table.index) and scores["ood_score"].notna().all()
    # Not on the cohort: the test scans score where the validation scans do. Their flagged fraction is not a
    # stable check here: the threshold is the 99% quantile of 8 validation scans (about their maximum), which
    # exchangeable test scans exceed 1 time in 9 on average but, on 9 scans of a 2-epoch model whose scores
    # differ by a few percent, from 0 to more than half of the time (the README has the real run's figure).
    threshold = read_trust(trained_run / "model.pt").ood_threshold
    cohort = scores.loc[scores["kind"] == "in_distribution", "ood_score"]
    assert cohort.max() < 1.5 * threshold < scores.loc[scores["kind"] == "noise", "ood_score"].min()


def test_inference_writes_the_trust_columns_and_they_are_documented(trained_run, train_cohort, tmp_path):
    run_bundle(
        "run", str(BUNDLE_CONFIGS / "inference.json"), dataset_dir=str(train_cohort / "images"),
        output_dir=str(tmp_path / "pred"), ckpt_path=str(trained_run / "model.pt"),
    )
    predictions = pd.read_csv(tmp_path / "pred" / "predictions.csv", keep_default_na=False)
    assert list(predictions.columns[-len(TRUST_COLUMNS) - 1:-1]) == list(TRUST_COLUMNS)
    assert (predictions["severity_low"] <= predictions["pred_severity"]).all()
    assert (predictions["pred_severity"] <= predictions["severity_high"]).all()
    assert predictions["ood"].isin([True, False]).all() and predictions["ood_score"].gt(0).all()
    sets = predictions["response_set"].astype(str)
    assert sets.str.fullmatch(r"(|[0-2](\|[0-2])*)").all()
    readme = (REPO / "README.md").read_text()
    trust_section = readme.split("## How far to trust a prediction", 1)[1].split("\n## ", 1)[0]
    for column in TRUST_COLUMNS:
        assert f"`{column}`" in trust_section, column


# --- severity recalibration ----------------------------------------------------------------------------

def _shrunk_severities(rng, n_per_class=60):
    """True severities in each class's range and a network's shrunk estimate of them: ``pred = a_k true + b_k + noise``."""
    from monai_mtl.synthetic import CohortConfig

    ranges, shrink = CohortConfig().severity_ranges, [(0.7, 25.0), (0.85, 7.0), (0.8, 3.0)]
    true = np.concatenate([rng.uniform(low, high, n_per_class) for low, high in ranges])
    classes = np.repeat(np.arange(3), n_per_class)
    slope, intercept = np.array(shrink).T
    pred = slope[classes] * true + intercept[classes] + rng.normal(0, 0.5, len(true))
    return true, pred, classes


def test_per_class_recalibration_undoes_a_shrinkage_toward_each_class_mean():
    from monai_mtl.synthetic import CohortConfig
    from monai_mtl.trust import fit_severity_recalibration, recalibrate_severity

    rng = np.random.default_rng(0)
    true, pred, classes = _shrunk_severities(rng)
    lines = fit_severity_recalibration(pred, classes, true, "per_class")
    # the inverse of each class's distortion, true = (pred - b) / a, over the class's range
    for (slope, intercept), (a, b), ends in zip(lines, [(0.7, 25.0), (0.85, 7.0), (0.8, 3.0)], CohortConfig().severity_ranges):
        np.testing.assert_allclose(slope * (a * np.array(ends) + b) + intercept, ends, atol=0.5)
    new_true, new_pred, new_classes = _shrunk_severities(rng)  # fitted on one draw, applied to another
    before = np.abs(new_pred - new_true).mean()
    after = np.abs(recalibrate_severity(new_pred, new_classes, lines) - new_true).mean()
    assert before > 1.5 and after < 0.8  # the noise alone (sd 0.5, scaled by 1/a) leaves about 0.5
    # one line for all cannot undo class-dependent offsets: better than nothing, worse than one per class
    overall = recalibrate_severity(new_pred, new_classes, fit_severity_recalibration(pred, classes, true, "linear"))
    assert after < np.abs(overall - new_true).mean() < before
    assert fit_severity_recalibration(pred, classes, true, "none") is None
    np.testing.assert_array_equal(recalibrate_severity(new_pred, new_classes, None), new_pred)


def test_recalibration_falls_back_to_one_line_for_rare_classes_and_to_none_for_few_scans(caplog):
    from monai_mtl.trust import MIN_RECALIBRATION_SCANS, fit_severity_recalibration, recalibrate_severity

    caplog.set_level("INFO", logger="monai_mtl.trust")
    true, pred, classes = _shrunk_severities(np.random.default_rng(1))
    keep = (classes != 2) | (np.arange(len(classes)) % 60 < MIN_RECALIBRATION_SCANS - 1)  # class 2: too few scans
    lines = fit_severity_recalibration(pred[keep], classes[keep], true[keep], "per_class")
    assert lines[2] == fit_severity_recalibration(pred[keep], classes[keep], true[keep], "linear")[2] != lines[1]
    assert "class 2 has 9 validation scans" in caplog.text
    few = slice(0, MIN_RECALIBRATION_SCANS - 1)
    assert fit_severity_recalibration(pred[few], classes[few], true[few], "per_class") is None
    assert "severity recalibration 'per_class' skipped" in caplog.text
    # a map never leaves the 0-100 scale
    assert recalibrate_severity(np.array([0.0, 99.0]), np.array([0, 0]), [[2.0, 5.0]] * 3).tolist() == [5.0, 100.0]


def test_an_unknown_recalibration_is_refused_before_training(train_cohort, tmp_path):
    from monai_mtl.errors import ConfigError

    error = raised_error(ConfigError, run_bundle, "training", str(BUNDLE_CONFIGS / "train.json"), dataset_dir=str(train_cohort),
                         output_dir=str(tmp_path / "r"), max_epochs=1, severity_recalibration="isotonic")
    assert str(error) == "severity_recalibration must be one of ['none', 'linear', 'per_class'], got 'isotonic'"
    assert not (tmp_path / "r" / "model.pt").exists()


def test_calibrating_again_recalibrates_the_severity_and_records_the_setting(run_copy, train_cohort, monkeypatch):
    import monai_mtl.trust

    configs = [str(BUNDLE_CONFIGS / "train.json"), str(BUNDLE_CONFIGS / "evaluate.json")]
    run_bundle("evaluating", configs, dataset_dir=str(train_cohort), output_dir=str(run_copy))
    # the default: the network's severity as it is
    assert read_trust(run_copy / "model.pt").severity_recalibration == "none" and read_trust(run_copy / "model.pt").severity_lines is None
    before = pd.read_csv(run_copy / "predictions.csv", keep_default_na=False)
    # 8 validation scans, below the minimum for a line: two are enough for this check of the plumbing
    monkeypatch.setattr(monai_mtl.trust, "MIN_RECALIBRATION_SCANS", 2)
    # calibrate again and test again, as the training's last two steps would with this setting
    run_bundle("recalibrating", configs, dataset_dir=str(train_cohort), output_dir=str(run_copy), severity_recalibration="linear")
    trust = read_trust(run_copy / "model.pt")
    assert trust.severity_recalibration == "linear" and len(trust.severity_lines) == 3
    assert json.loads((run_copy / "run_settings.json").read_text())["config"]["severity_recalibration"] == "linear"
    after = pd.read_csv(run_copy / "test_predictions.csv", keep_default_na=False)
    metrics = json.loads((run_copy / "test_metrics.json").read_text())
    slope, intercept = trust.severity_lines[0]
    # the two passes batch the scans differently, and the bins' severity (a float32 sum over 50 bins) then moves by a few
    # thousandths of a point at most; the line multiplies that by its slope, which a two-epoch model's nearly constant
    # severities make steep (2210 on an AVX2 CPU, where a move of 5e-6 became 0.0103): 1e-2 plus 1e-5 per unit of slope
    # is still far below any recalibration's move
    np.testing.assert_allclose(after["pred_severity"], np.clip(slope * before["pred_severity"] + intercept, 0, 100),
                               atol=1e-2 + 1e-5 * abs(slope))
    assert metrics["trust"]["severity_recalibration"] == "linear"
    assert metrics["trust"]["severity_mae_before_recalibration"] == pytest.approx(
        (before["pred_severity"] - before["true_severity"]).abs().mean(), abs=1e-3)
    assert metrics["severity_mae"] == pytest.approx((after["pred_severity"] - after["true_severity"]).abs().mean(), abs=1e-3)
    # the interval is fitted on the recalibrated residuals and centred on the recalibrated severity
    np.testing.assert_allclose(after["severity_high"] - after["pred_severity"],
                               np.minimum(trust.severity_quantile, 100 - after["pred_severity"]), atol=1e-3)


def test_the_interval_after_recalibration_keeps_its_coverage():
    from monai_mtl.trust import cross_fitted_residuals, fit_severity_recalibration, recalibrate_severity

    rng = np.random.default_rng(2)
    coverage, in_sample, cross_fitted = 0.9, [], []
    for _ in range(200):
        true, pred, classes = _shrunk_severities(rng, n_per_class=20)  # a validation part of 60 scans
        pred = pred + rng.normal(0, 3.0, len(pred))
        lines = fit_severity_recalibration(pred, classes, true, "per_class")
        new_true, new_pred, new_classes = _shrunk_severities(rng, n_per_class=100)
        new_residuals = np.abs(recalibrate_severity(new_pred + rng.normal(0, 3.0, len(new_pred)), new_classes, lines) - new_true)
        for quantiles, residuals in ((in_sample, np.abs(recalibrate_severity(pred, classes, lines) - true)),
                                     (cross_fitted, cross_fitted_residuals(pred, classes, true, "per_class"))):
            quantiles.append((new_residuals <= conformal_quantile(residuals, coverage)).mean())
    # six parameters fitted on the 60 scans the quantile is taken from: their residuals are too small
    assert np.mean(in_sample) < coverage - 0.01
    assert coverage <= np.mean(cross_fitted) < coverage + 0.03


def test_shift_averaging_is_calibrated_into_the_checkpoint_and_used_wherever_it_predicts(run_copy, train_cohort, tmp_path):
    from monai_mtl.checkpoints import CheckpointError
    from monai_mtl.cohort import read_cohort, to_datalist
    from monai_mtl.evaluation import CheckpointPredictor

    configs = [str(BUNDLE_CONFIGS / "train.json"), str(BUNDLE_CONFIGS / "evaluate.json")]
    shifts = [[1, 0, 0], [-1, 0, 0], [0, 1, 0], [0, -1, 0]]
    assert read_trust(run_copy / "model.pt").test_time_shifts == shifts  # train.json's default, calibrated by the training
    run_bundle("recalibrating", configs, dataset_dir=str(train_cohort), output_dir=str(run_copy), test_time_shifts=[])
    assert read_trust(run_copy / "model.pt").test_time_shifts == []
    single = pd.read_csv(run_copy / "test_predictions.csv")
    # calibrate again and test again on outputs averaged over the scan and four one-voxel moves
    run_bundle("recalibrating", configs, dataset_dir=str(train_cohort), output_dir=str(run_copy), test_time_shifts=shifts)
    assert read_trust(run_copy / "model.pt").test_time_shifts == shifts
    # recorded as a training with them would have stored them: the run counts as made with these settings
    from monai_mtl.run_folder import differences, requested_settings

    stored = json.loads((run_copy / "run_settings.json").read_text())["config"]
    requested = requested_settings([str(BUNDLE_CONFIGS / "train.json")], train_cohort, run_copy,
                                   {"batch_size": 8, "test_time_shifts": shifts})["config"]
    assert differences(stored, requested) == []
    averaged = pd.read_csv(run_copy / "test_predictions.csv")
    assert not np.allclose(averaged["pred_severity"], single["pred_severity"])  # the moves change the outputs
    # the robustness and OOD tools' predictor averages over the same moves: the same test predictions
    predictor = CheckpointPredictor(run_copy / "model.pt")
    test_ids = json.loads((run_copy / "split.json").read_text())["test"]
    again = predictor.predict(to_datalist(read_cohort(train_cohort), test_ids))
    np.testing.assert_allclose(again["pred_severity"], averaged["pred_severity"], atol=1e-4)
    # evaluation takes the moves from the checkpoint; other moves than it was calibrated with are refused
    run_bundle("evaluating", configs, dataset_dir=str(train_cohort), output_dir=str(run_copy))
    assert json.loads((run_copy / "metrics.json").read_text())["severity_mae"] == pytest.approx(
        json.loads((run_copy / "test_metrics.json").read_text())["severity_mae"])
    error = raised_error(CheckpointError, run_bundle, "evaluating", configs, dataset_dir=str(train_cohort),
                         output_dir=str(run_copy), test_time_shifts=[[0, 0, 1]])
    assert "calibrated on outputs averaged over test_time_shifts [[1, 0, 0]" in str(error)
    # inference too: a CSV of the test scans gets the test predictions
    labels = read_cohort(train_cohort).set_index("subject_id").loc[test_ids]
    labels[["image"]].to_csv(tmp_path / "inputs.csv", index=False)
    run_bundle("run", str(BUNDLE_CONFIGS / "inference.json"), dataset_dir=str(tmp_path / "inputs.csv"),
               ckpt_path=str(run_copy / "model.pt"), output_dir=str(tmp_path / "predictions"))
    inferred = pd.read_csv(tmp_path / "predictions" / "predictions.csv")
    np.testing.assert_allclose(inferred["pred_severity"], averaged["pred_severity"], atol=1e-3)


def test_the_shift_averaging_inferer_averages_the_moved_scans_and_runs_the_scan_as_it_is_last():
    from monai_mtl.engines import ShiftAveragingInferer
    from monai_mtl.errors import ConfigError

    torch.manual_seed(0)
    network = torch.nn.Sequential(torch.nn.Conv3d(1, 2, 3), torch.nn.Flatten(), torch.nn.LazyLinear(4))
    scans = torch.randn(3, 1, 6, 6, 4)
    seen = []
    network[0].register_forward_hook(lambda module, inputs, output: seen.append(inputs[0].clone()))
    shifts = [[1, 0, 0], [0, -2, 1]]
    averaged = ShiftAveragingInferer(shifts)(scans, network)
    expected = (network(torch.roll(scans, (1, 0, 0), dims=(2, 3, 4))) + network(torch.roll(scans, (0, -2, 1), dims=(2, 3, 4)))
                + network(scans)) / 3
    torch.testing.assert_close(averaged, expected)
    assert torch.equal(seen[2], scans)  # the hook's last look (the OOD features) is at the scan as it is
    torch.testing.assert_close(ShiftAveragingInferer([])(scans, network), network(scans))
    for bad in ([[0, 0, 0]], [[1, 0]], [[0.5, 0, 0]], [[True, 0, 0]]):
        with pytest.raises(ConfigError, match="test_time_shifts needs"):
            ShiftAveragingInferer(bad)
