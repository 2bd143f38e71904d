"""Scans from other scanners: physical-space preprocessing bound to the checkpoint, multi-site cohorts, robustness."""

from __future__ import annotations

import json
from dataclasses import replace

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
from conftest import BUNDLE_CONFIGS, TRAIN_CONFIG, run_bundle
from monai.data import MetaTensor
from monai.transforms import Compose

from monai_mtl.__main__ import main
from monai_mtl.checkpoints import CheckpointError, checkpoint_settings, read_run_metadata
from monai_mtl.evaluation import CheckpointPredictor
from monai_mtl.robustness import regrid_subjects
from monai_mtl.synthetic import ATLAS_LABELS, CohortConfig, draw_sites, generate_cohort, render_atlas, render_subject
from monai_mtl.transforms import Preprocessing, ResampleToFieldOfViewd, augmentation_transforms, field_of_view_affine

INFER_CONFIG = str(BUNDLE_CONFIGS / "inference.json")
NATIVE = CohortConfig(num_samples=10, seed=1, noise_std=0.0, intensity_shift=0.0, warp_std_mm=0.0)


def _grid(shape: tuple[int, int, int]) -> CohortConfig:
    """NATIVE on ``shape`` with NATIVE's field of view."""
    fov = np.asarray(NATIVE.shape) * np.asarray(NATIVE.spacing_mm)
    return replace(NATIVE, shape=shape, spacing_mm=tuple(fov / np.asarray(shape)))


def _on_grid(shape: tuple[int, int, int], index: int) -> MetaTensor:
    """Subject ``index`` of NATIVE rendered noise-free on ``shape`` with NATIVE's field of view, channel-first."""
    grid = _grid(shape)
    _, image = render_subject(grid, index)
    return MetaTensor(torch.as_tensor(image)[None], affine=torch.as_tensor(grid.affine))


@pytest.mark.parametrize("shape, tolerance", [((80, 72, 24), 0.025), ((48, 48, 12), 0.055), ((128, 128, 32), 0.02)])
def test_the_same_phantom_on_another_grid_reaches_the_network_as_nearly_the_same_tensor(shape, tolerance):
    """Tolerance: mean |difference| in z-units (measured at most 0.018 / 0.047 / 0.014: what trilinear
    interpolation of point-sampled phantoms leaves). ``Spacingd`` + a centre crop, which shifted these grids by up to
    2 mm, left 0.033 / 0.056 / 0.046; the former ``Resized`` to a voxel count moved the intensity scale enough to
    shift every severity by ~30."""
    prep = Compose(Preprocessing().transforms()[2:])  # after LoadImaged and CheckImaged/EnsureTyped
    for index in range(3):
        native = prep({"image": _on_grid(NATIVE.shape, index)})["image"]
        other = prep({"image": _on_grid(shape, index)})["image"]
        assert other.shape == native.shape == (1, 64, 64, 16)
        assert float((other - native).abs().mean()) < tolerance * float(native.std())


def test_the_network_grid_is_centred_on_the_scan_whatever_its_grid_or_axis_order():
    """Grids with one field of view map to the same network grid; a scan already on it passes unchanged; a scan
    stored left-right and front-back flipped (LPS) reaches the network as the same tensor."""
    prep = Preprocessing()
    native = _on_grid(NATIVE.shape, 0)
    targets = [field_of_view_affine(_grid(shape).affine, shape, prep.pixdim, prep.spatial_size)
               for shape in [(64, 64, 16), (80, 72, 24), (48, 48, 12), (128, 128, 32)]]
    for target in targets:
        np.testing.assert_allclose(target, native.affine.numpy(), atol=1e-9)
    resample = ResampleToFieldOfViewd("image", prep.pixdim, prep.spatial_size)
    assert torch.equal(resample({"image": native})["image"].as_tensor(), native.as_tensor())

    flipped_affine = native.affine.clone()
    flipped_affine[:2, :2] *= -1  # x and y axes reversed: voxel (0, 0) is now the right-anterior corner
    flipped_affine[:2, 3] = native.affine[:2, 3] + native.affine[:2, :2] @ torch.tensor([63.0, 63.0], dtype=torch.float64)
    flipped = MetaTensor(native.as_tensor().flip(1, 2), affine=flipped_affine)
    chain = Compose(prep.transforms()[2:])
    assert torch.allclose(chain({"image": flipped})["image"], chain({"image": native})["image"], atol=1e-6)


