"""Accumulated steps: micro-batches whose gradients add up to the whole batch's."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from batchscope.errors import UsageError
from batchscope.step import accumulated_train_step, examples_in, slice_batch, split_sizes, train_step
from batchscope.workload import Workload


def _workload(reduction: str, seen: list[int] | None = None, **changes) -> Workload:
    def loss(model: nn.Module, batch: dict) -> torch.Tensor:
        if seen is not None:
            seen.append(batch["x"].shape[0])
        error = (model(batch["x"]).float() - batch["y"]).pow(2)
        return error.mean() if reduction == "mean" else error.sum()

    return Workload(
        name="linear", build_model=lambda device: nn.Linear(3, 1).to(device),
        build_optimizer=lambda params, lr: torch.optim.SGD(params, lr=lr, momentum=0.9),
        loss=loss, make_batch=lambda b, device, g: None, reference_batch_size=8,
        reference_lr=0.1, loss_reduction=reduction, **changes)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_micro_batches_step_exactly_like_the_whole_batch(reduction):
    seen: list[int] = []
    workload = _workload(reduction, seen)
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
    assert seen == [10, 4, 3, 3] * 3  # each step: the whole batch once, then its three parts
    for mine, theirs in zip(micro_model.parameters(), whole_model.parameters()):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-6)
    assert all(p.grad is None for p in micro_model.parameters())  # dropped after the step


def test_loss_scaling_applies_to_every_micro_batch_and_steps_once():
    # GradScaler with bf16 autocast runs on the CPU: scaled backward per micro-batch, one
    # unscale/step/update per batch, the same parameters as the whole batch in one pass.
    workload = _workload("mean", autocast_dtype=torch.bfloat16)
    batch = {"x": torch.randn(9, 3, generator=torch.Generator().manual_seed(2)),
             "y": torch.randn(9, 1, generator=torch.Generator().manual_seed(3))}
    models = [nn.Linear(3, 1) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    optimizers = [workload.build_optimizer(m.parameters(), 0.1) for m in models]
    # growth_interval=1: every update() doubles the scale, so the count of updates shows.
    scalers = [torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=1) for _ in range(2)]
    cpu = torch.device("cpu")
    train_step(workload, models[0], optimizers[0], batch, cpu, scalers[0])
    accumulated_train_step(workload, models[1], optimizers[1], batch, cpu, 4, scalers[1])
    assert scalers[0].get_scale() == scalers[1].get_scale() == 2048.0  # one update per batch
    for mine, theirs in zip(models[1].parameters(), models[0].parameters()):
        torch.testing.assert_close(mine, theirs, rtol=2e-2, atol=2e-3)  # bf16 forward


@pytest.mark.parametrize(("batch", "fragment"), [
    ({"mask": torch.ones(3, 3), "x": torch.ones(10, 3)}, "do not share a first"),
    ({"x": torch.ones(10, 3), "temperature": torch.tensor(2.0)}, "do not share a first"),
    ({"note": "text only"}, "cannot split a dict batch"),
])
def test_batches_that_cannot_be_split_say_why_in_one_line(batch, fragment):
    with pytest.raises(UsageError, match=fragment) as excinfo:
        examples_in(batch)
    assert "\n" not in str(excinfo.value) and "--micro-batch-size" in str(excinfo.value)


def test_splitting_helpers():
    assert split_sizes(10, 3) == [4, 3, 3] and sum(split_sizes(64, 3)) == 64
    batch = (torch.arange(10), {"y": torch.arange(10) * 2})
    assert examples_in(batch) == 10
    part = slice_batch(batch, 4, 7)
    assert part[0].tolist() == [4, 5, 6] and part[1]["y"].tolist() == [8, 10, 12]
