"""`probe_memory` end to end on fake memory: real training steps of a tiny model, but peak
memory (and OOMs) from a fake allocator with a known curve, so every answer is exact."""

from __future__ import annotations

import json
import math
import random
import weakref
from typing import Any, Callable

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from batchscope.errors import ProbeFailedError, UsageError
from batchscope.oom import Outcome
from batchscope.probes.memory import (
    MemoryProbeResult,
    probe_memory,
    recommended_batch_size,
)
from batchscope.probes.memory_runner import ProbePlan, judge
from batchscope.workload import Workload

MiB = 2**20
GiB = 2**30
BUDGET = 2 * GiB

# What the CUDA caching allocator says (torch 2.x), so the probe's OOM recognition is exercised
# on the real wording rather than on a made-up one.
CUDA_OOM = (
    "CUDA out of memory. Tried to allocate {need:.2f} MiB. GPU 0 has a total capacity of "
    "79.19 GiB of which 312.00 MiB is free. Including non-PyTorch memory, this process has "
    "78.87 GiB memory in use. Of the allocated memory 77.60 GiB is allocated by PyTorch, and "
    "612.35 MiB is reserved by PyTorch but unallocated. If reserved but unallocated memory is "
    "large try setting PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True to avoid "
    "fragmentation.  See documentation for Memory Management  "
    "(https://pytorch.org/docs/stable/notes/cuda.html#environment-variables)"
)

Curve = Callable[[int, bool], float]


pytestmark = pytest.mark.usefixtures("frozen_import_objects")


def affine(fixed_mib: float, per_sample_mib: float) -> Curve:
    return lambda batch_size, training: (fixed_mib + per_sample_mib * batch_size) * MiB


