"""The exponential moving average of the weights (``ema_momentum``): what is averaged, validated, saved and resumed."""

from __future__ import annotations

import pytest
import torch
from ignite.engine import Engine

from conftest import TRAIN_CONFIG, run_bundle
from monai_mtl.checkpoints import load_state_dict_file
from monai_mtl.errors import ConfigError
from monai_mtl.handlers import PreciseBatchNormHandler, validation_network, weight_average


def test_no_momentum_means_no_average_and_the_network_itself_is_validated():
    network = torch.nn.Linear(2, 1)
    assert weight_average(network, 0.0) is None
    assert validation_network(network, None) is network
    with pytest.raises(ConfigError, match="ema_momentum must be in"):
        weight_average(network, 1.0)


def test_the_average_follows_the_weights_at_the_momentum():
    network = torch.nn.Linear(1, 1, bias=False)
    torch.nn.init.zeros_(network.weight)
    average = weight_average(network, 0.25)

    def step(engine, batch):  # the "optimizer": the weight becomes 1, 2, 3
        with torch.no_grad():
            network.weight += 1.0

    engine = Engine(step)
    average.attach(engine)
    engine.run([0, 1, 2], max_epochs=1)
    expected = 0.0
    for weight in (1.0, 2.0, 3.0):
        expected = 0.75 * expected + 0.25 * weight
    assert validation_network(network, average) is average.ema_model
    assert average.ema_model.weight.item() == pytest.approx(expected)  # 1.1875, not the network's 3
    assert network.weight.item() == 3.0


def test_precise_batch_norm_of_the_average_leaves_the_network_statistics_alone():
    network = torch.nn.Sequential(torch.nn.Conv3d(1, 2, 1), torch.nn.BatchNorm3d(2))
    average = weight_average(network, 0.5)
    batches = [torch.randn(4, 1, 2, 2, 2) + 3.0 for _ in range(3)]

    def step(engine, batch):
        network.train()
        network(batch)

    engine = Engine(step)
    average.attach(engine)
    engine.run(batches, max_epochs=1)
    before = network[1].running_mean.clone()
    engine.network, engine.data_loader, engine.non_blocking, engine.state.device = network, batches, False, "cpu"
    engine.prepare_batch = lambda batch, device, non_blocking: (batch, None)
    PreciseBatchNormHandler(num_batches=3, network=average.ema_model)(engine)
    assert torch.equal(network[1].running_mean, before)  # ignite's default ("copy") would share and overwrite them
    assert not torch.equal(average.ema_model[1].running_mean, before)


def test_precise_batch_norm_draws_its_batches_through_the_prepare_batch_it_is_given():
    """``bn_recalibration_augmented`` false: the statistics of the batches as validation sees them (normalised, no
    draw), not the trainer's augmented ones."""
    from monai_mtl.engines import MultiTaskPrepareBatch
    from monai_mtl.transforms import Preprocessing, TrainingAugmentation

    network = torch.nn.Sequential(torch.nn.Conv3d(1, 1, 1, bias=False), torch.nn.BatchNorm3d(1))
    torch.nn.init.ones_(network[0].weight)
    batches = [{"image": torch.rand(4, 1, 8, 8, 4) * 50 + 100, "response": torch.zeros(4), "severity": torch.zeros(4)}]
    augmentation = TrainingAugmentation("robust", Preprocessing(), scanner={"bias_prob": 1.0, "bias_coeff": [0.5, 0.6]})
    engine = Engine(lambda engine, batch: None)
    engine.network, engine.data_loader, engine.non_blocking, engine.state.device = network, batches, False, "cpu"
    engine.prepare_batch = MultiTaskPrepareBatch(augmentation=augmentation)
    seen = []  # what the handler feeds the network
    network[0].register_forward_hook(lambda module, inputs, output: seen.append(inputs[0].detach().clone()))
    PreciseBatchNormHandler(num_batches=1)(engine)
    PreciseBatchNormHandler(num_batches=1, prepare_batch=MultiTaskPrepareBatch(augmentation=augmentation.clean))(engine)
    augmented, clean = seen
    expected = augmentation.preprocessing.normalize_batch(batches[0]["image"])
    torch.testing.assert_close(clean, expected)  # the normalised scans, nothing drawn
    torch.testing.assert_close(network[1].running_mean, expected.mean().view(1))  # and their statistics recorded
    # the bias field moved the trainer's batches (their z-scored means and variances barely move: compare the voxels)
    assert (augmented - clean).abs().max() > 0.1
    image = batches[0]["image"]  # no draw: exactly the normalisation validation's loader applies, and nothing else
    torch.testing.assert_close(augmentation.clean(image), augmentation.preprocessing.normalize_batch(image), rtol=0, atol=0)
    assert torch.equal(TrainingAugmentation("paper", Preprocessing()).clean(image), image)  # the loader normalised already