def test_checkpoint_stores_preprocessing_and_network(trained_run):
    metadata = read_run_metadata(trained_run / "model.pt")
    assert metadata["preprocessing"] == {"pixdim": [2.5, 3.0, 8.0], "spatial_size": [64, 64, 16], "axcodes": "RAS",
                                         "intensity": "zscore", "landmarks": [], "bias_field_degree": 0}
    network_def = json.loads((BUNDLE_CONFIGS / "train.json").read_text())["network_def"]  # the settings it was trained with
    assert metadata["network"]["_target_"] == "monai_mtl.networks.DualPathNet"
    assert metadata["network"]["task_blocks"] == network_def["task_blocks"] and metadata["network"]["dropout"] == network_def["dropout"]
    settings = checkpoint_settings(trained_run / "model.pt", spatial_size=[64, 64, 16], pixdim=None)  # equal: accepted
    assert settings["preprocessing"] == Preprocessing()


@pytest.fixture(scope="module")
def run_48(train_cohort, tmp_path_factory):
    """A one-epoch run trained on a 48 x 48 x 16 grid of 3 mm voxels (not the defaults)."""
    output = tmp_path_factory.mktemp("runs") / "grid48"
    run_bundle("training", TRAIN_CONFIG, dataset_dir=str(train_cohort), output_dir=str(output), max_epochs=1,
               batch_size=8, cache_workers=1, spatial_size=[48, 48, 16], pixdim=[3.0, 3.0, 8.0])
    return output


@pytest.mark.slow
def test_inference_honours_a_checkpoint_trained_on_another_grid_without_any_flag(run_48, train_cohort, tmp_path):
    out = tmp_path / "inference"
    run_bundle("run", INFER_CONFIG, dataset_dir=str(train_cohort / "images"), output_dir=str(out),
               ckpt_path=str(run_48 / "model.pt"))
    predictions = pd.read_csv(out / "predictions.csv")
    # the same checkpoint through its stored preprocessing, by hand: identical predictions
    model = CheckpointPredictor(run_48 / "model.pt")
    assert model.preprocessing == Preprocessing(pixdim=(3.0, 3.0, 8.0), spatial_size=(48, 48, 16))
    labels = pd.read_csv(train_cohort / "labels.csv")
    records = [{"image": str(train_cohort / p), "response": r, "severity": s, "subject_id": i}
               for p, r, s, i in zip(labels["image"], labels["response"], labels["severity"], labels["subject_id"])]
    expected = model.predict(records)
    np.testing.assert_allclose(predictions["pred_severity"], expected["pred_severity"], atol=1e-4)
    assert (predictions["pred_response"].to_numpy() == expected["pred_response"].to_numpy()).all()


def test_a_contradicting_override_is_refused_naming_both_values(run_48, train_cohort, tmp_path):
    for key, value, stored in (("spatial_size", [64, 64, 16], "[48, 48, 16]"), ("pixdim", [2.5, 3.0, 8.0], "[3.0, 3.0, 8.0]")):
        with pytest.raises(Exception) as err:
            run_bundle("run", INFER_CONFIG, dataset_dir=str(train_cohort / "images"), output_dir=str(tmp_path / key),
                       ckpt_path=str(run_48 / "model.pt"), **{key: value})
        chain = repr(err.value) + repr(err.value.__cause__)
        assert f"{key}={value} contradicts" in chain and f"trained with {key}={stored}" in chain, chain
        assert not (tmp_path / key / "predictions.csv").exists()
    with pytest.raises(CheckpointError, match="intensity=zscore_minmax contradicts"):
        checkpoint_settings(run_48 / "model.pt", intensity="zscore_minmax")
    with pytest.raises(CheckpointError, match="bias_field_degree=2 contradicts .* trained with bias_field_degree=0"):
        checkpoint_settings(run_48 / "model.pt", bias_field_degree=2)
    assert checkpoint_settings(run_48 / "model.pt", bias_field_degree=0)["preprocessing"].bias_field_degree == 0