class FakeDevice:
    """A fake allocator that is also the probe's MemoryMeter.

    Each forward pass "needs" `curve(batch_size, training)` bytes. Above `capacity` it raises
    torch.OutOfMemoryError, in the forward pass or (oom_in="backward") from a backward hook,
    optionally only from the `oom_from_step`-th training step of a probe on. Every forward also
    checks that nothing from earlier steps survived: activations and gradients.
    """

    def __init__(self, curve: Curve, capacity: float | None = None, *,
                 oom_in: str = "forward", oom_from_step: int = 1) -> None:
        self.curve, self.capacity = curve, capacity
        self.oom_in, self.oom_from_step = oom_in, oom_from_step
        self.peak = 0
        self.calls: list[tuple[int, bool]] = []
        self.activations: list[weakref.ref] = []
        self.leaks: list[str] = []
        self.training_steps_in_probe = 0

    # MemoryMeter
    def reset(self) -> None:
        self.peak = 0
        self.training_steps_in_probe = 0

    def peak_bytes(self) -> int:
        return int(self.peak)

    def forward(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        batch_size, training = x.shape[0], torch.is_grad_enabled() and model.training
        if any(ref() is not None for ref in self.activations):
            self.leaks.append(f"activation alive at forward of batch {batch_size}")
        if any(p.grad is not None for p in model.parameters()):
            self.leaks.append(f"gradient alive at forward of batch {batch_size}")
        self.calls.append((batch_size, training))
        activation = x.repeat(1, 64)  # a real tensor in the graph, as activations are
        self.activations.append(weakref.ref(activation))
        out = model(x) + 0.0 * activation.mean()
        need = self.curve(batch_size, training)
        if training:
            self.training_steps_in_probe += 1
        if (self.capacity is not None and need > self.capacity
                and self.training_steps_in_probe >= self.oom_from_step):
            error = torch.OutOfMemoryError(CUDA_OOM.format(need=need / MiB))
            if self.oom_in == "forward" or not training:
                raise error

            def fail_in_backward(grad: torch.Tensor) -> torch.Tensor:
                raise error

            out.register_hook(fail_in_backward)
        self.peak = max(self.peak, need)
        return out


def fake_workload(fake: FakeDevice, **overrides: Any) -> Workload:
    def build_model(device: torch.device) -> nn.Module:
        return nn.Linear(4, 3).to(device)

    def make_batch(batch_size: int, device: torch.device, generator: torch.Generator) -> Any:
        x = torch.randn(batch_size, 4, generator=generator)
        return x.to(device), torch.randint(0, 3, (batch_size,), generator=generator).to(device)

    def loss(model: nn.Module, batch: Any) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(fake.forward(model, x), y)

    settings = dict(name="fake", build_model=build_model,
                    build_optimizer=lambda p, lr: torch.optim.SGD(p, lr=lr, momentum=0.9),
                    loss=loss, make_batch=make_batch, reference_batch_size=32, reference_lr=0.01)
    settings.update(overrides)
    return Workload(**settings)


def probe(fake: FakeDevice, **kwargs: Any) -> MemoryProbeResult:
    workload = kwargs.pop("workload", None) or fake_workload(fake)
    kwargs.setdefault("memory_budget", BUDGET)
    return probe_memory(workload, device="cpu", meter=fake, **kwargs)


def sizes(result: MemoryProbeResult) -> list[int]:
    return [p.batch_size for p in result.probes]


# -- exact answers ----------------------------------------------------------------------------


def test_affine_memory_exact_probes_and_result() -> None:
    # 100 MiB + 0.5 MiB/sample under 2 GiB: true limit 3896 (see test_memory_search).
    fake = FakeDevice(affine(100, 0.5))
    result = probe(fake)
    assert sizes(result) == [8, 157, 3857, 3934]
    assert [p.fits for p in result.probes] == [True, True, True, False]
    assert [p.steps for p in result.probes] == [2, 2, 2, 2]
    assert result.probes[-1].reason.startswith("over budget: peak 2.02 GiB > 2.00 GiB")
    assert result.max_batch_size == 3857
    assert result.smallest_failure == 3934
    assert result.recommended_batch_size == 3464  # floor(3857 * 0.9) = 3471 -> multiple of 8
    assert result.fixed_bytes == pytest.approx(100 * MiB)
    assert result.bytes_per_sample == pytest.approx(0.5 * MiB)
    assert result.capped_by is None and result.stop_reason == "converged"
    assert result.budget_bytes == BUDGET and result.device == "cpu"
    assert not fake.leaks
    # Two training steps per probe, each at the probed size (after one warm-up step at 2).
    assert fake.calls[0] == (2, True)
    assert fake.calls[1:] == [(b, True) for b in sizes(result) for _ in range(2)]


def test_oom_above_capacity_real_cuda_wording() -> None:
    fake = FakeDevice(affine(100, 0.5), capacity=affine(100, 0.5)(2500, True))
    result = probe(fake)
    ooms = [p for p in result.probes if not p.fits]
    assert ooms and all(p.reason.startswith("out of memory: OutOfMemoryError: CUDA out of memory.")
                        for p in ooms)
    assert all(p.peak_bytes is None and p.steps == 0 for p in ooms)
    assert result.max_batch_size <= 2500 < result.smallest_failure
    assert result.smallest_failure - result.max_batch_size <= 0.02 * result.max_batch_size
    assert not fake.leaks


@pytest.mark.parametrize("oom_in", ["forward", "backward"])
def test_after_an_oom_the_next_smaller_probe_fits_and_nothing_leaks(oom_in: str) -> None:
    fake = FakeDevice(affine(100, 0.5), capacity=affine(100, 0.5)(1000, True), oom_in=oom_in)
    result = probe(fake)
    pairs = list(zip(result.probes, result.probes[1:]))
    assert any(not a.fits and b.fits and b.batch_size < a.batch_size for a, b in pairs)
    assert result.max_batch_size <= 1000 < result.smallest_failure
    # Every forward saw no activation and no gradient left from an earlier step or probe.
    assert not fake.leaks
    assert all(ref() is None for ref in fake.activations)


def test_oom_in_the_second_step_is_not_a_fit() -> None:
    # The first step allocates optimizer state; the second is the one that runs out.
    fake = FakeDevice(affine(100, 0.5), capacity=affine(100, 0.5)(1000, True), oom_from_step=2)
    result = probe(fake)
    ooms = [p for p in result.probes if not p.fits]
    assert ooms and all(p.steps == 1 for p in ooms)
    assert result.max_batch_size <= 1000 < result.smallest_failure


def test_a_run_with_missing_steps_is_a_failure() -> None:
    plan = ProbePlan(budget_bytes=BUDGET, steps=2)
    no_steps = judge(64, Outcome(value=10, oom=False), completed=0, seconds=0.1, plan=plan)
    assert not no_steps.fits and no_steps.reason == "only 0 of 2 steps ran"
    one_step = judge(64, Outcome(value=10, oom=False), completed=1, seconds=0.1, plan=plan)
    assert not one_step.fits
    assert judge(64, Outcome(value=10, oom=False), completed=2, seconds=0.1, plan=plan).fits


def test_not_even_batch_one_fits() -> None:
    fake = FakeDevice(affine(2047.9, 1.0))
    expected = "not even batch size 1 fits in the budget of 2.00 GiB"
    with pytest.raises(ProbeFailedError, match=expected):
        probe(fake)


def test_evaluation_pass_counts() -> None:
    # Evaluation at 8x the batch needs 0.25 MiB per eval example = 2 MiB per training example,
    # which binds before training's 0.5 MiB: the limit becomes (2048 - 100) / 2 = 974.
    def curve(batch_size: int, training: bool) -> float:
        return (100 + (0.5 if training else 0.25) * batch_size) * MiB

    fake = FakeDevice(curve)
    result = probe(fake, eval_batch_factor=8)
    assert result.max_batch_size <= 974 < result.smallest_failure
    assert result.smallest_failure - result.max_batch_size <= 0.02 * result.max_batch_size
    evals = [b for b, training in fake.calls if not training]
    assert evals == [8 * b for b in sizes(result)]


# -- bounds -----------------------------------------------------------------------------------


def test_user_max_batch_size_is_said() -> None:
    result = probe(FakeDevice(affine(100, 0.5)), max_batch_size=500)
    assert result.max_batch_size == 500 and max(sizes(result)) == 500
    assert result.capped_by == "user max_batch_size"
    assert "user max_batch_size" in result.note and "larger batches may fit" in result.note


def test_a_callers_bound_is_named_as_the_caller_says() -> None:
    fake = FakeDevice(affine(100, 0.5))
    result = probe(fake, workload=fake_workload(fake, dataset_size=5000), max_batch_size=500,
                   max_batch_size_reason="batch giving 10 steps an epoch")
    assert result.max_batch_size == 500 and result.capped_by == "batch giving 10 steps an epoch"
    assert "stopped at the batch giving 10 steps an epoch (500)" in result.note


def test_a_bound_far_from_the_memory_edge_is_recommended_as_it_is() -> None:
    # 500 samples peak at 350 MiB of 2 GiB: the margin would guard an edge nowhere near.
    result = probe(FakeDevice(affine(100, 0.5)), max_batch_size=500)
    assert result.recommended_batch_size == 500 and result.recommended_is_bound
    assert "Recommended: 500, the bound itself" in result.note


def test_a_bound_of_one_near_the_edge_is_not_called_the_bound_itself() -> None:
    # 1 minus any margin is still 1, but its peak (1900 MiB of 2 GiB) is inside the margin.
    result = probe(FakeDevice(affine(1899.5, 0.5)), max_batch_size=1, start_batch_size=1)
    assert result.recommended_batch_size == 1 and not result.recommended_is_bound
    assert "the bound itself" not in result.note and "minus the 10% margin" in result.note


def test_a_bound_near_the_memory_edge_keeps_the_margin() -> None:
    # 3800 samples peak at 2000 MiB, inside the last 10% of 2 GiB: 3800 * 0.9 = 3420 -> 3416.
    result = probe(FakeDevice(affine(100, 0.5)), max_batch_size=3800)
    assert result.capped_by == "user max_batch_size" and result.max_batch_size == 3800
    assert result.recommended_batch_size == 3416 and not result.recommended_is_bound
    assert "3800 minus the 10% margin" in result.note


def test_dataset_size_is_said() -> None:
    fake = FakeDevice(affine(100, 0.5))
    result = probe(fake, workload=fake_workload(fake, dataset_size=300))
    assert result.max_batch_size == 300 and result.capped_by == "dataset size"


def test_the_users_bound_is_named_when_both_agree() -> None:
    fake = FakeDevice(affine(100, 0.5))
    result = probe(fake, workload=fake_workload(fake, dataset_size=300), max_batch_size=300)
    assert result.capped_by == "user max_batch_size"


def test_limit_below_the_bound_is_not_capped() -> None:
    fake = FakeDevice(affine(100, 0.5))
    result = probe(fake, workload=fake_workload(fake, dataset_size=50_000))
    assert result.max_batch_size == 3857 and result.capped_by is None


# -- user state -------------------------------------------------------------------------------


def test_user_model_optimizer_and_rngs_are_left_untouched() -> None:
    fake = FakeDevice(affine(100, 0.5))
    model = nn.Linear(4, 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9)
    model(torch.randn(5, 4)).sum().backward()
    optimizer.step()  # momentum buffers exist
    model(torch.randn(5, 4)).sum().backward()  # and gradients are pending
    model.eval()
    params = {k: v.clone() for k, v in model.state_dict().items()}
    grads = [p.grad.clone() for p in model.parameters()]
    momentum = [optimizer.state[p]["momentum_buffer"].clone() for p in model.parameters()]
    random.seed(7)
    np.random.seed(7)
    torch.manual_seed(7)
    rng = (random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state().clone())

    workload = Workload.from_objects(model, optimizer, fake_workload(fake).loss,
                                     fake_workload(fake).make_batch, reference_batch_size=32)
    result = probe(fake, workload=workload)

    assert result.max_batch_size == 3857  # the user's model itself was trained in the probes
    assert all(torch.equal(v, params[k]) for k, v in model.state_dict().items())
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))
    assert [torch.equal(optimizer.state[p]["momentum_buffer"], m)
            for p, m in zip(model.parameters(), momentum)] == [True, True]
    assert optimizer.param_groups[0]["lr"] == 0.3
    assert not model.training
    assert random.getstate() == rng[0]
    assert np.array_equal(np.random.get_state()[1], rng[1])
    assert torch.equal(torch.get_rng_state(), rng[2])


