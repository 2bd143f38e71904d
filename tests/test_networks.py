"""DualPathNet's task paths: own last blocks by default, shared with task_blocks=0."""

from __future__ import annotations

import pytest
import torch

from monai_mtl.networks import DualPathNet


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