def test_precise_batch_norm_averages_more_batches_from_its_final_epoch_on():
    drawn = []

    class Loader:  # records how many batches each recalibration draws
        def __iter__(self):
            drawn.append(0)
            for _ in range(10):
                drawn[-1] += 1
                yield torch.randn(2, 1, 2, 2, 2)

    network = torch.nn.Sequential(torch.nn.Conv3d(1, 1, 1), torch.nn.BatchNorm3d(1))
    engine = Engine(lambda engine, batch: None)
    engine.network, engine.data_loader, engine.non_blocking, engine.state.device = network, Loader(), False, "cpu"
    engine.prepare_batch = lambda batch, device, non_blocking: (batch, None)
    handler = PreciseBatchNormHandler(num_batches=2, final_batches=5, final_from_epoch=3)
    for epoch in (1, 2, 3, 4):
        engine.state.epoch = epoch
        handler(engine)
    assert drawn == [2, 2, 5, 5]  # and no batch beyond the last one averaged
    assert [handler.batches_at(e) for e in (1, 2, 3, 4)] == [2, 2, 5, 5]
    assert PreciseBatchNormHandler(num_batches=2).batches_at(30) == 2  # 0 final batches: never


@pytest.mark.slow
def test_the_bundle_validates_and_saves_the_average_and_resumes_it(train_cohort, tmp_path):
    # plateau: a schedule that does not depend on max_epochs, so a run continued to 2 epochs is the 2-epoch run
    settings = dict(dataset_dir=str(train_cohort), batch_size=8, cache_workers=1, ema_momentum=0.2, lr_schedule="plateau")
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    run_bundle("training", TRAIN_CONFIG, output_dir=str(resumed), max_epochs=1, **settings)
    state = torch.load(resumed / "training_state.pt", weights_only=False)
    saved = load_state_dict_file(resumed / "model.pt")  # the first validation is always the best so far
    weights = [k for k in state["averaged_model"] if k.endswith("weight")]
    assert all(torch.equal(saved[k], state["averaged_model"][k]) for k in weights)  # the average was saved
    assert not any(torch.equal(saved[k], state["model"][k]) for k in weights)  # not the last weights

    run_bundle("training", TRAIN_CONFIG, output_dir=str(resumed), max_epochs=2, **settings)  # continues at epoch 2
    run_bundle("training", TRAIN_CONFIG, output_dir=str(whole), max_epochs=2, **settings)
    state, resumed_state = (torch.load(d / "training_state.pt", weights_only=False) for d in (whole, resumed))
    for key, value in state["averaged_model"].items():
        assert torch.equal(value, resumed_state["averaged_model"][key]), key


def test_a_run_stored_before_the_weight_average_resumes_without_a_difference():
    from monai_mtl.run_folder import ADDED_SETTINGS, FORMER_SETTINGS, differences

    current = {"ema_momentum": 0.0, "validate#evaluator#network": "@validation_network", "learning_rate": 0.0005,
               **{k: v for k, v in ADDED_SETTINGS.items() if k != "ema_momentum"}}
    stored = {"validate#evaluator#network": "@network", "learning_rate": 0.0005}  # what the earlier version wrote
    assert "validate#evaluator#network" in FORMER_SETTINGS
    assert differences(stored, current) == []
    assert differences(stored, {**current, "ema_momentum": 0.01}) == ["ema_momentum: 0.0 -> 0.01"]
    assert differences({**stored, "validate#evaluator#network": "@other"}, current)  # only the former value counts
