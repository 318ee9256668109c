"""Gradient-noise estimators against simulated gradients with a known |G|^2 and tr(Sigma).

Per-example gradients are g_i = G + noise_i with noise ~ N(0, Sigma), Sigma diagonal, so the true
noise scale B = tr(Sigma)/|G|^2 is known exactly. A small batch is a subset of the big one, as
when the probe splits one big batch into micro batches; for Gaussian gradients its mean and the
rest's mean are independent, so both batch means can be drawn directly (cheap, and exact).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from batchscope.analysis.noise_stats import (
    BiasCorrectedEMA,
    SmoothedNoiseScale,
    noise_scale_with_ci,
    student_t_quantile,
    unbiased_components,
)
from batchscope.errors import UsageError

B_SMALL, B_BIG = 16, 256


def simulate_sq_norms(rng, samples, true_b, dim=64, b_small=B_SMALL, b_big=B_BIG):
    """Pairs (|G_small|^2, |G_big|^2) with |G|^2 = 1 and tr(Sigma) = true_b."""
    grad = rng.normal(size=dim)
    grad /= np.linalg.norm(grad)
    variances = rng.uniform(0.5, 1.5, size=dim)
    variances *= true_b / variances.sum()
    sd = np.sqrt(variances)
    small = grad + sd / math.sqrt(b_small) * rng.normal(size=(samples, dim))
    rest = grad + sd / math.sqrt(b_big - b_small) * rng.normal(size=(samples, dim))
    big = (b_small * small + (b_big - b_small) * rest) / b_big
    return (small**2).sum(axis=1), (big**2).sum(axis=1)


def test_unbiased_components_solve_the_two_equations_exactly():
    # |G|^2 = 2, tr(Sigma) = 300: E|G_10|^2 = 2 + 30 = 32, E|G_100|^2 = 2 + 3 = 5.
    g2, trace = unbiased_components(10, 32.0, 100, 5.0)
    assert g2 == pytest.approx(2.0)
    assert trace == pytest.approx(300.0)
    arrays = unbiased_components(10, np.array([32.0, 12.0]), 100, np.array([5.0, 3.0]))
    # second pair: g2 = (100*3 - 10*12)/90 = 2, S = (12 - 3)/0.09 = 100
    np.testing.assert_allclose(arrays[0], [2.0, 2.0])
    np.testing.assert_allclose(arrays[1], [300.0, 100.0])


def test_estimators_are_unbiased_over_many_draws():
    rng = np.random.default_rng(1234)
    small, big = simulate_sq_norms(rng, samples=4000, true_b=200.0)
    g2, trace = unbiased_components(B_SMALL, small, B_BIG, big)
    assert abs(g2.mean() - 1.0) < 4 * g2.std() / math.sqrt(g2.size)
    assert abs(trace.mean() - 200.0) < 4 * trace.std() / math.sqrt(trace.size)
    # The naive ratio |G_big|^2-based plug-in is biased: |G_big|^2 alone overstates |G|^2 by tr/B_big.
    assert big.mean() - 1.0 > 200.0 / B_BIG * 0.8


def test_unbiased_on_a_finite_dataset_with_per_example_gradients():
    # Not Gaussian: a fixed "dataset" of 500 per-example gradient vectors; batches drawn with
    # replacement, small batch = the first B_SMALL rows of the big batch. True G is the dataset
    # mean and Sigma the population covariance.
    rng = np.random.default_rng(7)
    data = rng.exponential(size=(500, 8)) + np.linspace(0.0, 0.5, 8)
    true_g2 = float((data.mean(axis=0) ** 2).sum())
    true_trace = float(data.var(axis=0).sum())
    picks = rng.integers(0, 500, size=(3000, 64))
    big_means = data[picks].mean(axis=1)
    small_means = data[picks[:, :8]].mean(axis=1)
    g2, trace = unbiased_components(8, (small_means**2).sum(1), 64, (big_means**2).sum(1))
    assert abs(g2.mean() - true_g2) < 4 * g2.std() / math.sqrt(g2.size)
    assert abs(trace.mean() - true_trace) < 4 * trace.std() / math.sqrt(trace.size)


@pytest.mark.parametrize("true_b", [50.0, 400.0])
def test_interval_covers_true_noise_scale_at_nominal_rate(true_b):
    covered = 0
    statuses = []
    for seed in range(200):
        rng = np.random.default_rng(seed)
        small, big = simulate_sq_norms(rng, samples=30, true_b=true_b)
        estimate = noise_scale_with_ci(*unbiased_components(B_SMALL, small, B_BIG, big), confidence=0.9)
        statuses.append(estimate.status)
        if estimate.ci_low is not None and estimate.ci_low <= true_b <= estimate.ci_high:
            covered += 1
    assert 0.75 <= covered / 200 <= 0.99  # nominal 0.90; measured 0.90-0.92 with these seeds
    assert statuses.count("ok") >= 180  # this regime is well resolved


def test_interval_is_not_degenerate():
    rng = np.random.default_rng(3)
    small, big = simulate_sq_norms(rng, samples=40, true_b=100.0)
    estimate = noise_scale_with_ci(*unbiased_components(B_SMALL, small, B_BIG, big))
    assert estimate.status == "ok"
    assert 0 < estimate.ci_low < estimate.b_simple < estimate.ci_high
    assert estimate.samples == 40 and estimate.blocks == 20
    assert estimate.b_simple == pytest.approx(estimate.trace_sigma / estimate.grad_sq_norm)


def test_single_sample_blocks_give_fieller_interval_from_sample_covariance():
    # With one sample per block the jackknife covariance of the means is the sample covariance / n;
    # Fieller's interval is the set {B : (mean S - B mean g2)^2 <= t^2 Var(mean S - B mean g2)}.
    g2 = np.array([1.0, 1.2, 0.8, 1.1, 0.9, 1.0])
    trace = np.array([100.0, 130.0, 90.0, 105.0, 95.0, 110.0])
    estimate = noise_scale_with_ci(g2, trace, confidence=0.9, blocks=6)
    cov = np.cov(np.vstack([g2, trace]), ddof=1) / 6
    t = 2.015048  # Student t, 95th percentile, 5 degrees of freedom (table value)
    quadratic = [g2.mean() ** 2 - t**2 * cov[0, 0],
                 -2 * (g2.mean() * trace.mean() - t**2 * cov[0, 1]),
                 trace.mean() ** 2 - t**2 * cov[1, 1]]
    low, high = sorted(np.roots(quadratic).real)
    assert estimate.ci_low == pytest.approx(low, rel=1e-6)
    assert estimate.ci_high == pytest.approx(high, rel=1e-6)
    assert estimate.b_simple == pytest.approx(trace.mean() / g2.mean())
    assert estimate.status == "ok"


def test_gradient_and_trace_both_unresolved_give_an_unbounded_interval():
    estimate = noise_scale_with_ci([0.1, 3.0, -2.0, 0.5], [100.0, -60.0, 250.0, 130.0])
    assert estimate.status == "unstable"
    assert estimate.b_simple == pytest.approx(105.0 / 0.4)  # reported, not clipped or hidden
    assert estimate.ci_low == -math.inf and estimate.ci_high == math.inf
    data = estimate.to_dict()
    assert data["ci_low"] is None and data["ci_high"] is None


def test_unresolved_gradient_with_a_resolved_trace_bounds_the_noise_scale_from_below():
    # Constant tr(Sigma) = T has no variance, so Fieller's set is {B : T / B within t standard
    # errors of mean |G|^2}; B >= 0 leaves [T / (mean + t se), inf): T over the upper end of |G|^2.
    g2 = np.array([0.3, -0.2, 0.5, -0.1, 0.2, 0.1])
    estimate = noise_scale_with_ci(g2, [100.0] * 6, confidence=0.9, blocks=6)
    t = 2.015048  # Student t, 95th percentile, 5 degrees of freedom (table value)
    standard_error = g2.std(ddof=1) / math.sqrt(6)
    assert g2.mean() < t * standard_error  # |G|^2 is indistinguishable from 0 ...
    assert estimate.status == "lower_bound"  # ... yet B_simple is bounded below
    assert estimate.ci_low == pytest.approx(100.0 / (g2.mean() + t * standard_error), rel=1e-6)
    assert estimate.ci_high == math.inf and estimate.b_simple == pytest.approx(100.0 / g2.mean())
    assert f"B_simple >= {estimate.ci_low:.3g}" in estimate.detail
    data = json.loads(json.dumps(estimate.to_dict(), allow_nan=False))
    assert data["ci_low"] == pytest.approx(estimate.ci_low) and data["ci_high"] is None


def test_lower_bound_is_the_positive_root_of_fiellers_quadratic():
    # A general case, trace and |G|^2 correlated: the bound is the positive root of
    # a B^2 - 2 h B + c with a < 0 < c, computed here with numpy's root finder.
    g2 = np.array([0.4, -0.3, 0.9, -0.6, 0.2, 0.5, -0.1, 0.3])
    trace = np.array([120.0, 80.0, 150.0, 70.0, 100.0, 125.0, 90.0, 105.0])
    estimate = noise_scale_with_ci(g2, trace, confidence=0.9, blocks=8)
    cov = np.cov(np.vstack([g2, trace]), ddof=1) / 8
    t = student_t_quantile(0.95, 7)
    quadratic = [g2.mean() ** 2 - t**2 * cov[0, 0],
                 -2 * (g2.mean() * trace.mean() - t**2 * cov[0, 1]),
                 trace.mean() ** 2 - t**2 * cov[1, 1]]
    assert quadratic[0] < 0 < quadratic[2]
    roots = np.roots(quadratic).real
    assert estimate.status == "lower_bound"
    assert estimate.ci_low == pytest.approx(roots.max(), rel=1e-9) and roots.min() < 0


def test_lower_bound_holds_its_confidence_when_the_gradient_is_buried():
    # The truth is B = 20000 with b_big = 256: most estimates can only say "at least", and that
    # bound must sit below the truth about 90% of the time (95%: one side of a 90% set).
    bounds = []
    for seed in range(200):
        small, big = simulate_sq_norms(np.random.default_rng(seed), samples=30, true_b=20000.0)
        estimate = noise_scale_with_ci(*unbiased_components(B_SMALL, small, B_BIG, big))
        if estimate.status == "lower_bound":
            bounds.append(estimate.ci_low)
    assert len(bounds) >= 150
    assert np.mean(np.array(bounds) <= 20000.0) >= 0.88
    assert np.median(bounds) > 4 * B_BIG  # and it says something: far above the batches measured


def test_negative_g2_is_reported_not_clipped():
    # mean |G|^2 < 0 and too few samples for an interval: nothing to bound.
    estimate = noise_scale_with_ci([-0.5, 0.2, -0.1], [10.0, 12.0, 11.0], blocks=1)
    assert estimate.status == "negative_g2"
    assert estimate.b_simple is None and estimate.ci_low is None
    assert estimate.grad_sq_norm == pytest.approx(-0.4 / 3)
    assert "|G|^2" in estimate.detail


def test_negative_g2_within_its_noise_still_bounds_the_noise_scale_from_below():
    estimate = noise_scale_with_ci([-0.5, 0.2, -0.1], [10.0, 12.0, 11.0])
    assert estimate.status == "lower_bound" and estimate.b_simple is None
    assert 0 < estimate.ci_low < math.inf and estimate.ci_high == math.inf


def test_a_negative_mean_g2_counts_as_zero_and_cannot_strengthen_the_bound():
    # Constant tr(Sigma) = T, mean |G|^2 < 0: the bound is T / (0 + t se), not T / (mean + t se),
    # which would grow without limit as the mean nears -t se.
    g2 = np.array([-0.3, 0.2, -0.5, 0.1, -0.1, 0.2])
    estimate = noise_scale_with_ci(g2, [100.0] * 6, confidence=0.9, blocks=6)
    t = 2.015048  # Student t, 95th percentile, 5 degrees of freedom (table value)
    standard_error = g2.std(ddof=1) / math.sqrt(6)
    assert g2.mean() < 0 and estimate.status == "lower_bound"
    assert estimate.ci_low == pytest.approx(100.0 / (t * standard_error), rel=1e-6)
    shifted = noise_scale_with_ci(g2 - g2.mean(), [100.0] * 6, confidence=0.9, blocks=6)
    assert shifted.ci_low == pytest.approx(estimate.ci_low)  # the same as a mean of exactly 0


def test_the_lower_bound_is_accurate_when_h_is_negative():
    # h < 0 makes c / (h + sqrt(h^2 - a c)) cancel; the bound must still be the positive root.
    from batchscope.analysis.noise_stats import _one_sided_lower_bound

    a, h, c = -1e-12, -1e6, 1e-6
    expected = max(np.roots([a, -2 * h, c]).real)
    assert _one_sided_lower_bound(a, h, c) == pytest.approx(expected, rel=1e-9)
    assert _one_sided_lower_bound(0.0, -1.0, 1.0) is None  # a = 0, h <= 0: nothing above 0


def test_looking_after_every_sample_rarely_stops_on_a_bound_far_above_the_truth():
    # tune asks after every sample from 16 on whether the bound settles its decision; each look
    # is a chance for the bound to overshoot. Over 40 runs of up to 100 samples at B = 20000,
    # the share of runs in which ANY look gives a bound above 2x the truth stays small.
    overshot = 0
    for seed in range(40):
        small, big = simulate_sq_norms(np.random.default_rng(seed), samples=100, true_b=20000.0)
        g2, trace = unbiased_components(B_SMALL, small, B_BIG, big)
        overshot += any(
            estimate.status == "lower_bound" and estimate.ci_low > 2 * 20000.0
            for estimate in (noise_scale_with_ci(g2[:n], trace[:n]) for n in range(16, 101)))
    assert overshot <= 2


def test_a_clearly_negative_mean_g2_still_counts_as_zero():
    # Far below 0 for its spread (skewed samples do that with few of them): the bound is the
    # one of a mean of exactly 0, T / (t se), not "no answer".
    g2 = np.array([-1.0, -1.1, -0.9, -1.0])
    estimate = noise_scale_with_ci(g2, [10.0] * 4, confidence=0.9, blocks=4)
    t = student_t_quantile(0.95, 3)
    assert estimate.status == "lower_bound" and estimate.b_simple is None
    assert estimate.ci_low == pytest.approx(10.0 / (t * g2.std(ddof=1) / 2), rel=1e-6)


def test_a_negative_mean_g2_without_a_resolved_trace_is_negative_g2():
    estimate = noise_scale_with_ci([-1.0, -1.1, -0.9, -1.0], [10.0, -12.0, 15.0, -9.0])
    assert estimate.status == "negative_g2" and estimate.ci_low is None and estimate.b_simple is None


def test_negative_trace_keeps_its_sign_and_is_unstable():
    estimate = noise_scale_with_ci([1.0, 1.1, 0.9, 1.0], [-5.0, 2.0, -3.0, 1.0])
    assert estimate.b_simple == pytest.approx(-1.25)
    assert estimate.status == "unstable"


def test_wide_interval_is_unstable():
    # mean |G|^2 = 1 with standard error 0.45: resolved from 0 (so bounded) but only just, so the
    # interval [~54, ~710] spans more than 10x.
    estimate = noise_scale_with_ci([2.2, -0.2] * 4, [100.0] * 8)
    assert estimate.status == "unstable"
    assert estimate.ci_high / estimate.ci_low > 10
    assert "spans more than 10x" in estimate.detail


def test_buried_gradient_is_rarely_called_ok():
    # B = 20000 with b_big = 256 and 30 samples: mean |G|^2 has a standard error ~4x its value.
    # The interval must still cover (unbounded counts as covering), and "ok" verdicts - which a
    # jackknife of the ratio handed out often and always wrongly - must be rare.
    covered = ok = 0
    for seed in range(100):
        rng = np.random.default_rng(seed)
        small, big = simulate_sq_norms(rng, samples=30, true_b=20000.0)
        estimate = noise_scale_with_ci(*unbiased_components(B_SMALL, small, B_BIG, big))
        ok += estimate.status == "ok"
        unbounded = estimate.ci_low is None or math.isinf(estimate.ci_low)
        covered += unbounded or estimate.ci_low <= 20000.0 <= estimate.ci_high
    assert covered >= 80
    assert ok <= 6


def test_to_dict_keys_and_json():
    estimate = noise_scale_with_ci([1.0, 1.2, 0.9, 1.1], [100.0, 120.0, 95.0, 105.0])
    data = json.loads(json.dumps(estimate.to_dict(), allow_nan=False))
    assert {"b_simple", "ci_low", "ci_high", "grad_sq_norm", "trace_sigma", "samples", "status"} <= set(data)
    assert data["samples"] == 4 and data["status"] == "ok"


def test_bias_corrected_ema():
    ema = BiasCorrectedEMA(0.9)
    assert ema.value is None
    for _ in range(5):
        assert ema.update(3.7) == pytest.approx(3.7, rel=1e-12)  # exact from step 1
    two = BiasCorrectedEMA(0.5)
    two.update(1.0)
    assert two.update(3.0) == pytest.approx((0.5 * 1.0 + 1.0 * 3.0) / 1.5)
    assert BiasCorrectedEMA(0.0).update(4.0) == 4.0


def test_smoothed_noise_scale_divides_after_smoothing():
    tracker = SmoothedNoiseScale(beta=0.9)
    assert tracker.b_simple is None
    assert tracker.update(2.0, 300.0) == pytest.approx(150.0)
    # Ratio of smoothed values, not smoothed ratio: with beta 0.5 the weights are 0.5 and 1, so
    # (0.5*100 + 500) / (0.5*1 + 3) = 157.14..., whereas smoothing the ratios 100 and 166.7 gives 144.4.
    halves = SmoothedNoiseScale(beta=0.5)
    halves.update(1.0, 100.0)
    assert halves.update(3.0, 500.0) == pytest.approx(550.0 / 3.5)
    other = SmoothedNoiseScale(beta=0.0)
    assert other.update(-1.0, 10.0) is None  # no positive |G|^2: no noise scale, not a made-up one


@pytest.mark.parametrize(
    ("probability", "dof", "expected"),
    [(0.95, 1, 6.313752), (0.95, 2, 2.919986), (0.95, 3, 2.353363), (0.95, 9, 1.833113),
     (0.975, 19, 2.093024), (0.995, 5, 4.032143), (0.95, 1000, 1.646379)],
)
def test_student_t_quantile_matches_tables(probability, dof, expected):
    assert student_t_quantile(probability, dof) == pytest.approx(expected, abs=2e-6)


@pytest.mark.parametrize(
    "call",
    [
        lambda: unbiased_components(64, 1.0, 16, 2.0),
        lambda: unbiased_components(16, [1.0, 2.0], 64, [1.0]),
        lambda: noise_scale_with_ci([1.0, 2.0], [1.0]),
        lambda: noise_scale_with_ci([1.0, float("inf")], [1.0, 2.0]),
        lambda: noise_scale_with_ci([1.0, 2.0], [1.0, 2.0], confidence=90),
        lambda: BiasCorrectedEMA(1.0),
        lambda: BiasCorrectedEMA(0.9).update(float("nan")),
    ],
)
def test_bad_input_is_a_usage_error(call):
    with pytest.raises(UsageError) as info:
        call()
    assert "\n" not in str(info.value)


def test_an_ema_restored_from_its_state_continues_exactly():
    values = [4.0, 1.0, 7.5, 2.25, 3.0]
    whole, first = BiasCorrectedEMA(0.9), BiasCorrectedEMA(0.9)
    for value in values:
        whole.update(value)
    for value in values[:2]:
        first.update(value)
    resumed = BiasCorrectedEMA(0.9)
    resumed.restore(first.state())
    for value in values[2:]:
        resumed.update(value)
    assert resumed.value == whole.value and resumed.steps == 5
    with pytest.raises(UsageError, match="is not \\(finite moment, updates >= 0\\)"):
        resumed.restore((float("nan"), 3))
