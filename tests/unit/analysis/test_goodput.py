"""Goodput planning against the closed form for affine step time.

With t(B) = a + b*B and noise scale B_n, time to target is proportional to
(B + B_n)(a + b*B)/B = a + b*B_n + b*B + a*B_n/B: convex in B, minimal at B* = sqrt(a*B_n/b).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from batchscope.analysis.goodput import accumulation_for, global_samples_per_s, goodput, plan_batch_size
from batchscope.analysis.throughput_model import fit_throughput_model
from batchscope.errors import UsageError

A, B = 0.02, 1e-4  # 20 ms per step, 0.1 ms per sample
NOISE = 900.0  # B* = sqrt(0.02 * 900 / 1e-4) = sqrt(180000) = 424.26
MEASURED = 2 ** np.arange(0, 14)  # 1 .. 8192


@pytest.fixture(scope="module")
def model():
    return fit_throughput_model(MEASURED, A + B * MEASURED)


def closed_form_time(batch):
    batch = np.asarray(batch, dtype=float)
    return (batch + NOISE) * (A + B * batch) / batch


def test_goodput_formula():
    assert goodput(256, 1000.0, 256.0, 128) == pytest.approx(1000.0 * 384 / 512)
    np.testing.assert_allclose(goodput(np.array([128, 256]), np.array([10.0, 20.0]), 256.0, 128),
                               [10.0, 20.0 * 384 / 512])


def test_plan_picks_grid_point_nearest_the_closed_form_optimum(model):
    candidates = np.arange(8, 4097, 8)
    plan = plan_batch_size(candidates, model, NOISE, max_fit_batch_size=8192, reference_batch_size=128)
    optimum = math.sqrt(A * NOISE / B)
    expected = int(candidates[np.argmin(closed_form_time(candidates))])
    assert expected in (416, 424, 432) and abs(expected - optimum) <= 8
    assert plan.batch_size == expected
    assert plan.accumulation == 1 and plan.micro_batch_size == expected
    # Relative time against the reference is the closed-form ratio.
    assert plan.relative_time == pytest.approx(closed_form_time(expected) / closed_form_time(128), rel=1e-9)
    assert plan.speedup_vs_reference == pytest.approx(1 / plan.relative_time)
    assert plan.mode == "goodput"


def test_time_curve_is_unimodal_with_limits(model):
    candidates = 2 ** np.arange(0, 14)
    plan = plan_batch_size(candidates, model, NOISE, max_fit_batch_size=8192, reference_batch_size=128)
    times = np.array([p.relative_time for p in plan.curve])
    turn = int(np.argmin(times))
    assert np.all(np.diff(times[: turn + 1]) < 0) and np.all(np.diff(times[turn:]) > 0)
    # B -> 0: time ~ a*B_n/B (overhead per step dominates); B -> inf: time ~ b*B (wasted examples).
    seconds = times * closed_form_time(128)
    assert seconds[0] == pytest.approx(closed_form_time(1))
    assert seconds[0] * 1 == pytest.approx(A * NOISE, rel=0.01)
    assert (seconds[-1] - seconds[-2]) / (8192 - 4096) == pytest.approx(B, rel=0.01)


def test_good_range_brackets_optimum_within_tolerance(model):
    candidates = np.arange(16, 4097, 16)
    plan = plan_batch_size(candidates, model, NOISE, 8192, 128, tolerance=0.10)
    low, high = plan.good_range
    best_time = closed_form_time(plan.batch_size)
    inside = candidates[closed_form_time(candidates) <= best_time * 1.10]
    assert (low, high) == (int(inside.min()), int(inside.max()))
    assert low < plan.batch_size < high


def test_accumulation_never_exceeds_max_fit(model):
    candidates = [64, 100, 128, 1000, 1024, 2048, 4096]
    plan = plan_batch_size(candidates, model, NOISE, max_fit_batch_size=64, reference_batch_size=128,
                           max_accumulation=16)
    for point in plan.curve:
        if point.feasible:
            assert point.micro_batch_size <= 64
            assert point.micro_batch_size * point.accumulation >= point.batch_size
    by_batch = {p.batch_size: p for p in plan.curve}
    assert (by_batch[1000].micro_batch_size, by_batch[1000].accumulation) == (63, 16)
    assert (by_batch[100].micro_batch_size, by_batch[100].accumulation) == (50, 2)
    assert not by_batch[2048].feasible and not by_batch[4096].feasible
    # Divisible case: X(1024) = 1024 / (16 t(64)) = X(64).
    assert by_batch[1024].samples_per_s == pytest.approx(64 / (A + B * 64))
    assert plan.batch_size <= 1024


def test_accumulation_for_and_global_throughput(model):
    assert accumulation_for(512, 128, 16) == (128, 4)
    assert accumulation_for(513, 128, 16) == (103, 5)
    assert accumulation_for(4096, 128, 16) is None
    assert global_samples_per_s(100, model, 64, 16) == pytest.approx(100 / (2 * (A + B * 50)))


def test_throughput_only_mode_is_flagged_and_takes_the_knee(model):
    # Time per example is A/B + B_coef: 1.0244e-4 s at 8192, the fastest. 95% of its throughput
    # means 0.95 * t(B) <= 1.0244e-4: 4096 (0.95 * 1.0488e-4 = 0.9964e-4) passes, 2048
    # (0.95 * 1.0977e-4 = 1.0428e-4) does not.
    candidates = [32, 64, 128, 256, 512, 1024, 2048, 4096, 8192]
    for noise in (None, math.nan, math.inf):
        plan = plan_batch_size(candidates, model, noise, 8192, 128)
        assert plan.mode == "throughput_only"
        assert plan.batch_size == 4096
        assert plan.noise_scale is None
        assert any("throughput alone" in note for note in plan.notes)
        assert any("smallest reaching 95% of the best throughput" in note for note in plan.notes)
    # A tolerance tighter than the knee's still keeps the chosen batch inside the good range.
    tight = plan_batch_size(candidates, model, None, 8192, 128, tolerance=0.01)
    assert tight.batch_size == 4096 and tight.good_range == (4096, 8192)
    # Still steep at the top (512 is 1.39e-4 s/example, 256 is 1.78e-4): the largest wins.
    assert plan_batch_size([32, 64, 128, 256, 512], model, None, 8192, 128).batch_size == 512


def test_zero_noise_prefers_smallest(model):
    plan = plan_batch_size([32, 64, 128, 256], model, 0.0, 8192, 128)
    assert plan.batch_size == 32
    assert any("smallest candidate" in note for note in plan.notes)


def test_to_dict_is_plain_json(model):
    plan = plan_batch_size([64, 128, 256, 512, 1024], model, NOISE, 256, 128)
    data = json.loads(json.dumps(plan.to_dict(), allow_nan=False))
    assert data["batch_size"] == plan.batch_size
    assert len(data["curve"]) == 5
    assert data["curve"][-1] == {
        "batch_size": 1024, "micro_batch_size": 256, "accumulation": 4,
        "samples_per_s": pytest.approx(1024 / (4 * (A + B * 256))),
        "efficiency": pytest.approx((NOISE + 128) / (NOISE + 1024)),
        # 4 micro batches of 256: seconds per example t(256)/256, examples needed ∝ B_n + 1024
        "relative_time": pytest.approx(((A + B * 256) / 256 * (NOISE + 1024))
                                       / ((A + B * 128) / 128 * (NOISE + 128))),
        "feasible": True,
    }


@pytest.mark.parametrize(
    "kwargs",
    [
        {"noise_scale": -5.0},
        {"noise_scale": "big"},
        {"candidates": [0, 64]},
        {"candidates": [100000]},
        {"reference_batch_size": 100000},
        {"tolerance": 0},
        {"max_fit_batch_size": 0},
    ],
)
def test_bad_input_is_a_usage_error(model, kwargs):
    arguments = {"candidates": [64, 128], "throughput_model": model, "noise_scale": 100.0,
                 "max_fit_batch_size": 256, "reference_batch_size": 128}
    arguments.update(kwargs)
    with pytest.raises(UsageError) as info:
        plan_batch_size(**arguments)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("world_size", [2, 4, 8])
def test_on_w_devices_the_optimum_global_batch_grows_by_sqrt_w(model, world_size):
    # Each device steps its share B/W in A + B_sample*B/W, so time to target is
    # (B + NOISE)(A + B_sample B/W)/B, minimised at sqrt(A NOISE W / B_sample) = 424.26 sqrt(W).
    candidates = np.arange(world_size, 8 * 4096 + 1, world_size)
    plan = plan_batch_size(candidates, model, NOISE, max_fit_batch_size=8192, reference_batch_size=128,
                           world_size=world_size)

    def time(batch):
        batch = np.asarray(batch, dtype=float)
        return (batch + NOISE) * (A + B * batch / world_size) / batch

    expected = int(candidates[np.argmin(time(candidates))])
    assert abs(expected - math.sqrt(A * NOISE * world_size / B)) <= world_size
    assert plan.batch_size == expected and plan.world_size == world_size
    assert (plan.micro_batch_size, plan.accumulation) == (expected // world_size, 1)
    assert plan.relative_time == pytest.approx(time(expected) / time(128), rel=1e-9)
    # The same answer as one device's plan for the per-device batch at NOISE / W.
    one = plan_batch_size(candidates // world_size, model, NOISE / world_size, max_fit_batch_size=8192,
                          reference_batch_size=128 // world_size)
    assert one.batch_size * world_size == plan.batch_size


def test_each_devices_share_is_split_into_micro_batches_that_fit(model):
    plan = plan_batch_size([1024], model, NOISE, max_fit_batch_size=100, reference_batch_size=1024,
                           max_accumulation=4, world_size=4)
    # 256 a device in 3 micro batches of 86 (ceil), all 4 devices stepping together.
    assert (plan.batch_size, plan.micro_batch_size, plan.accumulation) == (1024, 86, 3)
    assert plan.curve[0].samples_per_s == pytest.approx(1024 / (3 * (A + B * 86)))
    assert global_samples_per_s(1024, model, 100, 4, world_size=4) == plan.curve[0].samples_per_s
    # One device would need 11 micro batches: more than max_accumulation allows.
    assert global_samples_per_s(1024, model, 100, 4) is None
    assert plan.to_dict()["world_size"] == 4


def test_a_measured_all_reduce_per_step_moves_the_optimum_to_larger_batches(model):
    # With s seconds of all-reduce per step the overhead is A + s: the optimum on W devices is
    # sqrt((A + s) NOISE W / B_sample); s = 3A doubles it.
    world, sync = 4, 3 * A
    candidates = np.arange(world, 8 * 4096 + 1, world)
    plan = plan_batch_size(candidates, model, NOISE, max_fit_batch_size=8192, reference_batch_size=128,
                           world_size=world, sync_seconds=sync)
    without = plan_batch_size(candidates, model, NOISE, max_fit_batch_size=8192, reference_batch_size=128,
                              world_size=world)
    assert abs(plan.batch_size - math.sqrt((A + sync) * NOISE * world / B)) <= world
    assert abs(plan.batch_size - 2 * without.batch_size) <= 2 * world
    assert plan.sync_seconds == sync and plan.to_dict()["sync_seconds"] == sync
    assert plan.curve[0].samples_per_s == pytest.approx(world / (A + B + sync))
    with pytest.raises(UsageError, match="sync_seconds=-1"):
        plan_batch_size(candidates, model, NOISE, max_fit_batch_size=8192, reference_batch_size=128,
                        sync_seconds=-1)
