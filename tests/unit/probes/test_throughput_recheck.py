"""Points slowed by something besides the workload are measured again (throughput_recheck.py),
on a simulated clock where the slowdown is known exactly."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from batchscope.probes.throughput import measure_throughput
from batchscope.probes.throughput_recheck import contradicted, unsteady
from batchscope.probes.throughput_result import ThroughputPoint

sys.path.insert(0, str(Path(__file__).parent))  # the fakes live beside this file
from throughput_fakes import simulated, timed_workload  # noqa: E402

A, B = 0.010, 0.0001  # a step of batch m takes A + B m seconds when nothing interferes


def _points(*step_seconds: float) -> list[ThroughputPoint]:
    return [ThroughputPoint(batch_size=8 * 2**i, step_s=s, spread=0.0, data_s=0.0, compute_s=s,
                            units_per_step=8 * 2**i, unit="examples", timed_steps=3, warmup_steps=0)
            for i, s in enumerate(step_seconds)]


@pytest.mark.parametrize("steps, expected", [
    ((1.0, 2.0, 4.0), []),              # slower with the batch: as it should be
    ((1.0, 1.2, 1.1), []),              # within the 25% slack (launch-bound noise)
    ((1.0, 1.3, 1.0), [1]),             # 30% slower than the larger batch after it
    ((5.0, 6.0, 0.5, 1.0), [0, 1]),     # both small ones slower than batch 32
    ((2.0, 1.0, 1.9, 3.0), [0]),        # only a LARGER batch contradicts a point
])
def test_contradicted_points_are_those_slower_than_a_larger_batch(steps, expected):
    assert contradicted(_points(*steps)) == expected


def test_a_point_slowed_by_interference_is_measured_again_and_the_faster_kept():
    # The first 3 steps (batch 8's timed steps) take 1 s more: another process, say.
    clock, workload = simulated(A, B, slow_calls=3, slow_extra=1.0)
    result = measure_throughput(workload, device="cpu", batch_sizes=[8, 16, 32], warmup_steps=0,
                                timed_steps=3, data_path=False, clock=clock)
    steps = {p.batch_size: p.step_s for p in result.points}
    assert steps == pytest.approx({8: A + 8 * B, 16: A + 16 * B, 32: A + 32 * B})
    assert any("batch 8 took 1.01 s a step, more than batch 16's 11.6 ms: measured again, "
               "10.8 ms; the faster kept" in note for note in result.notes), result.notes


def test_a_point_slow_again_is_kept_as_measured_and_said():
    clock, _ = simulated(A, B)
    # Batch 8 is slow every time it runs: no second measurement can clear it.
    workload = timed_workload(lambda model, batch: (
        clock.advance(A + B * len(batch[0]) + (1.0 if len(batch[0]) == 8 else 0.0)),
        model(batch[0]).sum())[1])
    result = measure_throughput(workload, device="cpu", batch_sizes=[8, 16, 32], warmup_steps=0,
                                timed_steps=3, data_path=False, clock=clock)
    assert result.points[0].step_s == pytest.approx(A + 8 * B + 1.0)
    assert any("batch 8 still took longer a step than a larger batch" in n for n in result.notes)


def test_no_point_is_measured_again_past_the_time_budget():
    clock, workload = simulated(A, B, slow_calls=3, slow_extra=1.0)
    result = measure_throughput(workload, device="cpu", batch_sizes=[8, 16, 32], warmup_steps=0,
                                timed_steps=3, data_path=False, clock=clock, time_budget_s=6.1)
    # 3.03 s for batch 8, about 0.07 s for 16 and 32: another 3.03 s would overrun the 6.1.
    assert [p.batch_size for p in result.points] == [8, 16, 32]
    assert result.points[0].step_s == pytest.approx(A + 8 * B + 1.0)  # not measured again
    assert any("no time left to measure it again" in n for n in result.notes), result.notes


def test_unsteady_points_are_those_whose_steps_disagree():
    points = _points(1.0, 2.0, 4.0)
    points[1] = ThroughputPoint(batch_size=16, step_s=2.0, spread=0.6, data_s=0.0, compute_s=2.0,
                                units_per_step=16, unit="examples", timed_steps=3, warmup_steps=0)
    assert unsteady(points) == [1] and unsteady(points, limit=0.7) == []


def test_a_lone_unsteady_point_is_measured_again_and_the_faster_kept():
    # One batch size only (a small memory budget): no larger batch can contradict it, but two
    # of its four timed steps take 1 s more, so its median is 0.5 s too slow.
    clock, workload = simulated(A, B, slow_calls=2, slow_extra=1.0)
    result = measure_throughput(workload, device="cpu", batch_sizes=[32], warmup_steps=0,
                                timed_steps=4, data_path=False, clock=clock)
    assert result.points[0].step_s == pytest.approx(A + 32 * B)
    assert any("batch 32's step times varied by" in note and "measured again, 13.2 ms; the "
               "faster kept" in note for note in result.notes), result.notes
    assert not any("still had unsteady" in note for note in result.notes), result.notes
