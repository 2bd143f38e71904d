"""The information limit: maximum-likelihood severity of an observer who knows everything but the noise."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pandas as pd
import pytest
from scipy.integrate import quad
from scipy.stats import norm

from monai_mtl.__main__ import main
from monai_mtl.clinical import most_likely_response
from monai_mtl.errors import CohortError
from monai_mtl.floor import (
    _kronecker_gram,
    _kronecker_project,
    anatomy_unknown_mae,
    cramer_rao_mae,
    estimate_severity,
    information_limit,
    log_likelihood,
    weighted_gram,
)
from monai_mtl.synthetic import (
    CohortConfig,
    _smooth_random_field,
    anatomy_renderer,
    generate_cohort,
    render_subject,
    severity_renderer,
    warp_covariance_factors,
)


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


def test_kronecker_products_of_the_deformation_match_the_explicit_matrices():
    rng = np.random.default_rng(0)
    factors = [rng.normal(size=(n, r)) for n, r in ((4, 2), (3, 3), (5, 2))]
    weight, volume = rng.uniform(0.5, 2.0, size=(4, 3, 5)), rng.normal(size=(4, 3, 5))
    explicit = np.kron(np.kron(factors[0], factors[1]), factors[2])  # C order: the last axis fastest, as ravel
    np.testing.assert_allclose(_kronecker_gram(weight, factors), explicit.T @ np.diag(weight.ravel()) @ explicit, rtol=1e-10)
    np.testing.assert_allclose(_kronecker_project(volume, factors), explicit.T @ volume.ravel(), rtol=1e-10)


def test_the_weighted_gram_matrix_is_the_explicit_jacobians():
    """``weighted_gram``: J' W J with the deformation's columns (each displacement derivative times the basis) first."""
    rng = np.random.default_rng(1)
    factors = [rng.normal(size=(n, r)) for n, r in ((4, 2), (3, 3), (5, 2))]
    weight = rng.uniform(0.5, 2.0, size=(4, 3, 5))
    moved, columns = [rng.normal(size=(4, 3, 5)) for _ in range(3)], [rng.normal(size=(4, 3, 5)) for _ in range(2)]
    basis = np.kron(np.kron(factors[0], factors[1]), factors[2])
    jacobian = np.concatenate([0.7 * g.ravel()[:, None] * basis for g in moved] + [c.ravel()[:, None] for c in columns], axis=1)
    np.testing.assert_allclose(weighted_gram(columns, moved, weight, factors, 0.7),
                               jacobian.T @ np.diag(weight.ravel()) @ jacobian, rtol=1e-10)
    dense = np.stack([c.ravel() for c in columns], axis=1)  # without a deformation: the dense columns alone
    np.testing.assert_allclose(weighted_gram(columns, [], weight, factors, 0.7), dense.T @ np.diag(weight.ravel()) @ dense,
                               rtol=1e-10)


def test_warp_covariance_factors_give_the_generators_deformation_statistics():
    config = CohortConfig()
    factors = warp_covariance_factors(config.shape, config.spacing_mm, config.warp_smoothness_mm)
    assert [f.shape[1] for f in factors] == [13, 15, 11]  # the frequencies the 15 mm low-pass keeps, per axis
    rng = np.random.default_rng(0)
    offsets = [(0, 0, 0), (1, 0, 0), (4, 0, 0), (0, 3, 0), (0, 0, 1), (2, 2, 1), (10, 0, 0)]
    products = np.zeros(len(offsets))
    for _ in range(30):  # the field is periodic and stationary: every voxel pair at an offset is a sample
        field = _smooth_random_field(rng, config.shape, config.spacing_mm, config.warp_smoothness_mm, config.warp_std_mm)
        products += [np.mean(field * np.roll(field, offset, axis=(1, 2, 3))) / 30 for offset in offsets]
    expected = [config.warp_std_mm**2 * np.prod([(f @ f.T)[0, d] for f, d in zip(factors, offset)]) for offset in offsets]
    # within 3%: the generator scales each draw by its own standard deviation, the factors by the expected one
    np.testing.assert_allclose(products, expected, rtol=0.03)


def test_the_render_takes_a_whole_deformation_in_place_of_the_subjects():
    """``warp_mm`` replaces the subject's smooth deformation (docs/scripts/bound_check.py fits one)."""
    config = CohortConfig()
    subject, render = anatomy_renderer(config, 2)
    _, render_undeformed = anatomy_renderer(dataclasses.replace(config, warp_std_mm=0.0), 2)
    zero = np.zeros((3, *config.shape))
    assert not np.allclose(render(subject.severity), render_undeformed(subject.severity))  # the subject's own is drawn
    np.testing.assert_array_equal(render(subject.severity, warp_mm=zero), render_undeformed(subject.severity))
    offset = np.array([0.5, -0.3, 1.0])
    np.testing.assert_allclose(render(subject.severity, warp_mm=zero + offset.reshape(3, 1, 1, 1)),
                               render_undeformed(subject.severity, warp_offset_mm=offset), atol=1e-6)


