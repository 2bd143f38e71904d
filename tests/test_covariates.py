"""Clinical covariates: the generator's columns and effect, and the encoding fitted on the training part."""

from __future__ import annotations

import json
import logging
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch

from monai_mtl.clinical import AGE_ATROPHY_PER_YEAR, COVARIATE_COLUMNS, observed_response, subject_age
from monai_mtl.cohort import to_datalist
from monai_mtl.covariates import CovariateDropout, CovariateEncoding, covariate_dropout
from monai_mtl.errors import CohortError, ConfigError
from monai_mtl.synthetic import CohortConfig, config_from_dict, generate_cohort, severity_renderer


def test_generate_covariates_adds_the_columns_and_moves_some_responses_only(tmp_path):
    config = CohortConfig(num_samples=40, seed=5)
    plain = generate_cohort(tmp_path / "plain", config, workers=1, progress=False)
    fused = generate_cohort(tmp_path / "fused", replace(config, age_atrophy_per_year=0.0), workers=1, progress=False,
                            covariates=True)
    assert list(fused.columns[-len(COVARIATE_COLUMNS):]) == list(COVARIATE_COLUMNS)
    assert list(plain.columns) == list(fused.columns[:-len(COVARIATE_COLUMNS)])  # nothing else added
    # without the age's atrophy the scans and severities are those of the cohort without covariates
    assert (plain["severity"] == fused["severity"]).all()
    for a, b in zip(plain["image"], fused["image"]):
        assert (tmp_path / "plain" / a).read_bytes() == (tmp_path / "fused" / b).read_bytes()
    # only the rule moves a response: one class down for ultrarapid metabolisers and after 3+ prior treatments
    csv = pd.read_csv(tmp_path / "fused" / "labels.csv")
    moved = csv["response"] != plain["response"]
    assert moved.any() and (csv["response"] <= plain["response"]).all()
    facts = json.loads((tmp_path / "fused" / "cohort.json").read_text())["covariates"]
    assert facts["responses_moved"] == int(moved.sum()) and facts["columns"] == list(COVARIATE_COLUMNS)
    assert not (csv.loc[moved, "prior_treatments"].lt(3) & csv.loc[moved, "genotype"].isin(["poor", "intermediate", "normal"])).any()
    assert observed_response(2, "ultrarapid", 4) == 0 and observed_response(0, "ultrarapid", 0) == 0


def test_the_age_atrophies_the_scan_as_the_disease_does_and_is_recorded(tmp_path):
    config = CohortConfig(num_samples=6, seed=5)
    fused = generate_cohort(tmp_path / "fused", config, workers=1, progress=False, covariates=True)
    recorded = json.loads((tmp_path / "fused" / "cohort.json").read_text())
    assert recorded["parameters"]["age_atrophy_per_year"] == AGE_ATROPHY_PER_YEAR == 0.2  # the default, resolved
    assert "0.2 x (age - 18)" in recorded["covariates"]["age_rule"]
    aged = config_from_dict(recorded["parameters"])  # what the floor and the grid sweep re-render from
    for index, row in fused.iterrows():
        age = subject_age(5, index)
        assert age == row["age"]
        _, young = severity_renderer(replace(config, age_atrophy_per_year=0.0), index)
        subject, old = severity_renderer(aged, index)
        # the scan at the disease's severity is the young anatomy at the severity plus 0.2 points a year above 18
        np.testing.assert_array_equal(old(subject.severity), young(subject.severity + 0.2 * (age - 18)))
        assert subject.severity == row["severity"]  # the label stays the disease's
    assert (fused["age"] > 18).any()
    # the paper's cohort has no age; a rate without covariates, or one that would lose more than everything, is refused
    with pytest.raises(ValueError, match="needs covariates"):
        generate_cohort(tmp_path / "x", replace(config, age_atrophy_per_year=0.2), workers=1, progress=False)
    with pytest.raises(ValueError, match="age_atrophy_per_year must be"):
        replace(config, age_atrophy_per_year=2.0).validate()
    assert json.loads(json.dumps(CohortConfig().age_atrophy_per_year)) is None


def _table():
    return pd.DataFrame({"subject_id": ["a", "b", "c", "d"], "age": [20, 40, None, 60],
                         "genotype": ["poor", "normal", "normal", None], "sex": ["F", "M", "F", "M"]})


