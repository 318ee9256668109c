"""Accumulated steps: micro-batches whose gradients add up to the whole batch's."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from batchscope.errors import UsageError
from batchscope.step import accumulated_train_step, examples_in, slice_batch, split_sizes, train_step
from batchscope.workload import Workload


def _workload(reduction: str) -> Workload:
    def loss(model: nn.Module, batch: dict) -> torch.Tensor:
        error = (model(batch["x"]) - batch["y"]).pow(2)
        return error.mean() if reduction == "mean" else error.sum()

    return Workload(
        name="linear", build_model=lambda device: nn.Linear(3, 1).to(device),
        build_optimizer=lambda params, lr: torch.optim.SGD(params, lr=lr, momentum=0.9),
        loss=loss, make_batch=lambda b, device, g: None, reference_batch_size=8,
        reference_lr=0.1, loss_reduction=reduction)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_micro_batches_step_exactly_like_the_whole_batch(reduction):
    workload = _workload(reduction)
    generator = torch.Generator().manual_seed(0)
    batch = {"x": torch.randn(10, 3, generator=generator), "y": torch.randn(10, 1, generator=generator),
             "tag": "kept as is"}
    torch.manual_seed(1)
    whole_model = workload.build_model(torch.device("cpu"))
    micro_model = nn.Linear(3, 1)
    micro_model.load_state_dict(whole_model.state_dict())
    whole_opt = workload.build_optimizer(whole_model.parameters(), 0.1)
    micro_opt = workload.build_optimizer(micro_model.parameters(), 0.1)
    for _ in range(3):  # momentum makes later steps depend on the earlier gradients too
        whole_loss = train_step(workload, whole_model, whole_opt, batch, torch.device("cpu"))
        micro_loss = accumulated_train_step(workload, micro_model, micro_opt, batch,
                                            torch.device("cpu"), micro_batch_size=4)
        assert float(micro_loss) == pytest.approx(float(whole_loss), rel=1e-5)
    for mine, theirs in zip(micro_model.parameters(), whole_model.parameters()):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-6)
    assert all(p.grad is None for p in micro_model.parameters())  # dropped after the step


def test_splitting_helpers():
    assert split_sizes(10, 3) == [4, 3, 3] and sum(split_sizes(64, 3)) == 64
    batch = (torch.arange(10), {"y": torch.arange(10) * 2})
    assert examples_in(batch) == 10
    part = slice_batch(batch, 4, 7)
    assert part[0].tolist() == [4, 5, 6] and part[1]["y"].tolist() == [8, 10, 12]
    with pytest.raises(UsageError, match="examples along dim 0"):
        examples_in({"scalar": torch.tensor(1.0)})
