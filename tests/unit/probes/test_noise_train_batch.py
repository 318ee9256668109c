"""Pre-training before a noise measurement when the reference batch does not fit: accumulating
micro-batches must reproduce the reference step exactly, never asking for more than fits."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from batchscope.errors import UsageError
from batchscope.probes.noise import estimate_noise_scale
from batchscope.workload import Workload

DATA = torch.randn(512, 6, generator=torch.Generator().manual_seed(3))
TARGET = DATA @ torch.arange(1.0, 7.0) + 0.1


def _sequential_workload(requested: list[int], reduction: str = "mean") -> Workload:
    """Batches are consecutive rows of a fixed dataset, so four micro-batches of 16 are exactly
    the rows of one batch of 64; every requested size is recorded."""
    position = [0]

    def make_batch(batch_size, device, generator):
        requested.append(batch_size)
        rows = torch.arange(position[0], position[0] + batch_size) % DATA.shape[0]
        position[0] += batch_size
        return DATA[rows], TARGET[rows]

    def loss(model, batch):
        errors = (model(batch[0]).squeeze(1) - batch[1]) ** 2
        return errors.mean() if reduction == "mean" else errors.sum()

    return Workload(
        name="sequential", build_model=lambda device: nn.Linear(6, 1).to(device),
        build_optimizer=lambda params, lr: torch.optim.SGD(params, lr=lr),
        loss=loss, make_batch=make_batch, reference_batch_size=64, reference_lr=0.01,
        loss_reduction=reduction,
    )


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_accumulated_pre_training_matches_the_reference_step(reduction):
    results = {}
    for train_batch_size in (None, 16):
        requested: list[int] = []
        workload = _sequential_workload(requested, reduction)
        torch.manual_seed(0)
        model = workload.build_model(torch.device("cpu"))
        # measure at the given model's parameters; its state is restored afterwards, so
        # compare what the probe measured (a function of the trained parameters)
        result = estimate_noise_scale(workload, "cpu", steps=4, micro_batch_size=8,
                                      train_steps=3, train_batch_size=train_batch_size,
                                      model=model, seed=0)
        training_requests = requested[: (3 if train_batch_size is None else 12)]
        assert max(training_requests) == (64 if train_batch_size is None else 16)
        results[train_batch_size] = result
    assert results[16].grad_sq_norm == pytest.approx(results[None].grad_sq_norm, rel=1e-5)
    assert results[16].trace_sigma == pytest.approx(results[None].trace_sigma, rel=1e-5)
    assert any("4 accumulated micro-batches" in note for note in results[16].notes)


def test_bad_train_batch_size_is_a_usage_error():
    workload = _sequential_workload([])
    with pytest.raises(UsageError, match="train_batch_size=0 must be a positive integer"):
        estimate_noise_scale(workload, "cpu", steps=2, train_batch_size=0)