def test_evaluation_takes_the_preprocessing_from_the_checkpoint(run_48, train_cohort):
    config = [TRAIN_CONFIG, str(BUNDLE_CONFIGS / "evaluate.json")]
    # no spatial_size given, nor the cohort: the one the run's split.json records
    run_bundle("evaluating", config, output_dir=str(run_48))
    evaluated = json.loads((run_48 / "metrics.json").read_text())
    at_training = json.loads((run_48 / "test_metrics.json").read_text())
    assert evaluated["severity_mae"] == pytest.approx(at_training["severity_mae"], abs=1e-4)


def test_sites_write_the_column_and_each_site_acquisition(tmp_path):
    config = CohortConfig(num_samples=12, seed=4)
    labels = generate_cohort(tmp_path / "sites", config, workers=1, progress=False, sites=3)
    assert list(labels.columns)[-1] == "site" and set(labels["site"]) <= {0, 1, 2}
    meta = json.loads((tmp_path / "sites" / "cohort.json").read_text())
    assert [s["site"] for s in meta["sites"]] == [0, 1, 2]
    assert sum(meta["site_counts"].values()) == 12
    sites = draw_sites(config, 3)
    assert [s.shape for s in sites] == [tuple(s["shape"]) for s in meta["sites"]]
    fov = np.asarray(config.shape) * np.asarray(config.spacing_mm)
    for row in labels.itertuples():
        image = nib.load(tmp_path / "sites" / row.image)
        site = sites[row.site]
        assert image.shape == site.shape
        np.testing.assert_allclose(image.header.get_zooms(), site.spacing_mm, rtol=1e-5)
        np.testing.assert_allclose(np.asarray(image.shape) * image.header.get_zooms(), fov, rtol=1e-5)  # same field of view
        assert site.slice_thickness_mm >= site.spacing_mm[2]
    # the sites' acquisitions differ from each other, and from the single-site cohort's grid
    assert len({s.shape for s in sites}) == 3 and all(s.shape != config.shape for s in sites)
    assert draw_sites(config, 3) == sites  # drawn once per site from the seed
    # site is independent of the subject's own draws: the classes and severities are the single-site cohort's
    single = generate_cohort(tmp_path / "single", config, workers=1, progress=False)
    assert labels[["response", "severity"]].equals(single[["response", "severity"]])
    assert "site" not in single.columns


def test_thick_slices_integrate_the_anatomy_over_the_slab():
    config = CohortConfig(num_samples=2, seed=4, noise_std=0.0, intensity_shift=0.0)
    site = replace(draw_sites(config, 2)[0], bias_coefficients=(0.0,) * 9, gamma=1.0, rician_std=0.0, artifact="none")
    thin = replace(site, slice_thickness_mm=site.spacing_mm[2] / 100)
    _, point_sampled = render_subject(config, 0, thin)
    _, slab = render_subject(config, 0, site)
    # a slab average is smoother along z than point sampling: smaller slice-to-slice differences
    assert np.abs(np.diff(slab, axis=2)).mean() < np.abs(np.diff(point_sampled, axis=2)).mean()


def test_held_out_site_is_the_test_part(tmp_path):
    from monai_mtl.cohort import CohortError, stratified_split

    rng = np.random.default_rng(0)
    table = pd.DataFrame({"subject_id": [f"s{i}" for i in range(90)], "response": rng.choice(3, 90),
                          "site": rng.choice(3, 90)})
    split = stratified_split(table, held_out_site=1)
    assert set(split["test"]) == set(table.loc[table["site"] == 1, "subject_id"])
    assert not (set(split["train"]) | set(split["validation"])) & set(split["test"])
    with pytest.raises(CohortError, match="must be one of several sites"):
        stratified_split(table, held_out_site=7)


