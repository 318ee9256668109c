"""The batch-size search against memory curves with known limits (pure logic, no torch)."""

from __future__ import annotations

import math
import random
from typing import Callable

import pytest

from batchscope.probes.memory_search import (
    AffineMemoryModel,
    LimitSearch,
    Observation,
    fit_affine,
    run_search,
    tolerance_gap,
)

MiB = 2**20
BUDGET = 2048 * MiB
Measure = Callable[[int], Observation]


def curve(
    fixed_mib: float,
    per_sample_mib: float,
    *,
    budget: int = BUDGET,
    jump_at: int | None = None,
    jump_mib: float = 0.0,
    noise: float = 0.0,
    seed: int = 0,
    oom_above: int | None = None,
) -> Measure:
    """A fake device: affine peak, optionally with a workspace jump from `jump_at` on, seeded
    relative noise (the same for a given size on every call) and an OOM above `oom_above`."""

    def measure(batch_size: int) -> Observation:
        if oom_above is not None and batch_size > oom_above:
            return Observation(batch_size, False, None)
        peak = (fixed_mib + batch_size * per_sample_mib) * MiB
        if jump_at is not None and batch_size >= jump_at:
            peak += jump_mib * MiB
        if noise:
            peak *= 1 + random.Random(seed * 1_000_003 + batch_size).gauss(0.0, noise)
        peak_bytes = int(peak)
        return Observation(batch_size, peak_bytes <= budget, peak_bytes)

    return measure


def brute_force_limit(measure: Measure, upper: int) -> int:
    """The largest fitting size by trying them all (the curves here are monotone)."""
    return max((b for b in range(1, upper + 1) if measure(b).fits), default=0)


def assert_brackets_truth(search: LimitSearch, truth: int) -> None:
    """The answer is a verified fit, never above the truth, and within the tolerance of it."""
    lo, hi = search.largest_fit, search.smallest_failure
    assert search.stop_reason == "converged"
    assert any(o.batch_size == lo and o.fits for o in search.observations)
    assert hi is not None and lo <= truth < hi
    assert hi - lo <= tolerance_gap(lo, search.tolerance)


def accelerate_style_probes(measure: Measure, start: int = 65536) -> int:
    """How many probes Accelerate's find_executable_batch_size needs: x0.9 after every OOM."""
    batch_size, probes = start, 1
    while not measure(batch_size).fits:
        batch_size = int(batch_size * 0.9)
        probes += 1
    return probes


# -- the affine model -----------------------------------------------------------------------


def test_fit_affine_recovers_a_known_line() -> None:
    points = [(b, 100 + 3 * b) for b in (1, 7, 50, 400)]
    model = fit_affine(points, weights=[b for b, _ in points])
    assert model is not None
    assert model.fixed_bytes == pytest.approx(100.0)
    assert model.bytes_per_sample == pytest.approx(3.0)


def test_fit_affine_is_least_squares() -> None:
    # Points (0, 0), (1, 1), (2, 1): the least-squares line is y = 1/6 + x/2.
    model = fit_affine([(0, 0), (1, 1), (2, 1)])
    assert model is not None
    assert model.fixed_bytes == pytest.approx(1 / 6)
    assert model.bytes_per_sample == pytest.approx(0.5)


def test_fit_affine_needs_two_distinct_sizes() -> None:
    assert fit_affine([(8, 100)]) is None
    assert fit_affine([(8, 100), (8, 120)]) is None


def test_largest_batch_under_budget() -> None:
    model = AffineMemoryModel(fixed_bytes=100, bytes_per_sample=3)
    assert model.largest_batch_under(400) == 100  # 100 + 3*100 = 400 exactly
    assert model.largest_batch_under(402) == 100
    assert model.largest_batch_under(99) == 0
    assert AffineMemoryModel(100, 0).largest_batch_under(400) is None


# -- affine curves ----------------------------------------------------------------------------


def test_affine_curve_exact_sequence() -> None:
    # fixed 100 MiB + 0.5 MiB/sample under 2 GiB: the true limit is (2048 - 100) / 0.5 = 3896.
    # 8 -> 104 MiB, so 2048 * 8 / 104 = 157 is safe whatever the split; the line through two
    # exact points predicts 3896; aim 1% under: 3857; the tolerance edge 3857 + 77 fails.
    search = run_search(curve(100, 0.5), LimitSearch(BUDGET))
    assert [o.batch_size for o in search.observations] == [8, 157, 3857, 3934]
    assert [o.fits for o in search.observations] == [True, True, True, False]
    assert search.largest_fit == 3857
    assert_brackets_truth(search, truth=3896)


@pytest.mark.parametrize(
    ("fixed_mib", "per_sample_mib"),
    [(100, 0.5), (1500, 0.05), (10, 7.3), (300, 0.001), (1900, 11.0), (5, 0.013)],
)
def test_affine_curves_take_at_most_six_probes(fixed_mib: float, per_sample_mib: float) -> None:
    truth = math.floor((2048 - fixed_mib) / per_sample_mib)
    search = run_search(curve(fixed_mib, per_sample_mib), LimitSearch(BUDGET))
    assert_brackets_truth(search, truth)
    assert len(search.observations) <= 6


def test_accelerate_style_descent_needs_many_more_probes() -> None:
    measure = curve(100, 0.5)
    ours = len(run_search(measure, LimitSearch(BUDGET)).observations)
    theirs = accelerate_style_probes(measure)
    assert theirs == 28  # 65536 * 0.9**27 = 3788 is the first fit
    assert ours * 5 < theirs


