"""How tune spends its noise probe (`tune_noise`), on hand-made step times and estimates: the
training before measuring does not follow the budget once the budget affords it, the sample
ceiling does, and sampling stops once the decision is the same across the interval."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from batchscope import tune_noise, tuning
from batchscope.analysis.goodput import plan_batch_size
from batchscope.analysis.noise_stats import NoiseScaleEstimate
from batchscope.analysis.throughput_model import fit_throughput_model
from batchscope.tune_noise import NoisePlan, SettledDecision, plan_noise_probe, standard_train_steps
from batchscope.workload import Workload


def _workload(reference: int = 128, dataset_size: int | None = 50_000) -> Workload:
    def make_batch(batch_size, device, generator):
        return torch.zeros(batch_size, 2), torch.zeros(batch_size, dtype=torch.long)

    return Workload(
        name="fake", build_model=lambda device: nn.Linear(2, 2),
        build_optimizer=lambda params, lr: torch.optim.SGD(params, lr=lr),
        loss=lambda model, batch: model(batch[0]).sum(), make_batch=make_batch,
        reference_batch_size=reference, reference_lr=0.1, dataset_size=dataset_size)


def ten_ms(batch_size: int) -> float:
    return 0.01  # launch-bound: every batch takes 10 ms


def test_standard_training_is_half_an_epoch_or_a_fixed_count():
    assert standard_train_steps(_workload()) == 195  # 0.5 * 50000 / 128 = 195.3
    assert standard_train_steps(_workload(dataset_size=None)) == tune_noise.NOISE_TRAIN_STEPS_WITHOUT_DATASET
    assert standard_train_steps(_workload(reference=128, dataset_size=100)) == 1


def test_a_budget_that_affords_the_half_epoch_does_not_change_the_training():
    # Fixed 3 s; a sample is 4 micro-steps * 1.5 = 60 ms.
    roomy = plan_noise_probe(_workload(), ten_ms, remaining_s=100.0, limit=4096)
    tight = plan_noise_probe(_workload(), ten_ms, remaining_s=10.0, limit=4096)
    assert roomy == NoisePlan(train_steps=195, standard_train_steps=195, samples=200)
    # 10 s: usable 7 s, 35% = 2.45 s affords 245 steps > 195; samples 0.6 * (7 - 1.95) / 0.06.
    assert tight == NoisePlan(train_steps=195, standard_train_steps=195, samples=50)
    assert not roomy.budget_limited and not tight.budget_limited


def test_a_short_budget_trains_less_and_says_it_is_limited():
    plan = plan_noise_probe(_workload(), ten_ms, remaining_s=5.0, limit=4096)
    # usable 2 s: 0.7 s of training = 70 steps; the samples it leaves (13) are below the floor.
    # The floor's 16 samples (0.96 s) still fit the 5 s with the 3 s fixed and 0.7 s of training.
    assert (plan.train_steps, plan.samples, plan.shortfall) == (70, tune_noise.MIN_NOISE_SAMPLES, None)
    assert plan.budget_limited


def test_a_minimum_that_overruns_the_budget_says_by_how_much():
    # 1 s steps, as a ResNet-18 on two CPU cores: a sample costs 6 s, the minimum 96 s + 3 s.
    plan = plan_noise_probe(_workload(), lambda b: 1.0, remaining_s=27.0, limit=4096)
    assert (plan.train_steps, plan.samples) == (8, tune_noise.MIN_NOISE_SAMPLES)
    # 3 s fixed + 8 steps of 1 s + 16 samples of 6 s = 107 s, 80 s over the 27 s left.
    assert "left 27s of the budget" in plan.shortfall
    assert "about 107s, 80s over the budget" in plan.shortfall


def test_the_time_kept_for_the_data_path_check_is_named_in_the_overrun():
    # 4 s left, 3 s of them kept for the data-path check: the 1 s for the noise probe is what
    # the overrun is counted against (a tune that ended inside its budget said "3s over").
    plan = plan_noise_probe(_workload(), ten_ms, remaining_s=4.0, limit=4096, reserved_s=3.0)
    assert plan.train_steps == 0 and plan.samples == tune_noise.MIN_NOISE_SAMPLES
    assert ("left 4s of the budget, 3s of it kept for the data-path check at the recommended "
            "batch; the noise probe takes 16 samples anyway (about 4s, 3s over the budget"
            in plan.shortfall), plan.shortfall


def test_a_spent_budget_still_buys_the_minimum_and_says_why():
    plan = plan_noise_probe(_workload(), ten_ms, remaining_s=2.0, limit=4096)
    assert (plan.train_steps, plan.samples) == (0, tune_noise.MIN_NOISE_SAMPLES)
    assert "left 2s of the budget" in plan.shortfall and "raise --budget" in plan.shortfall


def test_seconds_kept_for_later_stages_come_off_the_noise_probe():
    kept = plan_noise_probe(_workload(), ten_ms, remaining_s=12.0, limit=4096, reserved_s=2.0)
    assert kept == plan_noise_probe(_workload(), ten_ms, remaining_s=10.0, limit=4096)


def test_a_reference_batch_that_does_not_fit_is_priced_as_accumulated_steps():
    # limit 50: a reference step is ceil(128 / 50) = 3 steps of 10 ms; usable 47 s, 35% -> 548.
    plan = plan_noise_probe(_workload(), ten_ms, remaining_s=50.0, limit=50)
    assert plan.train_steps == 195
    short = plan_noise_probe(_workload(), ten_ms, remaining_s=5.0, limit=50)
    assert short.train_steps == int(0.35 * 2.0 / 0.03)


def test_no_step_time_gives_the_minimum_without_training_and_does_not_blame_the_budget():
    plan = plan_noise_probe(_workload(), lambda b: math.inf, remaining_s=100.0, limit=4096)
    assert (plan.train_steps, plan.samples) == (0, tune_noise.MIN_NOISE_SAMPLES)
    assert "no step time" in plan.shortfall and not plan.budget_limited


def _estimate(b, low, high, samples=40, status="ok"):
    return NoiseScaleEstimate(b_simple=b, ci_low=low, ci_high=high, grad_sq_norm=1.0,
                              trace_sigma=b, samples=samples, status=status, detail="",
                              confidence=0.9, blocks=20)


@pytest.mark.parametrize("estimate, settled", [
    (_estimate(260, 200, 340), True),                 # 512 throughout
    (_estimate(260, 200, 600), False),                # the upper end picks 1024
    (_estimate(500, 300, 600), False),                # so does the estimate
    (_estimate(260, 200, math.inf), False),           # unbounded above
    (_estimate(260, 200, 340, samples=15), False),    # too few samples to trust
    (_estimate(260, 200, 340, status="unstable"), False),
    (_estimate(700, 600, 900), True),                 # 1024 throughout
    (_estimate(None, 600, math.inf, status="lower_bound"), True),   # at least 600: 1024 anyway
    (_estimate(900, 300, math.inf, status="lower_bound"), False),   # 512 at 300, 1024 beyond
    (_estimate(None, 600, math.inf, samples=15, status="lower_bound"), False),
    (_estimate(None, -math.inf, math.inf, status="unstable"), False),
])
def test_sampling_is_settled_when_the_decision_is_the_same_across_the_interval(estimate, settled):
    decide = lambda noise: 512 if noise < 480 else 1024  # noqa: E731
    assert SettledDecision(decide)(estimate) is settled


@pytest.mark.parametrize("target", ["time", "examples"])
def test_the_planned_batch_never_falls_as_the_noise_scale_grows(target):
    # Why an interval's two ends settle it: over random throughput curves, with tune's own
    # candidates (accumulated beyond the memory limit; the "examples" target's filter), the
    # planned batch is non-decreasing in B_noise.
    rng = np.random.default_rng(0)
    sizes = 2 ** np.arange(3, 13)
    workload = SimpleNamespace(reference_batch_size=128, dataset_size=50_000)
    throughput = SimpleNamespace(points=[SimpleNamespace(batch_size=int(b)) for b in sizes])
    limit = 1000  # below the largest candidates, which are then accumulated
    for _ in range(40):
        fixed, per_sample = rng.uniform(1e-3, 5e-2), rng.uniform(1e-6, 1e-4)
        seconds = (fixed + per_sample * sizes) * rng.uniform(0.5, 1.5, sizes.size)
        model = fit_throughput_model(sizes, seconds)
        picks = []
        # A practically unlimited noise scale last: one-sided estimates are settled against it.
        for noise in [*np.geomspace(10, 50_000, 60), tune_noise.unlimited_noise_scale(50_000)]:
            candidates = tuning._candidates(workload, throughput, limit, target, noise, floor=32)
            picks.append(plan_batch_size(candidates, model, noise, max_fit_batch_size=limit,
                                         reference_batch_size=128).batch_size)
        assert all(a <= b for a, b in zip(picks, picks[1:])), picks
