"""Test-time adaptation to a new scanner: batch-norm statistics re-estimated on its scans (monai_mtl.adaptation)."""

from __future__ import annotations

import shutil

import pandas as pd
import pytest
import torch
from conftest import BUNDLE_CONFIGS, raised_error, run_bundle
from torch import nn

from monai_mtl.adaptation import ADAPTATION_FILE, BatchNormAdaptation, adapt_batchnorm, read_adaptation
from monai_mtl.errors import ConfigError

INFER_CONFIG = str(BUNDLE_CONFIGS / "inference.json")


class _Net(nn.Module):
    """Conv -> batch norm -> dropout -> linear, called like the fused network (image, covariates keyword)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv3d(1, 2, 1, bias=False)
        self.norm = nn.BatchNorm3d(2)
        self.drop = nn.Dropout(0.9)
        self.head = nn.Linear(2, 1)

    def forward(self, x: torch.Tensor, covariates: torch.Tensor | None = None) -> torch.Tensor:
        self.seen_covariates = covariates
        return self.head(self.drop(self.norm(self.conv(x)).mean((2, 3, 4))))


def _batches(seed: int = 0, n: int = 4, size: int = 6, shift: float = 3.0) -> list[tuple[torch.Tensor, dict]]:
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 1, 4, 4, 2, generator=generator) * 2.0 + shift, {}) for _ in range(n)]


def test_full_weight_gives_the_new_scans_statistics_and_nothing_else_changes():
    net = _Net().eval()
    weights = {k: v.clone() for k, v in net.state_dict().items() if "running" not in k and "tracked" not in k}
    batches = _batches()
    assert adapt_batchnorm(net, batches, min_scans=20, weight=1.0) == 24
    with torch.no_grad():  # the conv's output over the batches: per batch mean and unbiased variance, averaged
        features = [net.conv(x) for x, _ in batches]
    means = torch.stack([f.mean((0, 2, 3, 4)) for f in features]).mean(0)
    variances = torch.stack([f.transpose(0, 1).flatten(1).var(1) for f in features]).mean(0)
    torch.testing.assert_close(net.norm.running_mean, means)
    torch.testing.assert_close(net.norm.running_var, variances)
    assert not net.training and not net.norm.training  # back in evaluation mode
    assert net.norm.momentum == 0.1  # its momentum restored for any later training
    for key, value in weights.items():
        assert torch.equal(net.state_dict()[key], value), key


def test_a_partial_weight_blends_the_training_and_the_new_statistics():
    full, half = _Net(), _Net()
    half.load_state_dict(full.state_dict())
    before_mean, before_var = full.norm.running_mean.clone(), full.norm.running_var.clone()  # 0 and 1 from training
    adapt_batchnorm(full, _batches(), min_scans=1, weight=1.0)
    adapt_batchnorm(half, _batches(), min_scans=1, weight=0.25)
    torch.testing.assert_close(half.norm.running_mean, 0.75 * before_mean + 0.25 * full.norm.running_mean)
    torch.testing.assert_close(half.norm.running_var, 0.75 * before_var + 0.25 * full.norm.running_var)


def test_dropout_stays_off_and_the_covariates_reach_the_network():
    net, other = _Net(), _Net()
    covariates = torch.ones(6, 3)
    adapt_batchnorm(net, [(x, {"covariates": covariates}) for x, _ in _batches()], min_scans=1, weight=1.0)
    assert net.seen_covariates is covariates
    # during the pass only the batch-norm layers are in training mode: dropout off, as in evaluation
    modes = []
    other.drop.register_forward_hook(lambda module, args, out: modes.append((module.training, other.norm.training)))
    adapt_batchnorm(other, _batches(), min_scans=1, weight=1.0)
    assert modes and all(mode == (False, True) for mode in modes)


def test_too_few_scans_are_refused_and_leave_the_statistics_as_they_were():
    net = _Net()
    adapt_batchnorm(net, _batches(seed=1), min_scans=1, weight=1.0)
    mean, var, tracked = net.norm.running_mean.clone(), net.norm.running_var.clone(), net.norm.num_batches_tracked.clone()
    with pytest.raises(ConfigError, match=r"at least 20 usable scans .*adapt_batchnorm_min_scans.*, my folder has 12"):
        adapt_batchnorm(net, _batches(seed=2, n=2), min_scans=20, source="my folder")
    assert torch.equal(net.norm.running_mean, mean) and torch.equal(net.norm.running_var, var)
    assert torch.equal(net.norm.num_batches_tracked, tracked)

    def failing():  # a scan that breaks the pass after the first batch: nothing half-made either
        yield _batches(seed=3, n=1)[0]
        raise OSError("unreadable scan")

    with pytest.raises(OSError, match="unreadable scan"):
        adapt_batchnorm(net, failing(), min_scans=1)
    assert torch.equal(net.norm.running_mean, mean) and torch.equal(net.norm.running_var, var)
    assert net.norm.momentum == 0.1 and net.training and net.norm.training  # its mode before the call (training)


@pytest.mark.parametrize("weight", [0.0, -0.5, 1.5])
def test_a_weight_outside_its_range_is_refused(weight):
    with pytest.raises(ConfigError, match=r"adapt_batchnorm_weight must be in \(0, 1\]"):
        adapt_batchnorm(_Net(), _batches(), weight=weight)
    with pytest.raises(ConfigError, match="adapt_batchnorm_weight"):
        BatchNormAdaptation("out", enabled=True, weight=weight)


def test_the_switch_is_a_boolean():
    with pytest.raises(ConfigError, match="adapt_batchnorm must be true or false, got 'yes'"):
        BatchNormAdaptation("out", enabled="yes")


def test_a_network_without_batch_norm_is_refused():
    with pytest.raises(ConfigError, match="has no batch-norm layer"):
        adapt_batchnorm(nn.Sequential(nn.Conv3d(1, 1, 1)), _batches())


def test_inference_adapts_on_its_input_records_it_and_a_later_run_without_drops_the_record(trained_run, train_cohort, tmp_path):
    """``--adapt_batchnorm True``: the 60 scans of the folder move the statistics, other severities come out, and
    ``batchnorm_adaptation.json`` says so; the same folder again without it: the predictions of the checkpoint as
    stored, and no record left claiming an adaptation."""
    images, out = train_cohort / "images", tmp_path / "out"
    common = dict(dataset_dir=str(images), ckpt_path=str(trained_run / "model.pt"), batch_size=16)
    run_bundle("run", INFER_CONFIG, output_dir=str(tmp_path / "plain"), **common)
    run_bundle("run", INFER_CONFIG, output_dir=str(out), adapt_batchnorm=True, **common)
    record = read_adaptation(out)
    assert record["scans"] == 60 and record["weight"] == 0.75 and record["layers"] > 0
    plain, adapted = pd.read_csv(tmp_path / "plain" / "predictions.csv"), pd.read_csv(out / "predictions.csv")
    assert plain["image"].tolist() == adapted["image"].tolist()
    assert not plain["pred_severity"].equals(adapted["pred_severity"])
    run_bundle("run", INFER_CONFIG, output_dir=str(out), **common)
    assert not (out / ADAPTATION_FILE).exists()
    pd.testing.assert_frame_equal(pd.read_csv(out / "predictions.csv"), plain)


def test_inference_with_too_few_scans_to_adapt_is_one_clear_error_and_writes_no_predictions(trained_run, train_cohort, tmp_path):
    folder = tmp_path / "three"
    folder.mkdir()
    for path in sorted((train_cohort / "images").glob("*.nii.gz"))[:3]:
        shutil.copy(path, folder / path.name)
    error = raised_error(ConfigError, run_bundle, "run", INFER_CONFIG, dataset_dir=str(folder), output_dir=str(tmp_path / "out"),
                         ckpt_path=str(trained_run / "model.pt"), adapt_batchnorm=True)
    assert "at least 20 usable scans" in str(error) and f"{folder} has 3" in str(error)
    assert not (tmp_path / "out" / "predictions.csv").exists()
