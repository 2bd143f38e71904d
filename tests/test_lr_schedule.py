"""The ``lr_schedule`` key: the paper's plateau rule and a cosine decay, as train.json builds them."""

from __future__ import annotations

import json

import pytest
import torch
from monai.bundle import ConfigParser

from conftest import TRAIN_CONFIG
from monai_mtl.errors import ConfigError
from monai_mtl.run_folder import ADDED_SETTINGS, FORMER_GROUPS, FORMER_SETTINGS, differences, flatten


def _parsed(**values):
    """train.json's scheduler, its step input and the early-stop patience, with a stand-in optimizer (no cohort read)."""
    parser = ConfigParser()
    parser.read_config(TRAIN_CONFIG)
    parser.update(pairs=values)
    parser["optimizer"] = "$torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=@learning_rate)"
    return (parser.get_parsed_content("lr_scheduler"), parser.get_parsed_content("validate#named_handlers#lr_schedule#step_transform"),
            parser.get_parsed_content("validate#early_stop#patience"))


class _Engine:
    class state:  # noqa: N801 (an ignite engine's state, as the handler reads it)
        metrics = {"val_loss": 0.25}


def test_plateau_halves_the_rate_on_the_validation_loss_and_stops_early():
    scheduler, step_input, patience = _parsed(lr_schedule="plateau", learning_rate=0.0005, lr_factor=0.5, lr_patience=2,
                                                  early_stop_patience=10)
    assert isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
    assert step_input(_Engine()) == 0.25 and patience == 10
    for _ in range(4):  # no improvement after the first step: halved after lr_patience more
        scheduler.optimizer.step()
        scheduler.step(step_input(_Engine()))
    assert scheduler.optimizer.param_groups[0]["lr"] == pytest.approx(0.0005 * 0.5)


def test_cosine_decays_to_zero_at_max_epochs_and_does_not_stop_early():
    scheduler, step_input, patience = _parsed(lr_schedule="cosine", learning_rate=0.002, max_epochs=30)
    assert step_input(_Engine()) == () and patience > 30
    rates = []
    for _ in range(30):
        scheduler.optimizer.step()
        scheduler.step(*step_input(_Engine()))  # as MONAI's LrScheduleHandler calls it
        rates.append(scheduler.optimizer.param_groups[0]["lr"])
    assert rates[14] == pytest.approx(0.001) and rates[-1] == pytest.approx(0.0, abs=1e-12)
    assert all(a >= b for a, b in zip(rates, rates[1:]))


def test_an_unknown_schedule_is_refused_by_name():
    from monai_mtl.engines import early_stop_patience, lr_scheduler, lr_step_input

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    for call in (lambda: lr_scheduler(optimizer, "step", 30), lambda: lr_step_input("step"),
                 lambda: early_stop_patience(10, "step", 30)):
        with pytest.raises(ConfigError, match=r"lr_schedule must be one of \['plateau', 'cosine'\], got 'step'"):
            call()


def test_a_run_stored_before_the_key_reads_as_plateau():
    config = json.loads(open(TRAIN_CONFIG).read())
    current = flatten({k: config[k] for k in ("lr_schedule", "lr_scheduler", "validate")})
    current = {k: v for k, v in current.items() if k.startswith(("lr_s", "validate#named_handlers#lr_schedule", "validate#early_stop"))}
    current["lr_schedule"] = "plateau"  # the schedule of every run made before the key (train.json's default is cosine)
    (group, key, value), = FORMER_GROUPS
    assert current[key] == value and ADDED_SETTINGS["lr_schedule"] == "plateau"
    stored = {k: v for k, v in current.items() if k not in (key, "lr_schedule")}
    stored.update(group)
    stored.update({k: old for k, (old, new) in FORMER_SETTINGS.items() if k in stored})
    assert differences(stored, current) == []
    assert differences(stored, {**current, "lr_schedule": "cosine"}) == ['lr_schedule: "plateau" -> "cosine"']
