"""Loss weighting choices: each tested for its defining property."""

from __future__ import annotations

import warnings

import pytest
import torch

from monai.bundle import ConfigParser

from conftest import BUNDLE_CONFIGS, TRAIN_CONFIG, run_bundle
from monai_mtl.losses import LOSS_WEIGHTINGS, MultiTaskLoss


def _batch(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    pred = torch.cat([torch.randn(8, 3, generator=generator), torch.rand(8, 1, generator=generator)], dim=1)
    target = {"response": torch.randint(0, 3, (8,), generator=generator), "severity": torch.rand(8, generator=generator)}
    return pred, target


def test_fixed_weighting_is_the_weighted_sum():
    loss = MultiTaskLoss(response_weight=0.6, severity_weight=0.4)
    parts = loss.components(*_batch())
    assert parts["loss"] == pytest.approx(float(0.6 * parts["loss_response"] + 0.4 * parts["loss_severity"]))
    assert list(loss.parameters()) == []


def test_uncertainty_weighting_learns_the_task_log_variances():
    loss = MultiTaskLoss(weighting="uncertainty")
    assert loss.log_variances.tolist() == [0.0, 0.0]
    optimizer = torch.optim.Adam(loss.parameters(), lr=0.1)
    pred, target = _batch()
    parts = loss.components(pred, target)
    s = loss.log_variances.detach()
    expected = (torch.exp(-s[0]) * 0.6 * parts["loss_response"] + s[0] + torch.exp(-s[1]) * 0.4 * parts["loss_severity"] + s[1])
    assert parts["loss"].item() == pytest.approx(expected.item())
    for _ in range(20):
        optimizer.zero_grad()
        loss(pred, target).backward()
        assert loss.log_variances.grad.abs().min() > 0
        optimizer.step()
    # d/ds (e^-s w L + s) = 0 at s = log(w L): a task with a small loss gets a negative log-variance (a large weight)
    optimal = torch.log(torch.stack([0.6 * parts["loss_response"], 0.4 * parts["loss_severity"]])).detach()
    assert (loss.log_variances.detach() - optimal).abs().max() < (optimal.abs().max())
    assert (loss.log_variances.detach() < 0).all()


def test_log_variances_move_in_lockstep_at_the_networks_rate_and_reach_their_balance_with_the_lr_factor():
    """Adam moves each log-variance by about its rate per step until ``s = log(w L)``: at the network's 2e-3 the two
    descend together whatever their losses; ``loss_weighting_lr_factor`` 10 lets each reach its own balance."""
    from monai_mtl.engines import optimizer_parameters

    network = torch.nn.Linear(2, 2)
    losses = torch.tensor([0.005, 0.05])  # the default's response and severity terms at the end of a training
    balance = torch.log(torch.tensor([0.6, 0.4]) * losses)

    def log_variances_after(factor: float, steps: int = 600) -> torch.Tensor:
        loss = MultiTaskLoss(weighting="uncertainty")
        optimizer = torch.optim.Adam(optimizer_parameters(network, loss, 2e-3, factor), lr=2e-3)
        for _ in range(steps):
            optimizer.zero_grad()
            loss.combine(*losses).backward()
            optimizer.step()
        return loss.log_variances.detach()

    lockstep = log_variances_after(1.0)
    assert (lockstep - lockstep[0]).abs().max() < 0.02  # the same path for both (their balances lie 1.9 apart)
    assert lockstep[0] == pytest.approx(-600 * 2e-3, abs=0.05)  # one rate's step per iteration
    torch.testing.assert_close(log_variances_after(10.0), balance, atol=0.05, rtol=0)  # each its own: weights 1 / (w L)
    # one list (the optimizer of runs made before the factor) at 1; the loss's own group at the rate times the factor
    loss = MultiTaskLoss(weighting="uncertainty")
    assert optimizer_parameters(network, loss, 2e-3) == [*network.parameters(), loss.log_variances]
    groups = optimizer_parameters(network, loss, 2e-3, 10.0)
    assert groups[1] == {"params": [loss.log_variances], "lr": pytest.approx(0.02)}
    assert optimizer_parameters(network, MultiTaskLoss(), 2e-3, 10.0) == list(network.parameters())  # fixed: nothing to learn
    with pytest.raises(ValueError, match="loss_weighting_lr_factor must be above 0"):
        optimizer_parameters(network, loss, 2e-3, 0.0)


def test_a_run_stored_before_the_lr_factor_reads_as_factor_1():
    import json

    from monai_mtl.run_folder import ADDED_SETTINGS, differences

    config = json.loads(open(TRAIN_CONFIG).read())
    assert config["loss_weighting_lr_factor"] == ADDED_SETTINGS["loss_weighting_lr_factor"] == 1.0
    current = {"optimizer#params": config["optimizer"]["params"], "loss_weighting_lr_factor": 1.0}
    stored = {"optimizer#params": "$list(@network.parameters()) + list(@loss.parameters())"}
    assert differences(stored, current) == []
    assert differences(stored, {**current, "loss_weighting_lr_factor": 10.0}) == ["loss_weighting_lr_factor: 1.0 -> 10.0"]


def test_the_learned_log_variances_are_logged_each_epoch_without_a_warning():
    from types import SimpleNamespace

    from monai_mtl.handlers import LossWeightingHandler

    loss = MultiTaskLoss(weighting="uncertainty")
    with torch.no_grad():
        loss.log_variances.copy_(torch.tensor([-1.5, -0.5]))
    engine = SimpleNamespace(state=SimpleNamespace(metrics={"train_loss_response": 0.2, "train_loss_severity": 0.1}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch warns when a tensor that requires grad is made a Python float
        LossWeightingHandler(loss)(engine)
    metrics = engine.state.metrics
    assert metrics["loss_log_variance_response"] == pytest.approx(-1.5)
    assert metrics["loss_log_variance_severity"] == pytest.approx(-0.5)


def test_dwa_weights_the_task_whose_loss_falls_slower():
    loss = MultiTaskLoss(weighting="dwa", dwa_temperature=2.0)
    loss.end_epoch(1.0, 1.0)
    assert loss.task_weights.tolist() == [1.0, 1.0]  # two epochs are needed for a rate
    loss.end_epoch(0.9, 0.5)  # the severity loss halved, the response loss barely moved
    expected = 2 * torch.softmax(torch.tensor([0.9, 0.5]) / 2.0, dim=0)
    assert torch.allclose(loss.task_weights, expected) and loss.task_weights.sum() == pytest.approx(2.0)
    assert loss.task_weights[0] > 1.0 > loss.task_weights[1]
    parts = loss.components(*_batch())
    w = loss.task_weights
    assert parts["loss"].item() == pytest.approx((w[0] * 0.6 * parts["loss_response"] + w[1] * 0.4 * parts["loss_severity"]).item())
    state = loss.state_dict()
    resumed = MultiTaskLoss(weighting="dwa")
    resumed.load_state_dict(state)
    assert torch.equal(resumed.task_weights, loss.task_weights) and torch.equal(resumed.epoch_losses, loss.epoch_losses)


def test_unknown_weighting_is_refused():
    with pytest.raises(ValueError, match="loss_weighting must be one of"):
        MultiTaskLoss(weighting="gradnorm")
    assert LOSS_WEIGHTINGS == ("fixed", "uncertainty", "dwa")


@pytest.mark.slow
def test_uncertainty_weighting_trains_in_the_bundle_and_its_state_is_saved(train_cohort, tmp_path):
    out = tmp_path / "run"
    run_bundle("training", TRAIN_CONFIG, dataset_dir=str(train_cohort), output_dir=str(out), max_epochs=1, batch_size=8,
               cache_workers=1, loss_weighting="uncertainty")
    state = torch.load(out / "training_state.pt", weights_only=False)
    assert state["loss"]["log_variances"].abs().min() > 0  # moved from 0 during the epoch
    assert any(group["params"] for group in state["optimizer"]["param_groups"])
    assert state["loss"]["epoch_losses"][0].isfinite().all()  # the handler recorded the epoch's task losses


@pytest.mark.parametrize("recipe, weighting", [
    ((), "uncertainty"),  # the default, chosen by 5-fold CV (docs/experiments.md)
    (("paper.json",), "fixed"),  # the paper's sum
    (("multisite.json",), "fixed"),  # the recipe measured with fixed weights keeps them
    (("multimodal.json",), "uncertainty"),  # chosen over five folds of the multimodal cohort (docs/experiments.md)
])
def test_each_recipe_builds_its_loss_weighting_and_optimizes_its_log_variances(recipe, weighting):
    parser = ConfigParser()
    parser.read_config([TRAIN_CONFIG, *(str(BUNDLE_CONFIGS / name) for name in recipe)])
    parser["device"] = "cpu"
    parser["covariate_encoding"] = None  # the network without reading a cohort's covariates
    loss = parser.get_parsed_content("loss")
    assert loss.weighting == weighting
    # the optimizer gets the learned log-variances beside the network's weights (none with fixed weights)
    optimized = {id(p) for group in parser.get_parsed_content("optimizer").param_groups for p in group["params"]}
    assert {id(p) for p in loss.parameters()} <= optimized
    assert len(list(loss.parameters())) == (1 if weighting == "uncertainty" else 0)


def test_severity_bins_give_the_mean_of_their_distribution_and_the_bins_loss_is_smallest_at_the_soft_label():
    from monai_mtl.errors import ConfigError
    from monai_mtl.networks import DualPathNet
    from monai_mtl.outputs import severity_bin_logits, split_output

    torch.manual_seed(0)
    network = DualPathNet(severity_bins=20).eval()
    output = network(torch.randn(3, 1, 64, 64, 16))
    logits = severity_bin_logits(output)
    assert output.shape == (3, 3 + 1 + 20) and logits.shape == (3, 20)
    centres = (torch.arange(20) + 0.5) / 20
    assert torch.allclose(split_output(output)[1], (torch.softmax(logits, dim=1) * centres).sum(dim=1))
    # stored in the checkpoint's settings only when used; the bin centres are not weights (old checkpoints keep their keys)
    assert network.init_args["severity_bins"] == 20 and "severity_bins" not in DualPathNet().init_args
    assert set(network.state_dict()) - set(DualPathNet().state_dict()) == set()
    assert torch.jit.script(network)(torch.zeros(1, 1, 64, 64, 16)).shape == (1, 24)
    for wrong in (1, -2, 2.5, True):
        with pytest.raises(ConfigError, match="severity_bins must be 0"):
            DualPathNet(severity_bins=wrong)

    # the KL loss: 0 when the bins are the Gaussian soft label around the true severity, more when shifted
    loss = MultiTaskLoss(severity_loss="bins", severity_bin_sigma=0.05)
    true = torch.tensor([0.32, 0.71])
    soft = torch.softmax(-0.5 * ((centres[None] - true[:, None]) / 0.05) ** 2, dim=1)
    response = torch.zeros(2, 3)
    exact = torch.cat([response, (soft * centres).sum(1, keepdim=True), soft.log()], dim=1)
    moved = torch.cat([response, (soft * centres).sum(1, keepdim=True), soft.roll(2, dims=1).log()], dim=1)
    target = {"response": torch.tensor([0, 1]), "severity": true}
    assert loss.components(exact, target)["loss_severity"].abs() < 1e-6
    assert loss.components(moved, target)["loss_severity"] > 0.5
    # gradient steps on the bins' logits alone move the predicted mean to the true severity
    free = torch.zeros(2, 20, requires_grad=True)
    optimizer = torch.optim.SGD([free], lr=5.0)
    for _ in range(200):
        optimizer.zero_grad()
        mean = (torch.softmax(free, dim=1) * centres).sum(1, keepdim=True)
        loss.components(torch.cat([response, mean, free], dim=1), target)["loss_severity"].backward()
        optimizer.step()
    assert torch.allclose((torch.softmax(free, dim=1) * centres).sum(1), true, atol=0.01)
    # a network without bins cannot be trained with the bins loss: one clear error
    with pytest.raises(ConfigError, match="severity_loss 'bins' needs a network with severity bins"):
        loss(torch.cat([response, true[:, None]], dim=1), target)
    with pytest.raises(ConfigError, match="severity_bin_sigma must be above 0"):
        MultiTaskLoss(severity_bin_sigma=0)


@pytest.mark.slow
def test_a_network_with_severity_bins_trains_in_the_bundle_and_its_checkpoint_predicts(train_cohort, tmp_path):
    import json

    from monai_mtl.checkpoints import read_run_metadata
    from monai_mtl.cohort import read_cohort, to_datalist
    from monai_mtl.evaluation import CheckpointPredictor

    out = tmp_path / "run"
    run_bundle("training", TRAIN_CONFIG, dataset_dir=str(train_cohort), output_dir=str(out), max_epochs=1, batch_size=8,
               cache_workers=1, severity_loss="bins", severity_bins=10, severity_bin_sigma=5.0)
    assert read_run_metadata(out / "model.pt")["network"]["severity_bins"] == 10
    settings = json.loads((out / "run_settings.json").read_text())["config"]
    assert settings["severity_bins"] == 10 and settings["severity_bin_sigma"] == 5.0
    predictions = CheckpointPredictor(out / "model.pt").predict(to_datalist(read_cohort(train_cohort).head(4)))
    assert predictions["pred_severity"].between(0, 100).all() and len(predictions) == 4
