"""The batched scanner augmentation against MONAI's per-volume transforms at the same parameters."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.transforms import AdjustContrast, Affine, GibbsNoise, RandBiasField, RandRicianNoise, RandSimulateLowResolution

from monai_mtl.errors import ConfigError
from monai_mtl.transforms import DOWNSAMPLE_MODES, BatchScannerAugmentation

SHAPE = (24, 20, 8)


def _volumes(n: int = 3) -> torch.Tensor:
    """Smooth positive volumes (a blurred random field plus a blob): resampling differences stay small and visible."""
    generator = torch.Generator().manual_seed(0)
    coarse = torch.rand(n, 1, 6, 5, 2, generator=generator)
    smooth = torch.nn.functional.interpolate(coarse, size=SHAPE, mode="trilinear", align_corners=True)
    return 0.2 + smooth


def test_bias_field_is_monais_field():
    images, augmentation = _volumes(), BatchScannerAugmentation()
    coefficients = torch.rand(3, 20) * 0.1
    out = augmentation.bias_field(images, coefficients)
    for i in range(3):
        field = RandBiasField(degree=3)._generate_random_field(SHAPE, 3, coefficients[i].tolist())
        expected = images[i].numpy() * np.exp(field)
        np.testing.assert_allclose(out[i].numpy(), expected, rtol=1e-5, atol=1e-6)


def test_contrast_and_gibbs_are_monais():
    images = _volumes()
    gamma, alpha = torch.tensor([0.8, 1.0, 1.25]), torch.tensor([0.0, 0.2, 0.4])
    contrast, gibbs = BatchScannerAugmentation.contrast(images, gamma), BatchScannerAugmentation.gibbs(images, alpha)
    for i in range(3):
        torch.testing.assert_close(contrast[i], torch.as_tensor(AdjustContrast(float(gamma[i]))(images[i])), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(gibbs[i], torch.as_tensor(GibbsNoise(float(alpha[i]))(images[i])), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gibbs[0], images[0], rtol=1e-4, atol=1e-5)  # alpha 0 keeps all of k-space


@pytest.mark.parametrize("mode", DOWNSAMPLE_MODES)
@pytest.mark.parametrize("zoom", [0.5, 0.7, 0.9])
def test_low_resolution_is_monais(zoom, mode):
    image = _volumes(1)
    monai = RandSimulateLowResolution(prob=1.0, zoom_range=(zoom, zoom), downsample_mode=mode)
    torch.testing.assert_close(BatchScannerAugmentation.low_resolution(image, zoom, mode)[0], torch.as_tensor(monai(image[0])))


def test_area_downsampling_averages_what_a_coarse_voxel_covers_and_refuses_an_unknown_mode():
    # stripes one fine voxel wide, 0 and 1: a coarse voxel twice as wide covers one of each. A scanner's voxel (area)
    # sees their mean; nearest keeps one stripe of each pair, the contrast intact, as no scanner does
    stripes = (torch.arange(16) % 2).float().view(1, 1, 16, 1, 1).expand(1, 1, 16, 16, 8).contiguous()
    torch.testing.assert_close(BatchScannerAugmentation.low_resolution(stripes, 0.5, "area"), torch.full_like(stripes, 0.5))
    nearest = BatchScannerAugmentation.low_resolution(stripes, 0.5, "nearest")
    assert float(nearest.min()) == float(nearest.max()) and float(nearest.max()) in (0.0, 1.0)
    with pytest.raises(ConfigError, match="downsample_mode must be one of"):
        BatchScannerAugmentation(downsample_mode="bicubic")


def test_a_list_of_downsample_modes_draws_one_per_simulated_scan():
    only_low_resolution = {"bias_prob": 0.0, "contrast_prob": 0.0, "gibbs_prob": 0.0, "rician_prob": 0.0, "smooth_prob": 0.0,
                           "affine_prob": 0.0, "low_resolution_prob": 1.0, "zoom": [0.7, 0.7]}  # (at 0.5 trilinear is area)
    images = _volumes(1).repeat(12, 1, 1, 1, 1)
    mixed = BatchScannerAugmentation.from_settings({**only_low_resolution, "downsample_mode": ["area", "trilinear"]})
    torch.manual_seed(0)
    out = mixed(images)
    by_mode = {mode: BatchScannerAugmentation.low_resolution(images[:1], 0.7, mode)[0] for mode in ("area", "trilinear")}
    drawn = [next(m for m, expected in by_mode.items() if torch.allclose(out[i], expected)) for i in range(len(out))]
    assert set(drawn) == {"area", "trilinear"}  # each scan one of the two, both drawn
    # one mode in a list is that mode, with the draws of the string (nothing more drawn)
    single = BatchScannerAugmentation.from_settings({**only_low_resolution, "downsample_mode": ["area"]})
    assert single.downsample_mode == "area"
    torch.manual_seed(0)
    first = single(images)
    torch.manual_seed(0)
    torch.testing.assert_close(first, BatchScannerAugmentation.from_settings({**only_low_resolution, "downsample_mode": "area"})(images))
    for bad in ([], ["area", "bicubic"]):
        with pytest.raises(ConfigError, match="or a list of them"):
            BatchScannerAugmentation(downsample_mode=bad)


def test_affine_is_monais():
    images, augmentation = _volumes(), BatchScannerAugmentation()
    torch.manual_seed(1)
    matrices = augmentation.affine_matrices(3)
    out = augmentation.affine(images, matrices)
    for i in range(3):
        expected = Affine(affine=matrices[i], mode="bilinear", padding_mode="zeros", image_only=True)(images[i])
        torch.testing.assert_close(out[i], torch.as_tensor(expected), rtol=1e-4, atol=1e-4)
    # the draws: angles within 3 degrees, scale within 3%, shift within (2, 2, 1) voxels
    linear = matrices[:, :3, :3]
    assert torch.all((torch.linalg.det(linear) - 1).abs() < 0.1) and torch.all(matrices[:, :3, 3].abs() <= 2.2)


def test_rician_noise_matches_monais_in_distribution():
    image = torch.full((1, 1, 40, 40, 20), 0.5)
    torch.manual_seed(0)
    ours = BatchScannerAugmentation.rician(image, torch.tensor([0.2]))
    monai = torch.as_tensor(RandRicianNoise(prob=1.0, std=0.2, sample_std=False).set_random_state(0)(image[0]))
    assert ours.min() >= 0
    # the same Rice distribution (mean about 0.54, std about 0.19 here): means and stds within a few standard errors
    assert abs(float(ours.mean()) - float(monai.mean())) < 0.01 and abs(float(ours.std()) - float(monai.std())) < 0.01


def test_each_artifact_fires_at_its_probability_and_the_draws_follow_the_seed():
    images = _volumes(4)
    never = BatchScannerAugmentation(bias_prob=0, contrast_prob=0, gibbs_prob=0, rician_prob=0, smooth_prob=0,
                                     low_resolution_prob=0, affine_prob=0)
    torch.testing.assert_close(never(images), images)
    always = BatchScannerAugmentation(bias_prob=1, contrast_prob=1, gibbs_prob=1, rician_prob=1, smooth_prob=1,
                                      low_resolution_prob=1, affine_prob=1)
    torch.manual_seed(3)
    out = always(images)
    assert out.shape == images.shape and torch.all((out - images).flatten(1).abs().amax(dim=1) > 1e-3)
    assert len(out.flatten(1).unique(dim=0)) == 4  # each volume its own draws
    torch.manual_seed(3)
    torch.testing.assert_close(always(images), out)
    # the default preset: about 1 - 0.7 * 0.7 * 0.8**4 * 0.85 = 83% of the volumes get at least one artifact
    torch.manual_seed(0)
    many = _volumes(1).repeat(400, 1, 1, 1, 1)
    changed = ((BatchScannerAugmentation()(many) - many).flatten(1).abs().amax(dim=1) > 1e-6).float().mean()
    assert 0.77 < float(changed) < 0.89


@pytest.mark.parametrize("intensity", ["zscore", "zscore_minmax"])
def test_training_normalises_after_the_artifacts_as_the_loader_chain_did(intensity):
    from monai.transforms import Compose

    from monai_mtl.transforms import Preprocessing, TrainingAugmentation

    preprocessing = Preprocessing(spatial_size=SHAPE, intensity=intensity)
    images = _volumes(3) * 700.0  # scanner units: the normalisation is not the identity
    robust = TrainingAugmentation("robust", preprocessing, noise_std=0.0, shift=0.0)
    robust.scanner = BatchScannerAugmentation(bias_prob=0, contrast_prob=0, gibbs_prob=0, rician_prob=0, smooth_prob=0,
                                              low_resolution_prob=0, affine_prob=0)
    loader = Compose(preprocessing.normalization("image"))  # what the per-volume chain ended with
    for i, volume in enumerate(robust(images)):
        torch.testing.assert_close(volume, torch.as_tensor(loader({"image": images[i]})["image"]))
    paper = TrainingAugmentation("paper", preprocessing, noise_std=0.0, shift=0.0)
    assert robust.normalizes and not paper.normalizes
    torch.testing.assert_close(paper(images), images)  # the loader normalised already
    chain = [type(t).__name__ for t in preprocessing.transforms(normalize=not robust.normalizes)]
    assert "NormalizeIntensityd" not in chain and "NormalizeIntensityd" in [type(t).__name__ for t in preprocessing.transforms()]
    with pytest.raises(ValueError, match="augmentation must be one of"):
        TrainingAugmentation("heavy", preprocessing)


def test_smoothing_is_monais_gaussian_filter_with_each_volumes_sigmas():
    from monai.networks.layers import GaussianFilter

    images = torch.rand(3, 1, *SHAPE)
    sigmas = torch.tensor([[0.25, 0.8, 0.1], [0.8, 0.3, 0.4], [0.5, 0.5, 0.2]])
    out = BatchScannerAugmentation.smooth(images, sigmas)
    for i in range(3):
        torch.testing.assert_close(out[i : i + 1], GaussianFilter(3, sigmas[i].tolist(), approx="erf")(images[i : i + 1]),
                                   rtol=1e-5, atol=1e-6)


def test_ghosting_is_the_generators_motion_artifact_and_fires_only_when_asked():
    from monai_mtl.artifacts import motion_ghosting

    volume = _volumes(1)
    ghosted = BatchScannerAugmentation.ghosting(volume, 0.2, period=4, axis=1)
    np.testing.assert_allclose(ghosted[0, 0].numpy(), motion_ghosting(volume[0, 0].numpy(), 0.2, axis=1, period=4),
                               atol=1e-5)
    torch.testing.assert_close(BatchScannerAugmentation.ghosting(volume, 0.0, period=4, axis=0), volume, atol=1e-5, rtol=0)
    # ghosts: copies of the object (strength / period of its intensity) every FOV / period along the axis, nothing between
    cube = torch.zeros(1, 1, *SHAPE)
    cube[..., 8:12, 2:6, 3:5] = 1.0
    ghost = BatchScannerAugmentation.ghosting(cube, 0.4, period=4, axis=1)[0, 0]
    torch.testing.assert_close(ghost[8:12, 2:6, 3:5], torch.full((4, 4, 2), 0.9), atol=1e-5, rtol=0)
    torch.testing.assert_close(ghost[8:12, 7:11, 3:5], torch.full((4, 4, 2), 0.1), atol=1e-5, rtol=0)
    assert float(ghost[8:12, [1, 6, 11], 3:5].abs().max()) < 1e-5 and float(ghost[:, :, :3].abs().max()) < 1e-5
    # off by default, so the other artifacts draw exactly what they drew before the setting existed
    never = dict(bias_prob=0, contrast_prob=0, gibbs_prob=0, rician_prob=0, smooth_prob=0, low_resolution_prob=0,
                 affine_prob=0)
    images = _volumes(4)
    torch.testing.assert_close(BatchScannerAugmentation(**never)(images), images)
    torch.manual_seed(0)
    out = BatchScannerAugmentation(**never, ghost_prob=1.0, ghost_strength=(0.1, 0.3))(images)
    assert torch.all((out - images).flatten(1).abs().amax(dim=1) > 1e-3)


def test_mirror_exchanges_left_and_right_as_monai_flip_and_draws_nothing_when_off():
    from monai.transforms import Flip

    never = dict(bias_prob=0, contrast_prob=0, gibbs_prob=0, rician_prob=0, smooth_prob=0, low_resolution_prob=0,
                 affine_prob=0)
    images = _volumes(4)
    mirrored = BatchScannerAugmentation(**never, flip_prob=1.0)(images)
    for volume, out in zip(images, mirrored):
        torch.testing.assert_close(out, torch.as_tensor(Flip(spatial_axis=0)(volume)))
    # drawn after every other artifact: switching it on leaves their draws as they were (off, the default, draws nothing)
    torch.manual_seed(3)
    off = BatchScannerAugmentation()(images)
    torch.manual_seed(3)
    torch.testing.assert_close(BatchScannerAugmentation(flip_prob=1.0)(images), BatchScannerAugmentation.mirror(off))
    torch.manual_seed(3)
    some = BatchScannerAugmentation(**never, flip_prob=0.5)(_volumes(64))
    flipped = sum(bool(torch.equal(o, v.flip(1))) for o, v in zip(some, _volumes(64)))
    assert 16 < flipped < 48  # about half
    with pytest.raises(ConfigError, match="flip_prob"):
        BatchScannerAugmentation.from_settings({"flip_prob": 2})


def test_scanner_augmentation_key_lists_every_setting_and_refuses_an_unknown_one():
    import json

    from conftest import TRAIN_CONFIG
    from monai.bundle import ConfigParser

    from monai_mtl.run_folder import ADDED_SETTINGS, differences, flatten

    settings = json.loads(open(TRAIN_CONFIG).read())["scanner_augmentation"]
    assert sorted(settings) == sorted(BatchScannerAugmentation.default_settings())
    parser = ConfigParser()
    parser.read_config(TRAIN_CONFIG)
    parser["scanner_augmentation"]["ghost_prob"] = 0.25
    parser["scanner_augmentation"]["bias_coeff"] = [-0.2, 0.2]
    # the training's augmentation gets the key (its preprocessing, resolved too, would read the cohort: a stand-in)
    parser["preprocessing_settings"] = "$monai_mtl.transforms.Preprocessing()"
    scanner = parser.get_parsed_content("train#batch_augmentation").scanner
    assert scanner.ghost_prob == 0.25 and scanner.bias_coeff == (-0.2, 0.2)
    with pytest.raises(ConfigError, match="scanner_augmentation has no setting 'bias_range'"):
        BatchScannerAugmentation.from_settings({"bias_range": [0, 1]})
    with pytest.raises(ConfigError, match="ghost_period"):
        BatchScannerAugmentation.from_settings({"ghost_period": [1, 4]})
    # a run stored before the key drew the class defaults: no difference on resume, unless the ranges changed
    current = {**flatten({"scanner_augmentation": BatchScannerAugmentation.default_settings()}),
               "train#batch_augmentation#scanner": "@scanner_augmentation", "learning_rate": 0.0005}
    assert all(k in ADDED_SETTINGS for k in current if k != "learning_rate")
    # the landmarks expression a run stored before reads as train.json's own (the z-score fits nothing with it), and
    # one stored before bias_field_correction as the same call with the correction (0 then: none)
    config = json.loads(open(TRAIN_CONFIG).read())
    landmarks = {"preprocessing_settings#landmarks": config["preprocessing_settings"]["landmarks"],
                 "preprocessing_settings#bias_field_degree": "@bias_field_correction", "bias_field_correction": 0}
    assert differences({}, landmarks) == []
    old_call = landmarks["preprocessing_settings#landmarks"].replace(", bias_field_degree=@bias_field_correction", "")
    assert differences({"preprocessing_settings#landmarks": old_call}, landmarks) == []
    assert differences({}, {**landmarks, "bias_field_correction": 2}) == ["bias_field_correction: 0 -> 2"]
    assert ADDED_SETTINGS["train#batch_augmentation#scanner"] == config["train"]["batch_augmentation"]["scanner"]
    assert differences({"learning_rate": 0.0005}, current) == []
    assert differences({"learning_rate": 0.0005}, {**current, "scanner_augmentation#ghost_prob": 0.2}) == [
        "scanner_augmentation#ghost_prob: 0.0 -> 0.2"]


def test_multisite_config_merges_its_ranges_into_the_robust_presets():
    from conftest import BUNDLE_CONFIGS, TRAIN_CONFIG
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([TRAIN_CONFIG, str(BUNDLE_CONFIGS / "multisite.json")])
    assert parser["intensity_normalization"] == "histogram" and parser["augmentation"] == "robust"
    assert parser["bias_field_correction"] == 2 and parser["preprocessing_settings"]["bias_field_degree"] == "@bias_field_correction"
    scanner = BatchScannerAugmentation.from_settings(parser["scanner_augmentation"])
    defaults = BatchScannerAugmentation()
    assert scanner.bias_coeff == (-0.25, 0.25) and scanner.ghost_prob == 0.2 and scanner.rician_std == 0.2
    assert scanner.gamma == defaults.gamma and scanner.zoom == defaults.zoom  # merged ("+"), the others kept


@pytest.mark.parametrize("recipe, mode, probability", [
    # the default, chosen on the grids of five CV models' validation parts (docs/experiments.md)
    ((), ("area", "trilinear"), 0.3),
    # the recipes whose figures were made with 0.2 (and MONAI's nearest) keep them
    (("multisite.json",), "nearest", 0.2),
    (("multimodal.json",), "nearest", 0.2),
    (("baselines/resnet18.json",), "area", 0.2),
    (("paper.json",), None, None),  # augmentation paper: no scanner artifacts, the paper's noise and shift only
])
def test_each_recipe_simulates_a_coarser_grid_its_way(recipe, mode, probability):
    from conftest import BUNDLE_CONFIGS, TRAIN_CONFIG
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([TRAIN_CONFIG, *(str(BUNDLE_CONFIGS / name) for name in recipe)])
    parser["preprocessing_settings"] = "$monai_mtl.transforms.Preprocessing()"  # a stand-in: the real one reads the cohort
    scanner = parser.get_parsed_content("train#batch_augmentation").scanner
    assert (scanner.downsample_mode if scanner else None) == mode
    assert (scanner.low_resolution_prob if scanner else None) == probability
