"""The memory probe on a real CPU budget: real steps, real resident memory, real processes.

The workload is a tiny conv net built here (synthetic data, so no dataset is needed). The
module also serves as the entry point the isolated probes' child processes import (by the name
pytest imported it under; the isolated runner hands the parent's sys.path to its children).
"""

from __future__ import annotations

import os
import signal
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from batchscope.errors import ProbeFailedError
from batchscope.probes.memory import probe_memory
from batchscope.workload import Workload

MiB = 2**20
KILL_ABOVE = 40
HERE = __name__  # importable under this name wherever this module was imported


def conv_net() -> nn.Module:
    # 64 channels at 16x16: each example's activations are 64 KiB per saved map.
    return nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.ReLU(), nn.Flatten(),
                         nn.Linear(64 * 16 * 16, 10))


def make_batch(batch_size: int, device: torch.device, generator: torch.Generator) -> Any:
    images = torch.randn(batch_size, 3, 16, 16, generator=generator)
    labels = torch.randint(0, 10, (batch_size,), generator=generator)
    return images.to(device), labels.to(device)


def loss(model: nn.Module, batch: Any) -> torch.Tensor:
    images, labels = batch
    return F.cross_entropy(model(images), labels)


def tiny_conv_workload(**overrides: Any) -> Workload:
    settings: dict[str, Any] = dict(
        name="tiny-conv", build_model=lambda device: conv_net().to(device),
        build_optimizer=lambda params, lr: torch.optim.SGD(params, lr=lr, momentum=0.9),
        loss=loss, make_batch=make_batch, reference_batch_size=32, reference_lr=0.01)
    settings.update(overrides)
    return Workload(**settings)


def killing_workload() -> Workload:
    """Dies like a process the OS OOM killer picked, for any batch above KILL_ABOVE."""

    def deadly_loss(model: nn.Module, batch: Any) -> torch.Tensor:
        if batch[0].shape[0] > KILL_ABOVE:
            os.kill(os.getpid(), signal.SIGKILL)
        return loss(model, batch)

    return tiny_conv_workload(loss=deadly_loss, dataset_size=64)


def broken_workload() -> Workload:
    def buggy_loss(model: nn.Module, batch: Any) -> torch.Tensor:
        raise ValueError("shape mismatch in the user's loss")

    return tiny_conv_workload(loss=buggy_loss)


pytestmark = pytest.mark.usefixtures("frozen_import_objects")


def test_real_cpu_budget_with_a_user_model() -> None:
    budget = 48 * MiB
    model = conv_net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    loss(model, make_batch(4, torch.device("cpu"), torch.Generator().manual_seed(1))).backward()
    optimizer.step()
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    grads = [p.grad.clone() for p in model.parameters()]
    workload = Workload.from_objects(model, optimizer, loss, make_batch, reference_batch_size=32)

    result = probe_memory(workload, device="cpu", memory_budget=budget)

    largest, failure = result.max_batch_size, result.smallest_failure
    assert result.stop_reason == "converged" and failure is not None
    assert any(p.batch_size == largest and p.fits and p.peak_bytes <= budget
               for p in result.probes)
    assert any(p.batch_size == failure and not p.fits for p in result.probes)
    assert failure - largest <= max(1, 0.02 * largest)
    # Real memory: each example keeps at least its conv output and ReLU output (2 x 64 KiB)
    # for backward, and the whole step for a few hundred examples stays within the budget.
    assert 128 * 1024 <= result.bytes_per_sample <= 2 * MiB
    assert 20 <= largest <= 400
    assert result.recommended_batch_size <= 0.9 * largest

    # The recommendation, measured again from scratch, fits with room to spare.
    again = probe_memory(workload, device="cpu", memory_budget=budget,
                         max_batch_size=result.recommended_batch_size,
                         start_batch_size=result.recommended_batch_size)
    assert [p.batch_size for p in again.probes] == [result.recommended_batch_size]
    assert again.probes[0].fits and again.probes[0].peak_bytes <= budget

    # The user's model and optimizer, trained in place by the probes, are bit-identical.
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))
    assert not model.training
    assert all(len(optimizer.state[p]) == 1 for p in model.parameters())


def wide_net() -> nn.Module:
    # 16 MiB of weights and next to no activations: its memory is the model's.
    return nn.Sequential(nn.Linear(2048, 2048), nn.ReLU(), nn.Linear(2048, 10))


def wide_batch(batch_size: int, device: torch.device, generator: torch.Generator) -> Any:
    return (torch.randn(batch_size, 2048, generator=generator).to(device),
            torch.randint(0, 10, (batch_size,), generator=generator).to(device))


def test_a_users_model_counts_like_one_the_workload_builds() -> None:
    model = wide_net()
    user_workload = Workload.from_objects(
        model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9), loss, wide_batch,
        reference_batch_size=16)
    built_workload = tiny_conv_workload(build_model=lambda device: wide_net().to(device),
                                        make_batch=wide_batch, reference_batch_size=16)
    readings = [probe_memory(job, device="cpu", memory_budget="1GiB", start_batch_size=16,
                             max_batch_size=16).probes[0].peak_bytes
                for job in (user_workload, built_workload)]
    # Weights, gradients and momentum: 3 x 16 MiB, whoever built the model. The user's model
    # was resident before the probe began, and used to be left out (~32 MiB read).
    assert all(p is not None and p >= 48 * MiB for p in readings), readings
    assert abs(readings[0] - readings[1]) <= 4 * MiB, readings


def test_a_workload_error_before_the_first_probe_leaves_no_window_open() -> None:
    with pytest.raises(ValueError, match="shape mismatch"):
        probe_memory(broken_workload(), device="cpu", memory_budget="1GiB")
    # The window and its claim were given back: a second measurement may start.
    assert probe_memory(tiny_conv_workload(), device="cpu", memory_budget="1GiB",
                        start_batch_size=8, max_batch_size=8).max_batch_size == 8


@pytest.mark.slow
def test_isolated_probes_survive_the_oom_killer() -> None:
    # Two child processes (each pays torch's import): 33 fits; the safe jump is capped at the
    # dataset (64), whose process the "OOM killer" takes. A loose tolerance ends it there: this
    # tests the isolation, test_memory_search tests the search.
    result = probe_memory(f"{HERE}:killing_workload", device="cpu",
                          memory_budget="1GiB", isolate=True, tolerance=0.99,
                          start_batch_size=33)
    assert [p.batch_size for p in result.probes] == [33, 64]
    assert [p.fits for p in result.probes] == [True, False]
    assert result.max_batch_size == 33 and result.smallest_failure == 64
    for probe in result.probes:
        if probe.fits:  # measured in the child, against the child's own baseline
            assert 0 < probe.peak_bytes < 1024 * MiB and probe.steps == 2
        else:
            assert probe.peak_bytes is None and "SIGKILL" in probe.reason


@pytest.mark.slow
def test_an_isolated_probe_reports_the_users_error() -> None:
    with pytest.raises(ProbeFailedError, match="ValueError: shape mismatch in the user's loss"):
        probe_memory(f"{HERE}:broken_workload", device="cpu", memory_budget="1GiB",
                     isolate=True)
