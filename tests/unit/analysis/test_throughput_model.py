"""Throughput model, knee and early-stop rule against curves with closed-form answers.

The reference curve is pure affine step time t = a + b*B, so throughput X = B/(a + b*B) rises
towards 1/b and reaches a fraction f of that asymptote at B* = f*a / (b*(1 - f)).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from batchscope.analysis.throughput_model import (
    best_batch_size,
    fit_affine,
    fit_throughput_model,
    has_flattened,
    knee_batch_size,
)
from batchscope.errors import UsageError

A, B = 0.01, 1e-4  # 10 ms overhead per step, 0.1 ms per sample: a/b = 100 samples
GRID = 2 ** np.arange(0, 15)  # 1 .. 16384


def affine_times(batch):
    return A + B * np.asarray(batch, dtype=float)


def test_fit_affine_recovers_exact_coefficients():
    intercept, slope, rmse = fit_affine(GRID, affine_times(GRID))
    assert intercept == pytest.approx(A, rel=1e-9)
    assert slope == pytest.approx(B, rel=1e-9)
    assert rmse == pytest.approx(0.0, abs=1e-9)


def test_fit_affine_weights_relative_error():
    # One point 10% off: relative weighting means a 10% miss at the big batch does not get 1000x
    # the pull of a 10% miss at the small one; the unweighted fit would be dragged to the big point.
    batch = np.array([1.0, 10.0, 100.0, 10000.0])
    times = affine_times(batch)
    times[-1] *= 1.1
    intercept, _, _ = fit_affine(batch, times)
    assert intercept == pytest.approx(A, rel=0.1)


def test_model_reproduces_affine_inside_and_outside_measured_range():
    measured = np.array([8, 16, 32, 64, 128, 256])
    model = fit_throughput_model(measured, affine_times(measured))
    query = np.array([1, 3, 8, 20, 100, 256, 1000, 5000])
    np.testing.assert_allclose(model.step_seconds(query), affine_times(query), rtol=1e-9)
    np.testing.assert_allclose(model.samples_per_s(query), query / affine_times(query), rtol=1e-9)
    assert model.intercept_s == pytest.approx(A)
    assert model.seconds_per_sample == pytest.approx(B)
    assert model.extrapolation == "affine"
    assert isinstance(model.step_seconds(20), float)


def test_latency_bound_small_batches_do_not_bend_the_extrapolation():
    # GPU shape: flat at 5 ms until the device fills, then 0.1 ms/sample. A global affine fit
    # would blend both regimes; the upper fit sees only the saturated slope.
    measured = np.array([1, 2, 4, 8, 16, 32, 64, 128, 256, 512])
    times = np.maximum(0.005, 0.001 + 1e-4 * measured)
    model = fit_throughput_model(measured, times)
    assert model.seconds_per_sample == pytest.approx(1e-4, rel=1e-9)
    assert model.step_seconds(1024) == pytest.approx(0.001 + 1e-4 * 1024)
    assert model.step_seconds(3) == pytest.approx(0.005)  # measured points joined, not smoothed
    _, global_slope, _ = fit_affine(measured, times)
    assert abs(global_slope - 1e-4) > 1e-6  # the naive fit would have been wrong


def test_extrapolation_is_constant_throughput_when_slope_is_not_positive():
    measured = np.array([16, 32, 64])
    times = np.array([0.010, 0.010, 0.0099])  # still latency-bound at the top of the grid
    model = fit_throughput_model(measured, times)
    assert model.extrapolation == "constant_throughput"
    assert model.samples_per_s(1024) == pytest.approx(64 / 0.0099)


def test_below_first_point_respects_physical_bounds():
    measured = np.array([10, 20])
    model = fit_throughput_model(measured, [0.010, 0.030])  # steep: line would go negative at B=1
    t1 = model.step_seconds(1)
    assert t1 == pytest.approx(0.010 / 10)  # clipped: throughput no better than at B=10
    flat = fit_throughput_model(measured, [0.010, 0.010])
    assert flat.step_seconds(2) == pytest.approx(0.010)  # clipped: no slower than at B=10


def test_repeats_are_median_pooled_and_single_point_is_constant_throughput():
    model = fit_throughput_model([32, 32, 32, 64], [0.1, 0.1, 5.0, 0.2])
    assert model.step_seconds(32) == pytest.approx(0.1)
    single = fit_throughput_model([32], [0.1])
    assert single.samples_per_s(64) == pytest.approx(320.0)
    assert single.samples_per_s(8) == pytest.approx(320.0)


def test_to_dict_is_plain_json():
    model = fit_throughput_model(GRID[:6], affine_times(GRID[:6]))
    data = json.loads(json.dumps(model.to_dict(), allow_nan=False))
    assert data["seconds_per_sample"] == pytest.approx(B)
    assert data["batch_sizes"] == [1.0, 2.0, 4.0, 8.0, 16.0, 32.0]


@pytest.mark.parametrize("fraction", [0.5, 0.8, 0.9, 0.95, 0.99])
def test_knee_on_affine_curve_matches_closed_form(fraction):
    rates = GRID / affine_times(GRID)
    # Threshold is relative to the best MEASURED rate: X(B) >= T  <=>  B >= T*a / (1 - T*b).
    threshold = fraction * rates.max()
    exact = threshold * A / (1 - threshold * B)
    expected = int(GRID[GRID >= exact - 1e-9].min())
    assert knee_batch_size(GRID, rates, fraction) == expected
    # Where the grid runs far past it, this is the smallest grid point above B* = f a / (b (1-f)).
    asymptotic = fraction * A / (B * (1 - fraction))
    if asymptotic < GRID.max() / 8:
        assert expected == int(GRID[GRID >= asymptotic].min())


def test_knee_known_values():
    rates = GRID / affine_times(GRID)
    assert knee_batch_size(GRID, rates, 0.95) == 2048  # B* = 1900
    assert knee_batch_size(GRID, rates, 0.5) == 128  # B* = 100
    assert best_batch_size(GRID, rates) == 16384


def test_knee_of_flat_curve_is_first_point_and_best_takes_smallest_tie():
    rates = np.full(6, 1000.0)
    assert knee_batch_size(GRID[:6], rates) == 1
    assert best_batch_size(GRID[:6], rates) == 1


def test_knee_on_noisy_plateau_curves_is_where_the_plateau_starts():
    # Saturating device: 5 ms latency floor, then 0.1 ms/sample -> X = 10000/s from B = 50 on.
    # The knee (first point >= 95% of best) is 64, the first grid point on the plateau (32 reaches
    # only 64%). With 1% timing noise the best point is biased up by the max over the plateau, so
    # an unlucky seed can push it one doubling, never further.
    grid = 2 ** np.arange(0, 13)
    truth = grid / np.maximum(0.005, 1e-4 * grid)
    assert knee_batch_size(grid, truth, 0.95) == 64
    knees = []
    for seed in range(20):
        rng = np.random.default_rng(seed)
        knees.append(knee_batch_size(grid, truth * rng.normal(1.0, 0.01, size=grid.size), 0.95))
    assert set(knees) <= {64, 128}
    assert knees.count(64) >= 15


def test_knee_on_asymptotic_curve_is_ill_conditioned_but_bounded():
    # On X = B/(a + bB) the curve keeps creeping up, so noise in the best point moves the 95% knee;
    # it stays between the closed-form B* = 1900 (-> 2048) and two doublings above.
    grid = 2 ** np.arange(4, 15)
    for seed in range(10):
        rng = np.random.default_rng(seed)
        rates = grid / affine_times(grid) * rng.normal(1.0, 0.01, size=grid.size)
        assert knee_batch_size(grid, rates, 0.95) in (1024, 2048, 4096, 8192)


def test_has_flattened_on_doubling_grid_matches_closed_form():
    # Doubling B -> 2B gains X(2B)/X(B) - 1 = (a/b) / (a/b + 2B) = 100/(100 + 2B) on this curve:
    # < 5% first from 1024 -> 2048 (4.66%); 512 -> 1024 is 8.9%. Patience 2 needs two such steps.
    rates = GRID / affine_times(GRID)
    upto = {int(b): i + 1 for i, b in enumerate(GRID)}
    assert not has_flattened(GRID[: upto[1024]], rates[: upto[1024]])
    assert not has_flattened(GRID[: upto[2048]], rates[: upto[2048]])
    assert has_flattened(GRID[: upto[4096]], rates[: upto[4096]])
    assert has_flattened(GRID[: upto[2048]], rates[: upto[2048]], patience=1)


def test_has_flattened_flat_falling_and_late_rise():
    assert has_flattened([1, 2, 4], [100.0, 100.0, 100.0])
    assert has_flattened([1, 2, 4, 8], [100.0, 200.0, 150.0, 120.0])  # past a memory-bandwidth cliff
    assert not has_flattened([1, 2, 4, 8], [100.0, 100.0, 100.0, 130.0])  # second wind: keep going
    assert not has_flattened([1, 2], [100.0, 100.0])  # too few points to judge with patience 2


def test_has_flattened_one_noisy_point_does_not_stop_the_search():
    assert not has_flattened([1, 2, 4, 8], [100.0, 190.0, 191.0, 300.0])


@pytest.mark.parametrize(
    "call",
    [
        lambda: fit_throughput_model([1, 2], [0.1]),
        lambda: fit_throughput_model([0, 2], [0.1, 0.2]),
        lambda: fit_throughput_model([1, 2], [0.1, float("nan")]),
        lambda: fit_throughput_model([], []),
        lambda: knee_batch_size([1, 2], [1.0, 2.0], fraction=1.5),
        lambda: has_flattened([1, 2, 4], [1.0, 2.0, 3.0], patience=0),
        lambda: fit_affine([4, 4], [0.1, 0.1]),
        lambda: fit_throughput_model([1, 2], [0.1, 0.2]).step_seconds(-1),
    ],
)
def test_bad_input_is_a_usage_error(call):
    with pytest.raises(UsageError) as info:
        call()
    assert "\n" not in str(info.value)