def test_encoding_standardises_one_hots_and_flags_missing_values():
    encoding = CovariateEncoding.fit(_table(), ["age", "genotype"])
    assert encoding.numeric["age"] == pytest.approx([40.0, np.std([20, 40, 60])])
    assert encoding.categories["genotype"] == ["normal", "poor"]
    assert encoding.feature_names == ["age", "age:missing", "genotype=normal", "genotype=poor", "genotype:missing"]
    x = encoding.encode(_table())
    assert x.shape == (4, 5) and x.dtype == np.float32
    assert x[2, 0] == 0.0 and x[2, 1] == 1.0  # missing age: the training mean, flagged
    assert list(x[3, 2:]) == [0.0, 0.0, 1.0]  # missing genotype: no category, flagged
    assert CovariateEncoding.from_dict(json.loads(json.dumps(encoding.to_dict()))) == encoding


def test_encoding_is_fitted_on_the_training_part_only_and_logs_unknown_categories(caplog):
    train, test = _table().iloc[:3], _table().iloc[3:].copy()
    encoding = CovariateEncoding.fit(train, ["age", "genotype"])
    test.loc[:, "age"], test.loc[:, "genotype"] = 1000, "ultrarapid"
    before = encoding.to_dict()
    with caplog.at_level(logging.WARNING):
        x = encoding.encode(test)
    assert encoding.to_dict() == before  # a test-part value never changes the encoding
    assert x[0, 0] == pytest.approx((1000 - 30) / 10)  # standardised with the training part's mean and std
    assert list(x[0, 2:]) == [0.0, 0.0, 1.0]  # unknown category: encoded as missing ...
    assert "ultrarapid" in caplog.text and "subject d" in caplog.text  # ... and logged with its subject


def test_count_steps_give_a_whole_number_column_one_indicator_per_level_fitted_on_the_training_part():
    train = pd.DataFrame({"subject_id": list("abcdefg"), "prior": [0, 1, 2, 3, 3, None, 1],
                          "age": [20.5, 30, 40, 50, 60, 70, 80], "flag": [0, 1, 0, 1, 0, 1, 0]})
    encoding = CovariateEncoding.fit(train, ["prior", "age", "flag"], count_levels=4)
    # a count with 4 levels gets 3 steps; a non-integer column and a 0/1 column (already a step) get none
    assert encoding.steps == {"prior": [1.0, 2.0, 3.0]}
    assert encoding.feature_names == ["prior", "prior>=1", "prior>=2", "prior>=3", "prior:missing",
                                      "age", "age:missing", "flag", "flag:missing"]
    test = pd.DataFrame({"subject_id": ["x", "y", "z"], "prior": [2, None, 9], "age": [1, 2, 3], "flag": [0, 0, 0]})
    x = encoding.encode(test)
    assert list(x[0, 1:5]) == [1.0, 1.0, 0.0, 0.0]  # 2: "one or more", "two or more"
    assert list(x[1, 1:5]) == [0.0, 0.0, 0.0, 1.0]  # missing: no step, flagged
    assert list(x[2, 1:5]) == [1.0, 1.0, 1.0, 0.0]  # a level the training part never had still counts as >= 3
    assert x[2, 0] == pytest.approx((9 - 10 / 6) / np.std([0, 1, 2, 3, 3, 1]))  # the standardised value stays beside it
    assert CovariateEncoding.from_dict(json.loads(json.dumps(encoding.to_dict()))) == encoding
    # more levels than count_levels, or count_levels 0 (the default): no steps; an encoding stored before them has none
    assert CovariateEncoding.fit(train, ["prior"], count_levels=3).steps == {}
    assert CovariateEncoding.fit(train, ["prior"]).feature_names == ["prior", "prior:missing"]
    assert CovariateEncoding.from_dict({"columns": ["prior"], "numeric": {"prior": [1.0, 1.0]}}).steps == {}
    for wrong in (-1, "10", 2.5):  # a bundle override that is not a whole number is refused, naming the key
        with pytest.raises(ConfigError, match="covariate_count_levels must be a whole number"):
            CovariateEncoding.fit(train, ["prior"], count_levels=wrong)