@pytest.mark.slow
def test_robust_augmentation_preset_is_monai_transforms_and_trains(train_cohort, tmp_path):
    names = [type(t).__name__ for t in augmentation_transforms("robust")]
    assert names == ["RandBiasFieldd", "RandAdjustContrastd", "RandGibbsNoised", "RandRicianNoised",
                     "RandGaussianSmoothd", "RandSimulateLowResolutiond", "RandAffined"]
    assert augmentation_transforms("paper") == []
    with pytest.raises(ValueError, match="augmentation must be one of"):
        augmentation_transforms("heavy")
    out = tmp_path / "robust"
    run_bundle("training", TRAIN_CONFIG, dataset_dir=str(train_cohort), output_dir=str(out), max_epochs=1,
               batch_size=8, cache_workers=1, augmentation="robust", spatial_size=[48, 48, 16])
    assert json.loads((out / "test_metrics.json").read_text())["n"] > 0


@pytest.mark.slow
def test_robustness_command_writes_its_table_and_figure(trained_run, train_cohort, tmp_path):
    out = tmp_path / "robustness"  # no --dataset-dir: the cohort the run was trained on, from its split.json
    assert main(["robustness", "--run", str(trained_run), "--output-dir", str(out),
                 "--kinds", "noise", "resolution", "slice_thickness", "--grids", "80x72x24"]) == 0
    table = pd.read_csv(out / "robustness.csv", keep_default_na=False)
    # a training run is calibrated: the sweep also says how many scans its OOD score flags, and how the rest fare
    assert list(table.columns) == ["kind", "strength", "n", "accuracy", "severity_mae",
                                   "ood_flagged", "unflagged_accuracy", "unflagged_severity_mae"]
    numbers = pd.read_csv(out / "robustness.csv")  # empty = NaN: the rest's figures when every scan is flagged
    assert numbers["ood_flagged"].between(0, 1).all()
    assert numbers["unflagged_accuracy"].isna().eq(numbers["ood_flagged"] == 1).all()
    none_flagged = numbers[numbers["ood_flagged"] == 0]
    assert np.allclose(none_flagged["unflagged_accuracy"], none_flagged["accuracy"])
    assert np.allclose(none_flagged["unflagged_severity_mae"], none_flagged["severity_mae"])
    assert table["kind"].tolist() == ["clean"] + ["noise"] * 3 + ["resolution"] * 3 + ["slice_thickness"] * 3 + ["grid"]
    assert table["strength"].tolist()[-1] == "80x72x24"
    n_test = len(json.loads((trained_run / "split.json").read_text())["test"])
    assert (table["n"] == n_test).all() and table["severity_mae"].between(0, 100).all()
    # the strongest noise moves the predictions away from the clean ones
    assert table["severity_mae"].iloc[3] != table["severity_mae"].iloc[0]
    assert (out / "robustness.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_sweeps_flag_columns_set_the_flagged_scans_aside():
    from monai_mtl.robustness import FLAGGED_COLUMNS, _flagged_row

    predictions = pd.DataFrame({"true_response": [0, 1, 2, 2], "pred_response": [0, 2, 2, 0],
                                "true_severity": [10.0, 50.0, 80.0, 90.0], "pred_severity": [12.0, 40.0, 79.0, 20.0],
                                "ood": [False, False, False, True]})
    row = _flagged_row(predictions)
    assert list(row) == list(FLAGGED_COLUMNS)
    assert row["ood_flagged"] == 0.25  # the flagged scan (wrong class, 70 points off) is set aside
    assert row["unflagged_accuracy"] == pytest.approx(2 / 3) and row["unflagged_severity_mae"] == pytest.approx(13 / 3)
    every = _flagged_row(predictions.assign(ood=True))
    assert every["ood_flagged"] == 1.0 and np.isnan(every["unflagged_accuracy"]) and np.isnan(every["unflagged_severity_mae"])
    none = _flagged_row(predictions.assign(ood=False))  # nothing flagged: the rest is the whole row
    assert none["ood_flagged"] == 0.0 and none["unflagged_accuracy"] == pytest.approx(2 / 4)
    assert none["unflagged_severity_mae"] == pytest.approx((2 + 10 + 1 + 70) / 4)


def test_the_sweep_and_the_ood_report_refuse_a_cohort_the_run_was_not_trained_on(trained_run, train_cohort, tmp_path, capsys):
    """Other labels under the same subject ids: the run's test part would name other scans; refused in one line."""
    other = tmp_path / "other"
    labels = pd.read_csv(train_cohort / "labels.csv")
    other.mkdir()
    labels.assign(image=[str(train_cohort / p) for p in labels["image"]],
                  severity=labels["severity"].where(labels.index != 0, 50.0)).to_csv(other / "labels.csv", index=False)
    for command in (["robustness", "--run", str(trained_run), "--kinds", "noise", "--grids"], ["trust", "--run", str(trained_run)]):
        with pytest.raises(SystemExit) as exit_:
            main([*command, "--dataset-dir", str(other), "--output-dir", str(tmp_path / command[0])])
        assert exit_.value.code == 2
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert last.endswith(f"{other} is not the cohort {trained_run} was trained on (its labels or images differ from "
                             f"the run's run_settings.json); it was trained on {train_cohort.absolute()}")
    assert not (tmp_path / "robustness").exists() and not (tmp_path / "trust").exists()


def test_the_tools_read_the_cohort_a_run_was_trained_on_when_not_told(trained_run, train_cohort, tmp_path):
    """robustness, trust, floor and baseline default --dataset-dir to the folder the run's split.json records, while
    it exists (a run copied from another machine falls back to data/synthetic, checked by its fingerprint)."""
    from monai_mtl.run_folder import run_dataset_dir

    assert run_dataset_dir(trained_run) == str(train_cohort.absolute())
    assert run_dataset_dir(None, trained_run / "split.json") == str(train_cohort.absolute())
    moved = tmp_path / "moved"
    moved.mkdir()
    split = json.loads((trained_run / "split.json").read_text())
    (moved / "split.json").write_text(json.dumps({**split, "dataset_dir": str(tmp_path / "gone")}))
    assert run_dataset_dir(moved) == "data/synthetic" and run_dataset_dir(tmp_path / "no_run") == "data/synthetic"
    assert run_dataset_dir(None) == "data/synthetic"


def test_the_sweep_with_adaptation_adds_the_adapted_figures_and_leaves_the_plain_ones_alone(trained_run, train_cohort,
                                                                                           tmp_path, capsys):
    """Each row adapted to its own scans, the stored statistics back before the next row: the plain columns equal a
    sweep without adaptation; the adapted ones differ. Too few scans in the part for the CLI's 20: one clear line."""
    from monai_mtl.robustness import artifact_sweep

    kinds = {"noise": (0.05,), "contrast": (1.5,)}
    plain = artifact_sweep(trained_run, train_cohort, tmp_path / "plain", kinds, None)
    adapted = artifact_sweep(trained_run, train_cohort, tmp_path / "adapted", kinds, None, adapt_batchnorm=True,
                             adapt_min_scans=2)
    assert list(adapted.columns) == [*plain.columns, "adapted_accuracy", "adapted_severity_mae"]
    pd.testing.assert_frame_equal(adapted[plain.columns], plain)
    assert (adapted["adapted_severity_mae"] != adapted["severity_mae"]).all()
    n_test = len(json.loads((trained_run / "split.json").read_text())["test"])
    with pytest.raises(SystemExit) as exit_:
        main(["robustness", "--run", str(trained_run), "--dataset-dir", str(train_cohort), "--output-dir",
              str(tmp_path / "cli"), "--kinds", "noise", "--grids", "--adapt-batchnorm"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(
        f"--adapt-batchnorm needs at least 20 scans, {trained_run}'s test part has {n_test}")


def test_regridded_subjects_keep_labels_and_a_trained_model_agrees_across_grids(trained_run, train_cohort, tmp_path):
    split = json.loads((trained_run / "split.json").read_text())
    model = CheckpointPredictor(trained_run / "model.pt")
    native = model.predict(regrid_subjects(train_cohort, split["test"], (64, 64, 16), tmp_path / "native"))
    finer = model.predict(regrid_subjects(train_cohort, split["test"], (80, 72, 24), tmp_path / "finer"))
    assert native["true_severity"].tolist() == pytest.approx(finer["true_severity"].tolist())
    # stated tolerance: each subject's predicted severity within 3 points across the two grids
    assert (native["pred_severity"] - finer["pred_severity"]).abs().max() < 3.0


@pytest.mark.slow
def test_leave_site_out_runs_one_training_per_site_and_a_within_site_cv(tmp_path, capsys):
    cohort = tmp_path / "two_sites"
    generate_cohort(cohort, CohortConfig(num_samples=48, seed=9), workers=2, progress=False, sites=2)
    out = tmp_path / "loso"
    assert main(["robustness", "--leave-site-out", "--dataset-dir", str(cohort), "--output-dir", str(out),
                 "--folds", "2", "--max-epochs", "1", "--override", "batch_size=8", "cache_workers=1",
                 "spatial_size=[32,32,16]"]) == 0
    table = pd.read_csv(out / "leave_site_out.csv")
    labels = pd.read_csv(cohort / "labels.csv")
    assert table["site"].tolist() == [0, 1]
    assert table["n"].tolist() == labels["site"].value_counts().sort_index().tolist()
    for site in (0, 1):
        tested = json.loads((out / f"site_{site}" / "split.json").read_text())["test"]
        assert set(tested) == set(labels.loc[labels["site"] == site, "subject_id"])
    assert {"within_site_cv_accuracy", "within_site_cv_severity_mae", "mae_ratio"} <= set(table.columns)
    predicted = pd.read_csv(out / "site_0" / "test_predictions.csv")
    assert table.loc[0, "held_out_mean_severity_error"] == pytest.approx(
        (predicted["pred_severity"] - predicted["true_severity"]).mean())
    # --folds 0: the held-out sites only (finished here, so nothing is trained again), no within-site columns
    trained = (out / "site_0" / "model.pt").stat().st_mtime_ns
    assert main(["robustness", "--leave-site-out", "--dataset-dir", str(cohort), "--output-dir", str(out),
                 "--folds", "0", "--max-epochs", "1", "--override", "batch_size=8", "cache_workers=1",
                 "spatial_size=[32,32,16]"]) == 0
    only = pd.read_csv(out / "leave_site_out.csv")
    assert (out / "site_0" / "model.pt").stat().st_mtime_ns == trained
    adapted = ["held_out_adapted_accuracy", "held_out_adapted_severity_mae", "held_out_adapted_mean_severity_error"]
    assert list(only.columns) == ["site", "n", "held_out_accuracy", "held_out_severity_mae", "held_out_mean_severity_error",
                                  *adapted]
    pd.testing.assert_frame_equal(only, table[only.columns])
    # each site's model adapted to the site's own scans (25 and 23: at least the 20 the adaptation needs), then
    # predicted again: other statistics, other severities
    assert table["n"].min() >= 20
    for row in table.itertuples():
        assert 0.0 <= row.held_out_adapted_accuracy <= 1.0
        assert row.held_out_adapted_severity_mae > 0 and row.held_out_adapted_severity_mae != row.held_out_severity_mae
    # a cohort whose labels have other column names, named by overrides: the sites and their figures as before
    renamed = tmp_path / "renamed"
    renamed.mkdir()
    labels.rename(columns={"response": "dx_class", "severity": "dx_severity"}).assign(
        image=[str(cohort / p) for p in labels["image"]]).to_csv(renamed / "labels.csv", index=False)
    assert main(["robustness", "--leave-site-out", "--dataset-dir", str(renamed), "--output-dir", str(tmp_path / "loso_renamed"),
                 "--folds", "0", "--max-epochs", "1", "--override", "batch_size=8", "cache_workers=1",
                 "spatial_size=[32,32,16]", "response_column=dx_class", "severity_column=dx_severity"]) == 0
    assert pd.read_csv(tmp_path / "loso_renamed" / "leave_site_out.csv")["n"].tolist() == table["n"].tolist()
    with pytest.raises(SystemExit) as exit_:
        main(["robustness", "--leave-site-out", "--dataset-dir", str(cohort), "--output-dir", str(out), "--folds", "1"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith("folds must be 0 (held-out sites only) or at least 2, got 1")


def test_histogram_standardisation_undoes_a_contrast_change_that_the_z_score_keeps():
    from monai_mtl.artifacts import gamma_contrast
    from monai_mtl.transforms import HISTOGRAM_BINS, HISTOGRAM_PERCENTILES, histogram_landmarks

    image = torch.as_tensor(render_subject(NATIVE, 0)[1])[None]
    landmarks = histogram_landmarks(image[None])[0]
    exact = torch.quantile(image.flatten(), torch.tensor(HISTOGRAM_PERCENTILES) / 100)
    assert float((landmarks - exact).abs().max()) <= float(image.max() - image.min()) / HISTOGRAM_BINS + 1e-6
    landmarks = tuple(float(v) for v in (landmarks - landmarks[0]) / (landmarks[-1] - landmarks[0]))
    assert len(landmarks) == len(HISTOGRAM_PERCENTILES) and landmarks[0] == 0.0 and landmarks[-1] == 1.0
    tissue = image > 0.3
    for gamma in (0.8, 1.25):
        other = torch.as_tensor(gamma_contrast(image.numpy(), gamma))
        # mean |difference| in the tissue, as a share of the tissue's spread: 0.003 against 0.14-0.15
        for intensity, at_most, at_least in (("histogram", 0.01, 0.0), ("zscore", 1.0, 0.1)):
            prep = Preprocessing(intensity=intensity, landmarks=landmarks if intensity == "histogram" else ())
            a, b = (prep.normalize_batch(v[None])[0] for v in (image, other))
            difference = float((a - b)[tissue].abs().mean() / a[tissue].std())
            assert at_least <= difference <= at_most, (intensity, gamma, difference)
    # the loader's transform and the batch's are one computation; the first landmark goes to 0, the last to 1
    prep = Preprocessing(intensity="histogram", landmarks=landmarks)
    loader = torch.as_tensor(Compose(prep.normalization("image"))({"image": image})["image"])
    torch.testing.assert_close(loader, prep.normalize_batch(image[None])[0])
    marks = torch.quantile(loader.flatten(), torch.tensor([HISTOGRAM_PERCENTILES[0], HISTOGRAM_PERCENTILES[-1]]) / 100)
    torch.testing.assert_close(marks, torch.tensor([0.0, 1.0]), atol=2e-3, rtol=0)
    with pytest.raises(Exception, match="needs 11 increasing landmarks fitted on the training part"):
        Preprocessing(intensity="histogram")


def test_bias_field_correction_divides_out_a_site_field_and_keeps_the_anatomy():
    from monai_mtl.artifacts import bias_field, polynomial_terms
    from monai_mtl.transforms import BiasFieldCorrectiond, correct_bias_field

    image = torch.as_tensor(render_subject(NATIVE, 0)[1])[None]
    tissue = image[0] > 0.3
    rng = np.random.default_rng(0)
    corrected = correct_bias_field(image[None], 2)[0]

    def log_gap(a: torch.Tensor, b: torch.Tensor) -> float:
        """Mean |log a - log b| over the tissue, a common gain removed (the normalisation takes it)."""
        d = (torch.log(a) - torch.log(b))[0][tissue]
        return float((d - d.mean()).abs().mean())

    for _ in range(3):  # fields like the multi-site generator's (coefficients of standard deviation 0.05-0.2)
        field = bias_field(tuple(image.shape[1:]), rng.normal(0.0, 0.15, len(polynomial_terms(tuple(image.shape[1:])))))
        scanned = image * torch.as_tensor(field)
        # measured: 0.05-0.10 before, under 0.005 after (the same anatomy's own correction as reference)
        assert log_gap(scanned, image) > 0.03
        assert log_gap(correct_bias_field(scanned[None], 2)[0], corrected) < 0.01
    # the anatomy's steps survive: white over grey matter, and over the hippocampi (the severity's signal), within 5%
    atlas = torch.as_tensor(render_atlas(NATIVE))
    for region in ("cortical_grey_matter", "left_hippocampus", "right_hippocampus"):
        label = next(k for k, v in ATLAS_LABELS.items() if v == region)
        ratio = [float(v[0][atlas == 3].mean() / v[0][atlas == label].mean()) for v in (image, corrected)]
        assert ratio[1] == pytest.approx(ratio[0], rel=0.05), region
    # degree 0 is no correction; the loader's transform and the batch's are one computation; a bad degree is refused
    assert torch.equal(correct_bias_field(image[None], 0), image[None])
    prep = Preprocessing(bias_field_degree=2)
    loader = torch.as_tensor(Compose(prep.normalization("image"))({"image": image})["image"])
    torch.testing.assert_close(loader, prep.normalize_batch(image[None])[0])
    assert isinstance(prep.normalization("image")[0], BiasFieldCorrectiond)
    for bad in (-1, 5, True, 1.5):
        with pytest.raises(Exception, match="bias_field_correction must be a polynomial degree from 0"):
            Preprocessing(bias_field_degree=bad)
    # a config's 2.0 is the degree 2 as an int (2.0 == 2 holds either way: the type is what the basis builder needs)
    degree = Preprocessing(bias_field_degree=2.0).bias_field_degree
    assert type(degree) is int and degree == 2


@pytest.mark.slow
def test_a_histogram_run_fits_its_landmarks_on_the_training_part_and_inference_uses_them(train_cohort, tmp_path):
    """With a bias-field correction too: it is stored, the landmarks are fitted on corrected scans, inference applies it."""
    from monai_mtl.transforms import fit_landmarks

    output = tmp_path / "histogram"
    run_bundle("training", TRAIN_CONFIG, dataset_dir=str(train_cohort), output_dir=str(output), max_epochs=1,
               batch_size=8, cache_workers=1, intensity_normalization="histogram", bias_field_correction=2)
    stored = Preprocessing.from_dict(read_run_metadata(output / "model.pt")["preprocessing"])
    train = json.loads((output / "split.json").read_text())["train"]
    labels = pd.read_csv(train_cohort / "labels.csv").set_index("subject_id")
    expected = fit_landmarks([{"image": str(train_cohort / labels.loc[i, "image"])} for i in train], "histogram",
                             stored.pixdim, stored.spatial_size, bias_field_degree=2)
    assert stored.intensity == "histogram" and stored.bias_field_degree == 2
    assert stored.landmarks == pytest.approx(expected, abs=1e-6)
    assert stored.landmarks != pytest.approx(fit_landmarks([{"image": str(train_cohort / labels.loc[i, "image"])} for i in train],
                                                           "histogram", stored.pixdim, stored.spatial_size), abs=1e-4)
    assert stored.landmarks[0] == 0.0 and stored.landmarks[-1] == pytest.approx(1.0)
    out = tmp_path / "inference"
    run_bundle("run", INFER_CONFIG, dataset_dir=str(train_cohort / "images"), output_dir=str(out),
               ckpt_path=str(output / "model.pt"))  # nothing given: the checkpoint's normalisation, landmarks, correction
    predictions = pd.read_csv(out / "predictions.csv")
    model = CheckpointPredictor(output / "model.pt")
    assert model.preprocessing == stored
    records = [{"image": str(train_cohort / p), "response": r, "severity": s, "subject_id": i}
               for p, r, s, i in zip(labels["image"], labels["response"], labels["severity"], labels.index)]
    np.testing.assert_allclose(predictions["pred_severity"], model.predict(records)["pred_severity"], atol=1e-4)
