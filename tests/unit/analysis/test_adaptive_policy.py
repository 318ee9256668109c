"""BatchSizePolicy against time-to-target computed here from the formula, independently of the
goodput module: t(B) = k(B) * step(ceil(B/k)) * (B + B_noise) / B up to a constant, with an affine
step time and k the accumulation."""

from __future__ import annotations

import math

import pytest

from batchscope.analysis.adaptive_policy import BatchSizePolicy
from batchscope.analysis.throughput_model import fit_throughput_model
from batchscope.errors import UsageError

# Affine step time a + b*m: the optimum of (B + Bn) (a + b B) / B is sqrt(a Bn / b).
A, B = 0.010, 1e-5
MEASURED = [8, 16, 32, 64, 128, 256, 512, 1024]
CANDIDATES = [32, 64, 128, 256, 512, 1024, 2048, 4096]
STEP_TIME = fit_throughput_model(MEASURED, [A + B * m for m in MEASURED])


def time_to_target(batch: int, noise: float, max_fit: int = 4096) -> float:
    steps = math.ceil(batch / max_fit)
    micro = math.ceil(batch / steps)
    return steps * (A + B * micro) * (batch + noise) / batch


def policy(**options) -> BatchSizePolicy:
    options.setdefault("max_fit_batch_size", 4096)
    return BatchSizePolicy(STEP_TIME, CANDIDATES, reference_batch_size=128, **options)


def best(noise: float, candidates=CANDIDATES) -> int:
    return min(candidates, key=lambda b: (time_to_target(b, noise), b))


def test_the_unbraked_optimum_is_the_formulas_argmin():
    for noise in (50, 400, 2_000, 20_000, 200_000):
        decision = policy().decide(32, noise)
        assert decision.optimum == best(noise)


def test_growth_is_capped_at_max_growth_per_change_and_reports_the_formulas_gain():
    noise = 200_000.0  # optimum sqrt(0.01 * 2e5 / 1e-5) ~ 14k: the largest candidate
    decision = policy().decide(64, noise)
    assert decision.changed and decision.batch_size == 128
    assert decision.predicted_gain == pytest.approx(time_to_target(64, noise) / time_to_target(128, noise) - 1)
    wider = policy(max_growth=8.0).decide(64, noise)
    assert wider.batch_size == 512


def test_within_reach_the_policy_moves_to_the_optimum_itself():
    noise = 20_000.0  # sqrt(0.01 * 2e4 / 1e-5) ~ 4472 -> 4096
    assert best(noise) == 4096
    assert policy().decide(2048, noise).batch_size == 4096


def test_growth_only_by_default_and_shrinking_when_allowed():
    noise = 50.0  # optimum sqrt(0.01 * 50 / 1e-5) ~ 224 -> 256
    kept = policy().decide(1024, noise)
    assert not kept.changed and kept.optimum == 256 and "growth only" in kept.reason
    shrunk = policy(allow_shrink=True).decide(1024, noise)
    assert shrunk.batch_size == 512 and shrunk.predicted_gain > 0


def test_a_gain_under_min_gain_is_not_worth_a_change():
    noise = 250.0  # optimum sqrt(0.01 * 250 / 1e-5) = 500 -> 512
    current = 256
    target = best(noise)
    assert target == 512
    gain = time_to_target(current, noise) / time_to_target(target, noise) - 1
    assert 0 < gain < 0.5
    assert not policy(min_gain=gain + 0.01).decide(current, noise).changed
    assert policy(min_gain=gain - 0.01).decide(current, noise).batch_size == target


def test_accumulating_past_memory_never_pays_so_the_policy_stops_at_what_fits():
    # k micro-steps of t(m) for k*m examples: per-example time no better than one step of m,
    # and statistical efficiency only falls, whatever the noise scale.
    for noise in (1_000.0, 200_000.0):
        decision = policy(max_fit_batch_size=256).decide(256, noise)
        assert not decision.changed and decision.optimum == 256
        assert time_to_target(512, noise, 256) > time_to_target(256, noise, 256)


def test_a_batch_in_use_beyond_memory_is_split_into_the_fewest_micro_batches():
    decision = policy(max_fit_batch_size=256).decide(600, None)
    assert (decision.batch_size, decision.micro_batch_size, decision.accumulation) == (600, 200, 3)


@pytest.mark.parametrize("noise", [None, float("nan"), float("inf"), 0.0, -5.0])
def test_without_a_usable_noise_scale_the_batch_stays(noise):
    decision = policy().decide(128, noise)
    assert not decision.changed and decision.optimum is None and decision.predicted_gain == 0.0


def test_repeated_decisions_as_the_noise_scale_grows_climb_monotonically_to_the_optimum():
    rule = policy()
    batch, seen = 32, [32]
    for noise in [100 * 1.3**i for i in range(40)]:
        batch = rule.decide(batch, noise).batch_size
        seen.append(batch)
    assert seen == sorted(seen)
    assert all(b <= 2 * a for a, b in zip(seen, seen[1:]))
    assert batch == best(100 * 1.3**39)


@pytest.mark.parametrize("options, fragment", [
    ({"max_growth": 1.0}, "max_growth=1.0"),
    ({"min_gain": 1.5}, "min_gain=1.5"),
    ({"max_fit_batch_size": 0}, "max_fit_batch_size"),
])
def test_bad_settings_are_one_line_usage_errors(options, fragment):
    with pytest.raises(UsageError, match=fragment):
        policy(**options)


def test_no_candidates_is_a_usage_error():
    with pytest.raises(UsageError, match="candidates is empty"):
        BatchSizePolicy(STEP_TIME, [], max_fit_batch_size=64, reference_batch_size=32)


def test_the_all_reduce_per_step_counts_in_the_policys_plan():
    sizes = [2 ** k for k in range(3, 13)]
    step_time = fit_throughput_model(sizes, [0.002 + 1e-5 * b for b in sizes])
    plain = BatchSizePolicy(step_time, sizes, max_fit_batch_size=4096, reference_batch_size=64,
                            max_growth=64.0, min_gain=0.0)
    synced = BatchSizePolicy(step_time, sizes, max_fit_batch_size=4096, reference_batch_size=64,
                             max_growth=64.0, min_gain=0.0, sync_seconds=0.006)
    # Overhead 2 ms vs 8 ms with the all-reduce: optimum sqrt(a B_noise / b) = 141 vs 283
    # at B_noise 100, so powers of two 128 vs 256.
    assert plain.decide(8, 100.0).optimum == 128
    assert synced.decide(8, 100.0).optimum == 256


@pytest.mark.parametrize("batch, every", [
    (512, 23),     # affine a + b m: a measured step costs a more, a / (a + 512 b) = 66% -> 22.05
    (32, 33),      # launch-bound: the split almost doubles the step (97%) -> 32.3
    (4096, 10),    # 20% extra -> 6.5, but never more often than the monitor's default
    (8192, 10),    # accumulated anyway: the measured step splits no further, nothing extra
])
def test_measured_steps_are_spaced_to_keep_their_split_under_three_percent(batch, every):
    extra = A / (A + B * batch) if batch <= 4096 else 0.0
    assert math.ceil(extra / 0.03) == every or every == 10
    assert policy().measurement_interval(batch) == every


def test_the_measurement_interval_is_capped_so_the_noise_scale_is_still_followed():
    assert policy().measurement_interval(32, max_overhead=0.005) == 100  # 194 uncapped
    with pytest.raises(UsageError, match="max_overhead"):
        policy().measurement_interval(32, max_overhead=0)