def test_covariate_dropout_writes_exactly_the_missing_code_over_the_dropped_columns():
    train = pd.DataFrame({"subject_id": list("abcdefg"), "prior": [0, 1, 2, 3, 3, None, 1],
                          "genotype": ["poor", "normal", "normal", None, "poor", "normal", "poor"]})
    encoding = CovariateEncoding.fit(train, ["prior", "genotype"], count_levels=4)
    features = torch.as_tensor(encoding.encode(train)).repeat(300, 1)
    # what the encoding gives a subject whose values are all missing is the missing code
    nothing = pd.DataFrame({"subject_id": ["x"], "prior": [None], "genotype": [None]})
    assert encoding.encode(nothing)[0].tolist() == encoding.missing_code.tolist()
    assert encoding.column_of_feature == [0, 0, 0, 0, 0, 1, 1, 1]
    torch.manual_seed(0)
    dropped = CovariateDropout(encoding, 0.3)(features)
    code, columns = torch.as_tensor(encoding.missing_code), torch.as_tensor(encoding.column_of_feature)
    for column in range(2):
        block = columns == column
        changed = (dropped[:, block] != features[:, block]).any(dim=1)
        is_missing_code = (dropped[:, block] == code[block]).all(dim=1)
        assert bool((is_missing_code | ~changed).all())  # a changed column is exactly that column's missing code
        already = (features[:, block] == code[block]).all(dim=1)
        rate = float(is_missing_code[~already].float().mean())
        assert 0.22 < rate < 0.38  # about 30% of the present values dropped (2100 draws)
    # both columns are drawn apart: some subjects lose one and keep the other
    lost = [(dropped[:, columns == c] != features[:, columns == c]).any(dim=1) for c in range(2)]
    assert bool((lost[0] & ~lost[1]).any()) and bool((lost[1] & ~lost[0]).any())
    # probability 0 draws nothing from torch's stream (runs without it are reproduced exactly); a wrong value is refused
    first_draw = torch.rand(1, generator=torch.Generator().manual_seed(1)).item()
    torch.manual_seed(1)
    assert covariate_dropout(encoding, 0.0) is None and covariate_dropout(None, 0.0) is None
    assert CovariateDropout(encoding, 0.0)(features) is features
    assert torch.rand(1).item() == first_draw
    for wrong in (1.0, -0.1, "0.1", True):
        with pytest.raises(ConfigError, match="covariate_dropout must be a probability"):
            CovariateDropout(encoding, wrong)
    # the bundle key reaches the training's batches only (evaluation encodes the values as they are); a run stored
    # before the key drew nothing, the value 0 reads as that
    from conftest import BUNDLE_CONFIGS, TRAIN_CONFIG
    from monai.bundle import ConfigParser

    from monai_mtl.run_folder import ADDED_SETTINGS

    parser = ConfigParser()
    parser.read_config(TRAIN_CONFIG)
    parser["covariate_encoding"], parser["covariate_dropout"] = encoding, 0.3
    parser["preprocessing_settings"] = "$monai_mtl.transforms.Preprocessing()"  # a stand-in: the real one reads the cohort
    assert parser.get_parsed_content("train#prepare_batch").covariate_augmentation.probability == 0.3
    assert getattr(parser.get_parsed_content("prepare_batch"), "covariate_augmentation", None) is None
    assert ADDED_SETTINGS["covariate_dropout"] == 0.0 == json.loads(open(TRAIN_CONFIG).read())["covariate_dropout"]
    # the fused recipe drops each column with probability 0.1 (chosen on five folds' validation parts, docs/experiments.md)
    assert json.loads((BUNDLE_CONFIGS / "multimodal.json").read_text())["covariate_dropout"] == 0.1


def test_the_bundle_key_covariate_count_levels_reaches_the_encoding_fitted_on_the_training_part(tmp_path):
    from monai_mtl.cohort import prepare_datalists

    generate_cohort(tmp_path / "cohort", CohortConfig(num_samples=40, seed=5), workers=1, progress=False, covariates=True)
    datalists = prepare_datalists(tmp_path / "cohort", tmp_path / "run", validate_images=False,
                                  covariates=["prior_treatments", "sex"], covariate_count_levels=10)
    labels = pd.read_csv(tmp_path / "cohort" / "labels.csv").set_index("subject_id")
    levels = sorted(labels.loc[[r["subject_id"] for r in datalists["train"]], "prior_treatments"].unique())
    assert datalists.covariates.steps == {"prior_treatments": [float(k) for k in levels[1:]]}
    record = datalists["test"][0]
    count = labels.at[record["subject_id"], "prior_treatments"]
    assert list(record["covariates"][1:len(levels)]) == [float(count >= k) for k in levels[1:]]