def test_a_tiny_limit_is_found_below_the_start() -> None:
    # fixed 2000 MiB + 10 MiB/sample: the limit is 4 and the start (8) fails.
    search = run_search(curve(2000, 10), LimitSearch(BUDGET))
    assert [o.batch_size for o in search.observations] == [8, 4, 5]
    assert_brackets_truth(search, truth=4)


def test_nothing_fits() -> None:
    search = run_search(curve(2040, 10), LimitSearch(BUDGET))
    assert [o.batch_size for o in search.observations] == [8, 4, 2, 1]
    assert search.largest_fit == 0
    assert search.stop_reason == "no fit"


# -- curves that are not affine ---------------------------------------------------------------


@pytest.mark.parametrize("jump_at", [64, 1000, 3000, 3290])
def test_workspace_jump_still_converges(jump_at: int) -> None:
    measure = curve(100, 0.5, jump_at=jump_at, jump_mib=300)
    truth = brute_force_limit(measure, 5000)
    search = run_search(measure, LimitSearch(BUDGET))
    assert_brackets_truth(search, truth)
    assert len(search.observations) <= 8


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_noisy_curve_converges_near_the_limit(seed: int) -> None:
    noise = 0.01
    measure = curve(100, 0.5, noise=noise, seed=seed)
    search = run_search(measure, LimitSearch(BUDGET))
    lo, hi = search.largest_fit, search.smallest_failure
    # With noise "the" limit is fuzzy; what must hold: a verified fit, a failure just above it,
    # and a place within a few noise widths of the noiseless limit (3896).
    assert search.stop_reason == "converged"
    assert measure(lo).fits and hi is not None and not measure(hi).fits
    assert hi - lo <= tolerance_gap(lo, search.tolerance)
    assert 3896 * (1 - 4 * noise) <= lo <= 3896 * (1 + 4 * noise)
    assert len(search.observations) <= 7


@pytest.mark.parametrize(("oom_above", "max_probes"), [(3800, 6), (2500, 12), (300, 15)])
def test_oom_well_below_the_budget(oom_above: int, max_probes: int) -> None:
    # The allocator fails long before the peak reaches the budget (fragmentation, another
    # process): the model is wrong at the top and only the OOMs tell the truth.
    search = run_search(curve(100, 0.5, oom_above=oom_above), LimitSearch(BUDGET))
    assert_brackets_truth(search, truth=oom_above)
    assert len(search.observations) <= max_probes


def test_concave_curve_that_the_model_underestimates() -> None:
    # Memory that grows slower than the line through the small probes predicts: each probe at
    # the tolerance edge fits, so the step doubles instead of crawling by 2%.
    def measure(batch_size: int) -> Observation:
        peak = int((100 + 20 * math.sqrt(batch_size)) * MiB)
        return Observation(batch_size, peak <= BUDGET, peak)

    truth = math.floor(((2048 - 100) / 20) ** 2)
    search = run_search(measure, LimitSearch(BUDGET))
    assert_brackets_truth(search, truth)
    assert len(search.observations) <= 12


# -- bounds and invariants --------------------------------------------------------------------


def test_user_cap_stops_the_search_and_is_never_exceeded() -> None:
    search = run_search(curve(100, 0.5), LimitSearch(BUDGET, max_batch_size=500))
    assert search.stop_reason == "capped"
    assert search.largest_fit == 500
    assert max(o.batch_size for o in search.observations) == 500


def test_cap_above_the_limit_changes_nothing() -> None:
    search = run_search(curve(100, 0.5), LimitSearch(BUDGET, max_batch_size=100_000))
    assert [o.batch_size for o in search.observations] == [8, 157, 3857, 3934]


def test_probe_limit_is_reported() -> None:
    search = run_search(curve(100, 0.5, oom_above=300), LimitSearch(BUDGET, max_probes=3))
    assert len(search.observations) == 3
    assert search.stop_reason == "probe limit"


@pytest.mark.parametrize(
    "measure",
    [curve(100, 0.5), curve(100, 0.5, jump_at=1000, jump_mib=300), curve(100, 0.5, noise=0.02),
     curve(100, 0.5, oom_above=777), curve(1999, 1.0)],
)
def test_every_proposal_is_new_and_inside_the_bracket(measure: Measure) -> None:
    search = LimitSearch(BUDGET)
    while (batch_size := search.propose()) is not None:
        lo, hi = search.largest_fit, search.smallest_failure
        assert batch_size > lo and (hi is None or batch_size < hi) and batch_size >= 1
        outcome = measure(batch_size)
        search.record(batch_size, outcome.fits, outcome.peak_bytes)
    sizes = [o.batch_size for o in search.observations]
    assert len(sizes) == len(set(sizes))
    assert search.propose() is None  # stays stopped


def test_looser_tolerance_needs_fewer_probes() -> None:
    measure = curve(100, 0.5, oom_above=2500)
    fine = run_search(measure, LimitSearch(BUDGET, tolerance=0.01))
    coarse = run_search(measure, LimitSearch(BUDGET, tolerance=0.2))
    assert_brackets_truth(fine, 2500)
    assert_brackets_truth(coarse, 2500)
    assert len(coarse.observations) < len(fine.observations)


@pytest.mark.parametrize(
    "kwargs", [{"budget_bytes": 0}, {"tolerance": 0.0}, {"tolerance": 1.0}, {"start": 0},
               {"max_batch_size": 0}],
)
def test_invalid_search_settings(kwargs: dict) -> None:
    settings = {"budget_bytes": BUDGET, **kwargs}
    with pytest.raises(ValueError):
        LimitSearch(**settings)