def test_anatomy_unknown_bound_is_the_schur_complement_of_the_whole_fisher_matrix():
    """Without the deformation the nuisance is ten numbers: the bound equals inverting the 11 x 11 Fisher matrix."""
    config = CohortConfig(warp_std_mm=0.0)
    subject, render = anatomy_renderer(config, 1)
    clean = render(subject.severity).astype(np.float64)
    weight = 1.0 / (config.noise_std**2 + (config.intensity_shift * clean) ** 2 / 3.0)

    def derivative(name, value, delta):
        return (render(subject.severity, **{name: value + delta}).astype(np.float64)
                - render(subject.severity, **{name: value - delta}).astype(np.float64)).ravel() / (2 * np.max(np.abs(delta)))

    eye = np.eye(3)
    columns = [(render(subject.severity + 0.5).astype(np.float64) - render(subject.severity - 0.5)).ravel()]
    columns += [derivative("rotation_rad", subject.rotation_rad, 1e-3 * e) for e in eye]
    columns += [derivative("scale", subject.scale, 1e-3 * e) for e in eye]
    columns += [derivative("translation_mm", subject.translation_mm, 0.05 * e) for e in eye]
    columns.append(derivative("ventricle_scale", subject.ventricle_scale, 1e-3))
    jacobian = np.stack(columns, axis=1)
    prior_sd = [np.deg2rad(config.rotation_deg) / np.sqrt(3)] * 3 + [config.scale_range / np.sqrt(3)] * 3 \
        + [config.translation_mm / np.sqrt(3)] * 3 + [config.ventricle_scale_std]
    fisher = jacobian.T @ (weight.ravel()[:, None] * jacobian) + np.diag([0.0] + [1 / sd**2 for sd in prior_sd])
    expected = np.sqrt(2 / (np.pi / np.linalg.inv(fisher)[0, 0]))

    known, unknown = anatomy_unknown_mae(config, 1)
    assert unknown == pytest.approx(expected, rel=1e-4)
    assert known == pytest.approx(cramer_rao_mae(render, subject.severity, config.noise_std, config.intensity_shift), rel=0.01)
    assert unknown > known  # reading the pose costs information


def test_anatomy_unknown_bound_is_the_known_one_when_the_generator_draws_no_anatomy():
    still = CohortConfig(rotation_deg=0.0, scale_range=0.0, translation_mm=0.0, ventricle_scale_std=0.0, warp_std_mm=0.0)
    known, unknown = anatomy_unknown_mae(still, 2)
    assert unknown == pytest.approx(known, rel=1e-9)
    known_default, unknown_default = anatomy_unknown_mae(CohortConfig(), 2)
    assert unknown_default > 1.5 * known_default  # the pose and the deformation hide part of the severity


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
        "subject_id,true_response,scan_response,limit_response,true_severity,floor_severity,bound_anatomy_known,"
        "bound_anatomy_unknown")
    # the efficient observer's figure agrees with the maximum-likelihood one in size; reading the anatomy costs more
    assert 0.3 * result["severity_mae"] < result["severity_mae_bound_anatomy_known"] < 3 * result["severity_mae"] + 0.05
    assert result["severity_mae_anatomy_unknown"] > result["severity_mae_bound_anatomy_known"]
    low, high = result["anatomy_unknown_bootstrap_95"]
    assert low <= result["severity_mae_anatomy_unknown"] <= high

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