def test_a_listed_covariate_the_table_lacks_is_refused():
    with pytest.raises(CohortError, match=r"covariate column\(s\) \['bmi'\].*not found"):
        CovariateEncoding.fit(_table(), ["age", "bmi"])


@pytest.mark.slow
def test_a_model_with_covariates_trains_evaluates_and_predicts_from_a_csv(tmp_path):
    from pathlib import Path

    from conftest import TRAIN_CONFIG, run_bundle
    from monai_mtl.checkpoints import read_run_metadata

    cohort = tmp_path / "cohort"
    generate_cohort(cohort, CohortConfig(num_samples=60, seed=11), workers=2, progress=False, covariates=True)
    run = tmp_path / "run"
    run_bundle("training", TRAIN_CONFIG, dataset_dir=str(cohort), output_dir=str(run), max_epochs=1, batch_size=8,
               cache_workers=1, covariates=["genotype", "prior_treatments", "baseline_score"])
    stored = read_run_metadata(run / "model.pt")
    encoding = CovariateEncoding.from_dict(stored["covariates"])
    assert stored["network"]["num_covariates"] == encoding.size == 1 + 4 + 1 + 1 + 1 + 1  # prior, genotype x4, score, 3 flags
    split = json.loads((run / "split.json").read_text())
    labels = pd.read_csv(cohort / "labels.csv").set_index("subject_id")
    assert encoding.numeric["prior_treatments"][0] == pytest.approx(labels.loc[split["train"], "prior_treatments"].mean())

    # evaluation encodes with the checkpoint's columns and reproduces the run's test figures
    run_bundle("evaluating", [TRAIN_CONFIG, str(Path(TRAIN_CONFIG).with_name("evaluate.json"))], dataset_dir=str(cohort),
               output_dir=str(run))
    tested, evaluated = (json.loads((run / f).read_text()) for f in ("test_metrics.json", "metrics.json"))
    assert evaluated["accuracy"] == tested["accuracy"] and evaluated["severity_mae"] == pytest.approx(tested["severity_mae"])
    # and explains each test subject's predictions by its covariates (integrated gradients, one number per column)
    attributions = pd.read_csv(run / "covariate_attributions.csv")
    assert sorted(attributions["subject_id"]) == sorted(split["test"])
    columns = ["genotype", "prior_treatments", "baseline_score"]
    assert list(attributions.columns) == ["subject_id", *(f"{task}:{c}" for task in ("response", "severity") for c in columns)]
    importance = evaluated["covariate_importance"]
    assert list(importance["severity"]) == columns and importance["completeness_error"] < 0.01
    assert importance["response"]["genotype"] == pytest.approx(attributions["response:genotype"].abs().mean())
    assert (run / "covariate_importance.png").stat().st_size > 0

    # the robustness sweep and the OOD report read each subject's covariates from the cohort as training encoded them:
    # the sweep's clean row is the run's test figure, and a re-rendered grid keeps its subjects' covariates
    from monai_mtl.evaluation import CheckpointPredictor
    from monai_mtl.robustness import artifact_sweep
    from monai_mtl.trust import ood_report

    sweep = artifact_sweep(run, cohort, tmp_path / "robustness", strengths={"noise": [0.05]}, grids=[(32, 32, 8)])
    assert list(sweep["kind"]) == ["clean", "noise", "grid"]
    clean = sweep.iloc[0]
    assert clean["accuracy"] == tested["accuracy"] and clean["severity_mae"] == pytest.approx(tested["severity_mae"])
    ood = ood_report(run, cohort, tmp_path / "trust", per_kind=2)
    assert ood["n"].iloc[0] == len(split["test"]) and ood["auroc"].iloc[1:].notna().all()
    predictor = CheckpointPredictor(run / "model.pt")
    records = predictor.with_covariates(to_datalist(labels.reset_index(), split["test"]), labels.reset_index())
    assert [list(r["covariates"]) for r in records] == encoding.encode(labels.loc[split["test"]].reset_index()).tolist()
    with pytest.raises(CohortError, match="trained with the covariates"):
        predictor.predict(to_datalist(labels.reset_index(), split["test"]))  # records without their vectors

    # inference reads the covariates from the input CSV; a CSV without one, or a folder of scans, is refused
    table = labels.reset_index()
    table["image"] = [str(cohort / p) for p in table["image"]]
    table.to_csv(tmp_path / "inputs.csv", index=False)
    infer = str(Path(TRAIN_CONFIG).with_name("inference.json"))
    run_bundle("run", infer, dataset_dir=str(tmp_path / "inputs.csv"), ckpt_path=str(run / "model.pt"),
               output_dir=str(tmp_path / "predictions"))
    assert len(pd.read_csv(tmp_path / "predictions" / "predictions.csv")) == 60
    table.drop(columns=["genotype"]).to_csv(tmp_path / "no_genotype.csv", index=False)
    from monai_mtl.errors import project_error

    for inputs, message in ((tmp_path / "no_genotype.csv", "covariate column(s) ['genotype']"),
                            (cohort / "images", "trained with the covariates")):
        with pytest.raises(Exception) as refused:
            run_bundle("run", infer, dataset_dir=str(inputs), ckpt_path=str(run / "model.pt"), output_dir=str(tmp_path / "p"))
        assert message in str(project_error(refused.value))  # the one line the error hook prints