def test_user_objects_restored_when_the_workload_raises() -> None:
    fake = FakeDevice(affine(100, 0.5))
    model = nn.Linear(4, 3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calls = {"n": 0}

    def broken_loss(m: nn.Module, batch: Any) -> torch.Tensor:
        calls["n"] += 1
        if calls["n"] > 3:
            raise ValueError("a bug in the user's loss")
        return F.cross_entropy(m(batch[0]), batch[1])

    workload = Workload.from_objects(model, torch.optim.SGD(model.parameters(), lr=0.1),
                                     broken_loss, fake_workload(fake).make_batch,
                                     reference_batch_size=32)
    with pytest.raises(ValueError, match="a bug in the user's loss"):
        probe(fake, workload=workload)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


# -- the result and the inputs ----------------------------------------------------------------


def test_result_json() -> None:
    result = probe(FakeDevice(affine(100, 0.5)))
    data = json.loads(json.dumps(result.to_dict(), allow_nan=False))
    for key in ("max_batch_size", "recommended_batch_size", "bytes_per_sample", "fixed_bytes",
                "probes", "seconds", "budget_bytes", "capped_by", "note"):
        assert key in data
    assert [p["batch_size"] for p in data["probes"]] == [8, 157, 3857, 3934]
    assert set(data["probes"][0]) >= {"batch_size", "peak_bytes", "fits", "seconds", "reason"}
    assert result.predicted_peak_bytes(1000) == pytest.approx(600 * MiB)


@pytest.mark.parametrize(
    ("largest", "margin", "expected"),
    [(3857, 0.1, 3464), (100, 0.1, 88), (71, 0.1, 63), (72, 0.1, 64), (50, 0.1, 45),
     (10, 0.5, 5), (1, 0.1, 1), (70, 0.0, 64), (63, 0.0, 63), (2, 0.9, 1)],
)
def test_recommended_batch_size(largest: int, margin: float, expected: int) -> None:
    assert recommended_batch_size(largest, margin) == expected
    assert recommended_batch_size(largest, margin) <= largest


def test_cpu_needs_a_budget() -> None:
    fake = FakeDevice(affine(100, 0.5))
    with pytest.raises(UsageError, match="--memory-budget"):
        probe_memory(fake_workload(fake), device="cpu")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"margin": 1.0}, "margin"), ({"margin": -0.1}, "margin"), ({"tolerance": 0}, "tolerance"),
     ({"steps": 1}, "optimizer state"), ({"max_batch_size": 0}, "max_batch_size"),
     ({"start_batch_size": 0}, "start_batch_size"), ({"eval_batch_factor": 0}, "eval_batch"),
     ({"isolate": True}, "entry point"), ({"memory_budget": "lots"}, "not a size"),
     ({"eval_batch_factor": float("inf")}, "eval_batch_factor=inf must be a positive finite"),
     ({"max_probes": True}, "max_probes=True must be a positive integer"),
     ({"steps": 2.0}, r"steps=2\.0 must be an integer >= 2 \(the first step")],
)
def test_bad_arguments(kwargs: dict, match: str) -> None:
    fake = FakeDevice(affine(100, 0.5))
    with pytest.raises(UsageError, match=match):
        probe(fake, **kwargs)
    assert not fake.calls  # refused before anything ran


