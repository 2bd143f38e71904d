"""DualPathNet's task paths: own last blocks by default, shared with task_blocks=0; each loss's share of the encoder."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TRAIN_CONFIG

from monai_mtl.networks import DualPathNet
from monai_mtl.run_folder import ADDED_SETTINGS


def test_task_blocks_give_each_path_its_own_last_block():
    net = DualPathNet(task_blocks=1).eval()
    assert len(net.encoder) == 3 and net.response_head.block is not net.severity_head.block
    x = torch.rand(2, 1, 64, 64, 16)
    net(x)[:, 3].sum().backward()  # the severity output reaches the severity block and the shared encoder only
    assert all(p.grad is None or not p.grad.any() for p in net.response_head.parameters())
    assert any(p.grad is not None and p.grad.any() for p in net.severity_head.block.parameters())
    assert any(p.grad is not None and p.grad.any() for p in net.encoder.parameters())
    shared = DualPathNet(task_blocks=0)
    assert len(shared.encoder) == 4 and isinstance(shared.severity_head.block, torch.nn.Identity)
    assert shared(x).shape == net(x).shape == (2, 4)


@pytest.mark.parametrize("task_blocks", [-1, 4])
def test_task_blocks_out_of_range(task_blocks):
    with pytest.raises(ValueError, match="task_blocks"):
        DualPathNet(task_blocks=task_blocks)


def _task_gradients(net: DualPathNet, x: torch.Tensor, task: str) -> tuple[torch.Tensor, torch.Tensor]:
    """One task output's gradient on the first shared conv and on that task head's first linear layer."""
    net.zero_grad()
    output, head = (net(x)[:, :3], net.response_head) if task == "response" else (net(x)[:, 3], net.severity_head)
    output.sum().backward()
    return net.encoder[0][0].weight.grad.clone(), head.mlp[2].weight.grad.clone()


@pytest.mark.parametrize("task", ["response", "severity"])
@pytest.mark.parametrize("scale", [0.0, 0.25])
def test_encoder_gradient_scales_only_the_shared_encoders_share(task, scale):
    x = torch.rand(2, 1, 64, 64, 16)
    torch.manual_seed(0)
    full = DualPathNet().eval()
    torch.manual_seed(0)
    scaled = DualPathNet(**{f"{task}_encoder_gradient": scale}).eval()
    assert torch.equal(full(x), scaled(x))  # the forward pass does not change
    encoder_full, head_full = _task_gradients(full, x, task)
    encoder_scaled, head_scaled = _task_gradients(scaled, x, task)
    assert encoder_full.abs().sum() > 0
    torch.testing.assert_close(encoder_scaled, scale * encoder_full)
    torch.testing.assert_close(head_scaled, head_full)  # the task's own path learns in full
    # the other task's gradient reaches the shared encoder in full
    other = "severity" if task == "response" else "response"
    torch.testing.assert_close(_task_gradients(scaled, x, other)[0], _task_gradients(full, x, other)[0])


@pytest.mark.parametrize("name", ["response_encoder_gradient", "severity_encoder_gradient"])
def test_encoder_gradient_is_stored_only_when_used_and_checked(name):
    from monai_mtl.networks import build_network, network_config

    assert name not in network_config(DualPathNet())  # earlier checkpoints read the same
    config = network_config(DualPathNet(**{name: 0.1}))
    assert config[name] == 0.1
    assert getattr(build_network(config), name) == 0.1
    with pytest.raises(ValueError, match=name):
        DualPathNet(**{name: 1.5})
    torch.jit.script(DualPathNet(**{name: 0.1}).eval())  # the export still scripts it
    # a run stored before the key had the full gradient: resuming or reusing it sees no difference
    assert ADDED_SETTINGS[f"network_def#{name}"] == 1.0 == json.loads(open(TRAIN_CONFIG).read())["network_def"][name]


def test_pooling_choice_is_used_stored_only_when_not_max_and_checked():
    from monai_mtl.networks import build_network, network_config

    assert "pooling" not in network_config(DualPathNet())
    net = DualPathNet(pooling="avg")
    kinds = {type(m).__name__ for m in net.encoder.modules()}
    assert "AvgPool3d" in kinds and "MaxPool3d" not in kinds
    rebuilt = build_network(network_config(net))
    assert network_config(rebuilt)["pooling"] == "avg" and rebuilt(torch.rand(1, 1, 64, 64, 16)).shape == (1, 4)
    with pytest.raises(ValueError, match="pooling must be one of"):
        DualPathNet(pooling="min")


def test_mixed_pooling_spans_max_and_average_and_learns_its_gates():
    from monai_mtl.networks import MixedPool3d, build_network, network_config

    x = torch.randn(2, 3, 4, 4, 2)
    pool = MixedPool3d(3)
    even = 0.5 * torch.nn.functional.max_pool3d(x, 2) + 0.5 * torch.nn.functional.avg_pool3d(x, 2)
    torch.testing.assert_close(pool(x), even)  # the gates start at an even mix
    with torch.no_grad():
        pool.gate.copy_(torch.tensor([30.0, -30.0, 0.0]))
    out = pool(x)
    torch.testing.assert_close(out[:, 0], torch.nn.functional.max_pool3d(x, 2)[:, 0])
    torch.testing.assert_close(out[:, 1], torch.nn.functional.avg_pool3d(x, 2)[:, 1])

    net = DualPathNet(pooling="mixed")
    gates = [m.gate for m in net.modules() if isinstance(m, MixedPool3d)]
    assert len(gates) == 2  # the two middle blocks pool; the stem and the task blocks do not
    net(torch.rand(2, 1, 64, 64, 16)).sum().backward()
    assert all(g.grad is not None and g.grad.abs().sum() > 0 for g in gates)
    rebuilt = build_network(network_config(net))
    assert network_config(rebuilt)["pooling"] == "mixed"
    torch.jit.script(rebuilt.eval())  # the export still scripts it


def test_blur_downsample_removes_what_the_coarser_grid_cannot_hold():
    from monai_mtl.networks import BlurDownsample3d

    # the highest frequency along x (+1, -1, ...): plain subsampling keeps +1 or -1 depending on a one-voxel move;
    # the low-pass removes it, so both moves give the same (zero) interior
    x = torch.ones(1, 2, 8, 6, 4) * torch.tensor([1.0, -1.0] * 4).view(1, 1, 8, 1, 1)
    down = BlurDownsample3d(2, stride=(2, 1, 1))
    assert down(x).shape == (1, 2, 4, 6, 4)
    torch.testing.assert_close(down(x)[:, :, 1:], torch.zeros(1, 2, 3, 6, 4))
    torch.testing.assert_close(down(x.roll(1, dims=2))[:, :, 1:], torch.zeros(1, 2, 3, 6, 4))
    assert x[:, :, ::2].abs().min() == 1  # what a strided layer without it samples
    # a constant passes unchanged, at every stride; stride 1 blurs on the same grid
    torch.testing.assert_close(BlurDownsample3d(3)(torch.full((1, 3, 8, 8, 4), 2.5)), torch.full((1, 3, 4, 4, 2), 2.5))
    assert BlurDownsample3d(3, stride=1, blur=2)(torch.rand(1, 3, 8, 8, 4)).shape == (1, 3, 8, 8, 4)
    assert not dict(BlurDownsample3d(3).state_dict())  # the fixed kernel is not a checkpoint entry


def test_anti_aliased_encoder_keeps_the_grids_is_stored_only_when_used_and_checked():
    from monai_mtl.networks import BlurDownsample3d, build_network, network_config

    assert "anti_alias" not in network_config(DualPathNet())
    assert not any(isinstance(m, BlurDownsample3d) for m in DualPathNet().modules())
    x = torch.rand(2, 1, 64, 64, 16)
    for where, count in (("pool", 2), ("all", 4)):  # the two middle blocks' pooling; and before the two strided convs
        net = DualPathNet(anti_alias=where)
        assert sum(isinstance(m, BlurDownsample3d) for m in net.encoder.modules()) == count
        assert net.encoder(x).shape == DualPathNet().encoder(x).shape  # the same grids: 4 x 4 x 1 at the end
        rebuilt = build_network(network_config(net))
        assert network_config(rebuilt)["anti_alias"] == where
        rebuilt.load_state_dict(net.state_dict())  # a checkpoint of it loads into the network its settings rebuild
        torch.jit.script(net.eval())  # the export still scripts it
    with pytest.raises(ValueError, match="anti_alias is built for pooling 'max'"):
        DualPathNet(anti_alias="pool", pooling="avg")
    with pytest.raises(ValueError, match="anti_alias must be one of"):
        DualPathNet(anti_alias="yes")