def test_a_covariate_network_needs_its_covariates_and_keeps_imaging_checkpoints_unchanged():
    import torch

    from monai_mtl.networks import DualPathNet

    assert "num_covariates" not in DualPathNet().init_args  # imaging-only checkpoints store what they stored before
    fused = DualPathNet(num_covariates=3)
    assert fused(torch.zeros(2, 1, 64, 64, 16), torch.zeros(2, 3)).shape == (2, 4)
    with pytest.raises(ConfigError, match="trained with covariate features"):
        fused(torch.zeros(2, 1, 64, 64, 16))


def test_film_fusion_starts_as_the_imaging_path_then_modulates_it_by_the_covariates():
    import torch

    from monai_mtl.networks import DualPathNet, build_network, network_config
    from monai_mtl.run_folder import differences

    torch.manual_seed(0)
    film = DualPathNet(num_covariates=3, covariate_fusion="film").eval()
    image, one, other = torch.randn(2, 1, 64, 64, 16), torch.zeros(2, 3), torch.randn(2, 3) * 3
    # gamma = beta = 0 at initialisation: the covariates change nothing yet, and no covariate is joined to the dense layers
    assert torch.equal(film(image, one), film(image, other))
    assert film.response_head.mlp[2].in_features == 128
    film(image, other).sum().backward()  # ... but the modulation receives gradients, so training moves it
    assert film.response_head.film.weight.grad.abs().sum() > 0 and film.severity_head.film.weight.grad.abs().sum() > 0
    with torch.no_grad():
        film.response_head.film.weight.normal_()
    assert not torch.allclose(film(image, one)[:, :3], film(image, other)[:, :3])
    # the checkpoint's settings rebuild the FiLM network; concatenation stays the default
    assert build_network(network_config(film)).response_head.film is not None
    assert DualPathNet(num_covariates=3).init_args["covariate_fusion"] == "concat"
    with pytest.raises(ConfigError, match="covariate_fusion must be one of"):
        DualPathNet(num_covariates=3, covariate_fusion="sum")
    # runs stored before the key existed were concatenation runs: resuming them with the default is no difference
    current = {"covariate_fusion": "concat", "network_def#covariate_fusion": "@covariate_fusion", "seed": 1}
    assert differences({"seed": 1}, current) == []
    assert differences({"seed": 1}, {**current, "covariate_fusion": "film"}) == ['covariate_fusion: "concat" -> "film"']
    assert differences({"seed": 1}, {"seed": 1}) == []  # a config without the key (e.g. ResNet-18's network) is no difference


