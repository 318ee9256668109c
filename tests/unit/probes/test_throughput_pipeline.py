"""The throughput probe's input-pipeline check: device-resident batches against the workload's own
data path, on workloads whose compute and loading times are known (throughput_fakes.py)."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from batchscope.errors import UsageError
from batchscope.probes.throughput import _pipeline_plan, check_data_path, measure_throughput

sys.path.insert(0, str(Path(__file__).parent))  # the fakes live beside this file
from throughput_fakes import (  # noqa: E402
    SimulatedClock,
    TimedLoss,
    simulated,
    timed_loader,
    timed_workload,
    wait,
)


def test_a_slow_data_loader_is_flagged_with_its_numbers():
    compute, loading = 0.01, 0.03
    clock = SimulatedClock()
    workload = timed_workload(TimedLoss(compute, 0.0, clock),
                              data_loader=timed_loader(loading, clock))
    result = measure_throughput(workload, device="cpu", batch_sizes=[32], warmup_steps=1,
                                timed_steps=5, clock=clock)
    pipeline = result.to_dict()["input_pipeline"]
    assert pipeline["measured"] is True
    assert pipeline["batch_size"] == 32
    assert pipeline["bottleneck"] is True
    assert pipeline["compute_samples_per_s"] == pytest.approx(32 / compute)
    assert pipeline["pipeline_samples_per_s"] == pytest.approx(32 / (compute + loading))
    assert pipeline["data_s"] == pytest.approx(loading)
    assert pipeline["data_wait_fraction"] == pytest.approx(loading / (compute + loading))
    assert pipeline["loader_share"] == pytest.approx(loading / (compute + loading))
    assert "caps throughput" in pipeline["note"] and "batch size 32" in pipeline["note"]
    assert "800.0 samples/s against 3200.0" in pipeline["note"]


def test_a_slow_data_loader_is_flagged_with_real_sleeps():
    # Loading takes 3x the compute: flagged however loaded the machine is (exact numbers are
    # checked on the simulated clock above).
    compute, loading = 0.02, 0.06
    workload = timed_workload(TimedLoss(compute, 0.0), data_loader=timed_loader(loading))
    result = measure_throughput(workload, device="cpu", batch_sizes=[32], warmup_steps=1,
                                timed_steps=3)
    (check,) = result.input_pipeline.checks
    assert check.bottleneck
    assert check.data_s >= loading
    assert check.pipeline_samples_per_s < check.compute_samples_per_s


@pytest.mark.parametrize(("loading", "bottleneck"), [(0.0, False), (0.001, False),
                                                     (0.0012, True)])
def test_bottleneck_threshold_is_ninety_percent_of_compute(loading, bottleneck):
    # 10 ms of compute: 1 ms of loading leaves 91% of the throughput, 1.2 ms leaves 89%.
    clock = SimulatedClock()
    workload = timed_workload(TimedLoss(0.01, 0.0, clock), data_loader=timed_loader(loading, clock))
    result = measure_throughput(workload, device="cpu", batch_sizes=[8, 16], warmup_steps=1,
                                timed_steps=3, clock=clock)
    pipeline = result.input_pipeline
    # Constant step time: the knee (16 at fraction 0.95) is also the best; checked once.
    assert [check.batch_size for check in pipeline.checks] == [16]
    assert pipeline.bottleneck is bottleneck
    assert pipeline.note.startswith("the input pipeline caps" if bottleneck
                                    else "the input pipeline keeps up")


def test_a_data_loader_that_yields_nothing_is_a_usage_error():
    clock = SimulatedClock()
    workload = timed_workload(TimedLoss(0.001, 0.0, clock), data_loader=lambda b, device: iter(()))
    with pytest.raises(UsageError, match="data_loader yielded no batches"):
        measure_throughput(workload, device="cpu", batch_sizes=[8], warmup_steps=1,
                           timed_steps=3, clock=clock)


def test_no_data_loader_is_reported_as_not_measured():
    clock, workload = simulated(0.001, 0.0)
    result = measure_throughput(workload, device="cpu", batch_sizes=[8], warmup_steps=1,
                                timed_steps=3, clock=clock)
    pipeline = result.to_dict()["input_pipeline"]
    assert pipeline["measured"] is False and pipeline["bottleneck"] is None
    assert "no data_loader" in pipeline["note"]


def test_within_a_time_budget_only_the_knee_is_checked():
    # Step time 1 ms + 1 ms per example: 889, 941, 970, 985 samples/s at 8, 16, 32, 64, so the
    # knee (95% of the best) is 16 and the best is 64. The budget (60 s of a simulated clock)
    # stops nothing, but limits the pipeline check to the knee.
    clock = SimulatedClock()
    workload = timed_workload(TimedLoss(0.001, 0.001, clock),
                              data_loader=timed_loader(0.0, clock))
    unbounded = measure_throughput(workload, device="cpu", batch_sizes=[8, 16, 32, 64],
                                   warmup_steps=1, timed_steps=3, clock=clock)
    bounded = measure_throughput(workload, device="cpu", batch_sizes=[8, 16, 32, 64],
                                 warmup_steps=1, timed_steps=3, clock=clock, time_budget_s=60)
    knee, best = unbounded.knee_batch_size, unbounded.best_batch_size
    assert (knee, best) == (16, 64)
    assert [c.batch_size for c in unbounded.input_pipeline.checks] == [knee, best]
    assert [c.batch_size for c in bounded.input_pipeline.checks] == [knee]


# -- the plan: which sizes, how long -----------------------------------------------------------

CURVE = SimpleNamespace(knee_batch_size=1024, best_batch_size=8192)
TIMING = {"warmup_steps": 2, "timed_steps": 10, "max_seconds": 30.0}


def test_without_a_deadline_both_sizes_with_the_probes_own_timing():
    sizes, timing = _pipeline_plan(CURVE, TIMING, None, lambda: 0.0)
    assert sizes == [1024, 8192] and timing is TIMING


def test_with_a_deadline_the_knee_only_and_half_of_what_is_left():
    sizes, timing = _pipeline_plan(CURVE, TIMING, 110.0, lambda: 100.0)
    assert sizes == [1024]
    assert timing == {**TIMING, "max_seconds": 5.0}  # 10 s left -> 5 s for each path
    # The probe's own cap still wins when it is smaller.
    _, timing = _pipeline_plan(CURVE, {**TIMING, "max_seconds": 3.0}, 110.0, lambda: 100.0)
    assert timing["max_seconds"] == 3.0
    _, timing = _pipeline_plan(CURVE, {**TIMING, "max_seconds": None}, 110.0, lambda: 100.0)
    assert timing["max_seconds"] == 5.0


def test_a_spent_budget_still_gets_one_second_per_path():
    sizes, timing = _pipeline_plan(CURVE, TIMING, 90.0, lambda: 100.0)
    assert sizes == [1024] and timing["max_seconds"] == 1.0


def test_the_check_alone_at_one_batch_gives_the_known_rates():
    # What tune runs at the batch it recommends: 10 ms of compute, 30 ms to load a batch.
    clock = SimulatedClock()
    workload = timed_workload(TimedLoss(0.01, 0.0, clock), data_loader=timed_loader(0.03, clock))
    result = check_data_path(workload, 24, device="cpu", warmup_steps=1, timed_steps=5,
                             clock=clock)
    (check,) = result.checks
    assert check.batch_size == 24 and check.bottleneck
    assert check.compute_samples_per_s == pytest.approx(24 / 0.01)
    assert check.pipeline_samples_per_s == pytest.approx(24 / 0.04)
    assert "batch size 24" in result.note


def test_the_check_alone_needs_a_loader_and_a_batch_size():
    clock, workload = simulated(0.01, 0.0)
    assert check_data_path(workload, 8, device="cpu").note.startswith("not measured: the "
                                                                      "workload has no data_loader")
    with pytest.raises(UsageError, match="batch_size=0"):
        check_data_path(workload, 0, device="cpu")


class DriftingLoss(TimedLoss):
    """A step that gets 5% slower with every call, like a host growing busier during the check."""

    def __call__(self, model, batch):
        self.a *= 1.05
        return super().__call__(model, batch)


class CopyCostLoss(TimedLoss):
    """A step that is slower on the loader's batches (marked 7.0), as when their copies to the
    device are queued on the stream: the cost is outside the loader's next()."""

    def __call__(self, model, batch):
        extra = 0.5 * self.a if float(batch[0][0, 0]) == 7.0 else 0.0
        wait(extra, self.clock)
        return super().__call__(model, batch)