def test_numpy_integer_arguments_are_accepted_as_plain_ints() -> None:
    # Sizes often come from numpy (np.arange, a sweep grid); the result must still be JSON.
    fake = FakeDevice(affine(100, 0.5))
    result = probe(fake, max_batch_size=np.int64(100), start_batch_size=np.int64(8),
                   steps=np.int32(2), max_probes=np.int64(30))
    assert result.max_batch_size == 100 and type(result.max_batch_size) is int
    assert result.capped_by == "user max_batch_size"
    json.dumps(result.to_dict())


def test_a_custom_meter_leaves_the_device_peak_counters_alone(monkeypatch) -> None:
    # Opening a CPU peak window changes glibc's malloc settings; a caller-supplied meter
    # means batchscope's own device meter is never built, so no window is opened.
    from batchscope import device as devices

    opened: list[torch.device] = []
    monkeypatch.setattr(devices, "reset_peak_memory", opened.append)
    probe(FakeDevice(affine(100, 0.5)))
    assert opened == []


def test_the_default_cpu_meter_opens_a_window_before_the_model_is_built(monkeypatch) -> None:
    # The window fixes glibc's mmap threshold; model and warm-up allocations must already be
    # made under it, or their freed memory would stay in the heap and skew the baseline.
    from batchscope import device as devices
    from batchscope.probes.memory_runner import InProcessRunner

    events: list[str] = []
    monkeypatch.setattr(devices, "reset_peak_memory", lambda device: events.append("window"))

    def build_model(device: torch.device) -> nn.Module:
        events.append("build")
        return nn.Linear(4, 3)

    workload = fake_workload(FakeDevice(affine(100, 0.5)), build_model=build_model)
    runner = InProcessRunner(workload, torch.device("cpu"), ProbePlan(budget_bytes=BUDGET),
                             guard=None)
    runner.close()
    assert events == ["window", "build"]


def test_tolerance_controls_the_bracket() -> None:
    fake = FakeDevice(affine(100, 0.5), capacity=affine(100, 0.5)(2500, True))
    result = probe(fake, tolerance=0.2)
    assert result.max_batch_size <= 2500 < result.smallest_failure
    gap = result.smallest_failure - result.max_batch_size
    assert gap <= math.floor(0.2 * result.max_batch_size)


def test_time_budget_answers_with_the_largest_verified_fit_so_far() -> None:
    # A zero budget stops after the second probe (the first, at the start size, says nothing
    # about the limit): the answer is the largest verified size, and the result says the
    # search ended on time rather than converging.
    fake = FakeDevice(affine(100, 0.5))
    result = probe(fake, time_budget_s=0.0)
    assert sizes(result) == [8, 157]
    assert [p.fits for p in result.probes] == [True, True]
    assert result.max_batch_size == 157
    assert result.stop_reason == "time budget"
    assert "time budget ran out" in result.note