def test_integrated_gradients_add_up_to_the_change_and_ignore_an_unused_covariate():
    import torch

    from monai_mtl.attribution import column_groups, integrated_gradients, training_mean
    from monai_mtl.networks import DualPathNet

    torch.manual_seed(0)
    network = DualPathNet(num_covariates=4).eval()
    with torch.no_grad():  # the last feature (a column "unused") reaches nothing
        network.covariate_embedding[0].weight[:, 3] = 0.0
    image = torch.randn(1, 1, 64, 64, 16)
    subject, baseline = torch.tensor([1.5, -2.0, 1.0, 3.0]), torch.zeros(4)
    response, severity, deltas = integrated_gradients(network, image, subject, baseline, steps=64)
    assert response.shape == severity.shape == (4,)
    # completeness: the attributions add up to prediction minus baseline prediction, up to the midpoint rule's
    # error over the ReLU kinks (64 steps: 0.006 severity points here; it shrinks with more steps)
    assert abs(response.sum() - deltas[0]) <= 1e-3 and abs(severity.sum() - deltas[1]) <= 0.02
    assert response[3] == 0.0 and severity[3] == 0.0
    assert abs(deltas[1]) > 0  # the covariates do move the severity of this untrained network
    # with a severity recalibration, the attributions are those of the reported severity: the line's slope times the network's
    lines = [[1.5, -3.0], [1.25, 1.0], [0.5, 2.0]]
    recalibrated = integrated_gradients(network, image, subject, baseline, steps=64, severity_lines=lines)
    slope = lines[int(network(image, subject[None]).detach()[0, :3].argmax())][0]
    np.testing.assert_allclose(recalibrated[1], slope * severity, rtol=1e-5)
    np.testing.assert_allclose(recalibrated[2], [deltas[0], slope * deltas[1]], rtol=1e-5)
    np.testing.assert_array_equal(recalibrated[0], response)
    # at the baseline itself nothing is attributed
    response, severity, deltas = integrated_gradients(network, image, baseline, baseline)
    assert not response.any() and not severity.any() and not deltas.any()
    names = ["age", "age:missing", "genotype=poor", "genotype:missing"]
    assert column_groups(names, ["age", "genotype"]) == {"age": [0, 1], "genotype": [2, 3]}
    assert training_mean([{"covariates": np.ones(2)}, {"covariates": np.zeros(2)}]).tolist() == [0.5, 0.5]
    assert training_mean([{"image": "a.nii.gz"}]) is None


def _with_marker(cohort, target, seed: int = 3):
    """A copy of ``cohort`` whose response is a random ``marker`` column (a, b, c -> class 0, 1, 2) that no scan shows."""
    import shutil

    shutil.copytree(cohort, target)
    labels = pd.read_csv(target / "labels.csv")
    labels["response"] = np.random.default_rng(seed).permutation(np.arange(len(labels)) % 3)
    labels["response_name"] = labels["response"].map(dict(enumerate(["non_responder", "partial_responder", "responder"])))
    labels["marker"] = labels["response"].map(dict(enumerate("abc")))
    labels["noise"] = np.random.default_rng(seed + 1).normal(size=len(labels)).round(3)
    labels.to_csv(target / "labels.csv", index=False)
    return target


@pytest.mark.slow
def test_a_signal_only_the_covariates_carry_is_learned_by_the_fused_model_and_not_by_the_imaging_one(train_cohort, tmp_path):
    from conftest import TRAIN_CONFIG, run_bundle

    cohort = _with_marker(train_cohort, tmp_path / "marker")
    accuracy = {}
    for name, covariates, fusion in (("concat", ["marker", "noise"], "concat"), ("film", ["marker", "noise"], "film"),
                                     ("imaging", [], "concat")):
        run = tmp_path / name
        run_bundle("training", TRAIN_CONFIG, dataset_dir=str(cohort), output_dir=str(run), max_epochs=8, batch_size=8,
                   learning_rate=0.003, cache_workers=1, covariates=covariates, covariate_fusion=fusion)
        predictions = pd.read_csv(run / "test_predictions.csv")
        accuracy[name] = (predictions["pred_response"] == predictions["true_response"]).mean()
    # 9 test subjects: at most one miss for either fusion of the covariates (100% here), chance level (1/3) without them
    assert accuracy["concat"] >= 8 / 9 and accuracy["film"] >= 8 / 9 and accuracy["imaging"] < 0.7, accuracy


def test_a_run_stored_before_count_steps_resumes_without_a_difference_unless_they_are_asked_for():
    from pathlib import Path

    from monai_mtl.run_folder import FORMER_SETTINGS, differences

    former, now = FORMER_SETTINGS["datalists"]
    assert former.replace(")", ", covariate_count_levels=@covariate_count_levels)") == now
    from conftest import TRAIN_CONFIG

    assert json.loads(Path(TRAIN_CONFIG).read_text())["datalists"] == now  # what train.json has today
    current = {"datalists": now, "covariate_count_levels": 0}
    assert differences({"datalists": former}, current) == []  # an earlier run read as 0 steps, the encoding of then
    assert differences({"datalists": former}, {**current, "covariate_count_levels": 10}) == ["covariate_count_levels: 0 -> 10"]