def marked_loader(batch_size, device):
    for _ in range(4):
        yield torch.full((batch_size, 4), 7.0), torch.zeros(batch_size, 1)


def test_a_host_drifting_during_the_check_is_not_a_bottleneck():
    # The data window is >10% slower than the compute window before it, but faster than the
    # one after it: drift, not loading (one compute window alone would have flagged it).
    clock = SimulatedClock()
    workload = timed_workload(DriftingLoss(0.01, 0.0, clock), data_loader=timed_loader(0.0, clock))
    result = check_data_path(workload, 32, device="cpu", warmup_steps=1, timed_steps=5, clock=clock)
    (check,) = result.checks
    assert not check.bottleneck and result.note.startswith("the input pipeline keeps up")
    # Against the faster (earlier) compute window alone the data path is >10% slower.
    faster_compute = check.compute_samples_per_s / (1 - check.compute_spread)
    assert check.pipeline_samples_per_s < 0.9 * faster_compute
    assert check.loader_share == 0.0


def test_a_cost_outside_the_loaders_next_still_caps_throughput():
    clock = SimulatedClock()
    workload = timed_workload(CopyCostLoss(0.01, 0.0, clock), data_loader=marked_loader)
    result = check_data_path(workload, 32, device="cpu", warmup_steps=1, timed_steps=5, clock=clock)
    (check,) = result.checks
    assert check.bottleneck and check.loader_share == 0.0 and check.compute_spread == 0.0
    assert check.pipeline_samples_per_s == pytest.approx(32 / 0.015)
    assert check.compute_samples_per_s == pytest.approx(32 / 0.01)
