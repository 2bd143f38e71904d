"""The information limit: maximum-likelihood severity of an observer who knows everything but the noise."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from scipy.integrate import quad
from scipy.stats import norm

from monai_mtl.__main__ import main
from monai_mtl.clinical import most_likely_response
from monai_mtl.errors import CohortError
from monai_mtl.floor import cramer_rao_mae, estimate_severity, information_limit, log_likelihood
from monai_mtl.synthetic import CohortConfig, generate_cohort, render_subject, severity_renderer


@pytest.mark.parametrize("y, c", [(0.6, 0.62), (0.5, 0.62), (0.0, 0.0), (0.02, 0.001), (0.9, 0.85)])
def test_voxel_likelihood_is_the_uniform_shift_convolved_with_the_gaussian_noise(y, c):
    noise, shift = 0.01, 0.05
    if c * shift > 1e-3 * noise:
        density = quad(lambda u: norm.pdf(y - c * (1 + u), scale=noise) / (2 * shift), -shift, shift, points=[0])[0]
    else:
        density = norm.pdf(y - c, scale=noise)
    assert log_likelihood(np.array([y]), np.array([c]), noise, shift) == pytest.approx(np.log(density), rel=1e-6, abs=1e-6)


@pytest.mark.parametrize("config", [CohortConfig(), CohortConfig(age_atrophy_per_year=0.2)], ids=["paper", "aged"])
def test_floor_is_exact_on_noise_free_renders(config):
    # with covariates the observer knows the age too: the render at each candidate severity carries its atrophy
    for index in range(3):
        subject, render = severity_renderer(config, index)
        low, high = config.severity_ranges[subject.response]
        # without the intensity shift and with a vanishing noise the likelihood is least squares
        assert estimate_severity(render(subject.severity), render, low, high, 1e-4, 0.0) == pytest.approx(subject.severity, abs=0.01)


@pytest.mark.slow
def test_floor_on_noisy_scans_stays_within_the_cramer_rao_bound():
    """An efficient estimator's |error| has mean sqrt(2 / (pi I)); three times that bounds the mean of six."""
    config = CohortConfig()
    errors, bounds = [], []
    for index in range(6):
        subject, render = severity_renderer(config, index)
        _, noisy = render_subject(config, index)
        low, high = config.severity_ranges[subject.response]
        errors.append(abs(estimate_severity(noisy, render, low, high, config.noise_std, config.intensity_shift) - subject.severity))
        bounds.append(cramer_rao_mae(render, subject.severity, config.noise_std, config.intensity_shift))
    assert np.mean(errors) <= 3 * np.mean(bounds) + 0.01, (errors, bounds)
    assert max(bounds) < 0.5  # the noise leaves the severity known to a fraction of a point


@pytest.mark.slow
def test_floor_command_writes_its_json_and_refuses_other_cohorts(tmp_path):
    cohort = tmp_path / "cohort"
    generate_cohort(cohort, CohortConfig(num_samples=12, seed=3), workers=1, progress=False)
    split = tmp_path / "run" / "split.json"
    split.parent.mkdir()
    split.write_text(json.dumps({"train": [], "validation": [], "test": ["sub-00000", "sub-00004", "sub-00007"]}))
    result = information_limit(cohort, split, workers=1)
    assert result["n"] == 3 and result["severity_mae"] < 1.0
    assert result["bootstrap_95"][0] <= result["severity_mae"] <= result["bootstrap_95"][1]
    written = json.loads((tmp_path / "run" / "floor.json").read_text())
    assert written["severity_mae"] == pytest.approx(result["severity_mae"]) and written["part"] == "test"
    assert written["response_accuracy_limit"] == 1.0  # without covariates the scan shows the response
    assert (tmp_path / "run" / "floor_predictions.csv").read_text().startswith(
        "subject_id,true_response,scan_response,limit_response,true_severity,floor_severity")

    (cohort / "cohort.json").unlink()
    with pytest.raises(CohortError, match="no cohort.json"):
        information_limit(cohort, split, workers=1)
    sites = tmp_path / "sites"
    generate_cohort(sites, CohortConfig(num_samples=6, seed=3), workers=1, progress=False, sites=2)
    with pytest.raises(CohortError, match="multi-site"):
        information_limit(sites, split, workers=1)


def test_the_response_observer_applies_the_rule_and_guesses_the_commonest_genotype_where_it_is_missing():
    assert most_likely_response(2, "ultrarapid", 3) == 0 and most_likely_response(2, "poor", 0) == 2
    assert most_likely_response(1, "normal", 4) == 0
    # not genotyped: 85% of genotypes leave the class, so the observer keeps it ...
    assert most_likely_response(2, None, 0) == 2 and most_likely_response(2, None, 3) == 1
    # ... unless ultrarapid metabolisers were the majority of the population
    assert most_likely_response(2, None, 0, {"normal": 0.4, "ultrarapid": 0.6}) == 1


def test_response_limit_misses_exactly_the_subjects_a_missing_genotype_hides(tmp_path):
    cohort = tmp_path / "cohort"
    labels = generate_cohort(cohort, CohortConfig(num_samples=16, seed=21), workers=1, progress=False, covariates=True)
    ids = list(labels["subject_id"])
    for fold, test in enumerate((ids[:8], ids[8:])):  # a cv folder: the limit goes to each fold
        (tmp_path / "cv" / f"fold_{fold}").mkdir(parents=True)
        (tmp_path / "cv" / f"fold_{fold}" / "split.json").write_text(json.dumps({"train": [], "validation": [], "test": test,
                                                                                  "dataset_dir": str(cohort)}))
    # no --dataset-dir: each split's recorded cohort
    assert main(["floor", "--split", str(tmp_path / "cv"), "--response-only"]) == 0

    results = [json.loads((tmp_path / "cv" / f"fold_{k}" / "floor.json").read_text()) for k in (0, 1)]
    assert results[0]["response_accuracy_limit"] == 1.0 and "severity_mae" not in results[0]
    # subject 13 (seed 21) is an ultrarapid metaboliser without a genotype whose class the genotype moved
    # (draw_covariates's true genotype): the only subject no observer can get right
    assert results[1]["response_accuracy_limit"] == pytest.approx(7 / 8)
    assert results[1]["response_bootstrap_95"][0] < 7 / 8 <= results[1]["response_bootstrap_95"][1]
    table = pd.concat(pd.read_csv(tmp_path / "cv" / f"fold_{k}" / "floor_predictions.csv") for k in (0, 1))
    assert table.loc[table["limit_response"] != table["true_response"], "subject_id"].tolist() == ["sub-00013"]
    assert (table["scan_response"] != table["true_response"]).sum() > 1  # the rule moved others, and the observer follows it
    assert pd.isna(labels.set_index("subject_id").loc["sub-00013", "genotype"])

    edited = labels.copy()
    edited.loc[edited["subject_id"] == "sub-00002", "response"] = (edited.loc[edited["subject_id"] == "sub-00002", "response"] + 1) % 3
    edited.to_csv(cohort / "labels.csv", index=False)
    with pytest.raises(CohortError, match="sub-00002: labels.csv says response"):
        information_limit(cohort, tmp_path / "cv" / "fold_0" / "split.json", severity=False)
