"""Within a time budget the input-pipeline check measures only the knee, capped to what is left."""

from __future__ import annotations

from types import SimpleNamespace

from batchscope.probes.throughput import _pipeline_plan

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
