"""GradientNoiseMonitor: the numbers it reads from hooks and .grad, checked against gradients
computed by hand, and the loop variations it must see through (AMP scaling, divided or summed
losses, measuring every N steps, Adam preconditioning)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from batchscope.errors import UsageError
from batchscope.probes.noise_online import GradientNoiseMonitor, NoiseSample, NoiseTracker

sys.path.insert(0, str(Path(__file__).parent))  # the shared problems live beside this file
from test_noise_problems import adam_preconditioner, analytic_noise, linear_model, linear_workload  # noqa: E402

MICRO = 4
ACCUMULATION = 8


_WORKLOAD = linear_workload()


def _micro_batches(seed: int, count: int = ACCUMULATION, size: int = MICRO):
    workload = _WORKLOAD
    generator = torch.Generator().manual_seed(seed)
    return [workload.make_batch(size, torch.device("cpu"), generator) for _ in range(count)]


def _loss(model, batch, reduction="mean"):
    squared = 0.5 * (model(batch[0]).squeeze(-1) - batch[1]) ** 2
    return squared.sum() if reduction == "sum" else squared.mean()


def _hand_computed_sample(model, batches, micro: int = MICRO) -> NoiseSample:
    """Micro-batch gradients one by one (fresh .grad each time), then their mean."""
    flat = []
    for batch in batches:
        model.zero_grad(set_to_none=True)
        _loss(model, batch).backward()
        flat.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]).double())
    model.zero_grad(set_to_none=True)
    small = float(np.mean([float(g @ g) for g in flat]))
    mean = torch.stack(flat).mean(0)
    return NoiseSample.from_norms(micro, small, micro * len(batches), float(mean @ mean))


def _run_step(monitor, model, batches, loss_scale=1.0, reduction="mean", scaler=None):
    model.zero_grad(set_to_none=True)
    for batch in batches:
        loss = _loss(model, batch, reduction) * loss_scale
        (scaler.scale(loss) if scaler is not None else loss).backward()
    return monitor.step()


def test_sample_matches_hand_computed_micro_batch_gradients():
    model = linear_model()
    batches = _micro_batches(seed=3)
    expected = _hand_computed_sample(model, batches)
    with GradientNoiseMonitor(model, MICRO, every=1) as monitor:
        sample = _run_step(monitor, model, batches)
    assert sample.b_small == MICRO and sample.b_big == MICRO * ACCUMULATION
    assert sample.sq_norm_small == pytest.approx(expected.sq_norm_small, rel=1e-5)
    assert sample.sq_norm_big == pytest.approx(expected.sq_norm_big, rel=1e-5)
    assert sample.grad_sq_norm == pytest.approx(expected.grad_sq_norm, rel=1e-4)
    assert sample.trace_sigma == pytest.approx(expected.trace_sigma, rel=1e-4)


def test_monitor_leaves_gradients_exactly_as_without_it():
    batches = _micro_batches(seed=5)
    plain = linear_model()
    for batch in batches:
        _loss(plain, batch).backward()
    watched = linear_model()
    monitor = GradientNoiseMonitor(watched, MICRO, every=1)
    for batch in batches:
        _loss(watched, batch).backward()
    for a, b in zip(plain.parameters(), watched.parameters()):
        assert torch.equal(a.grad, b.grad)
    monitor.close()
    assert all(not p._backward_hooks for p in watched.parameters())


@pytest.mark.parametrize(
    "loss_scale, reduction, multiplier",
    [(1.0 / ACCUMULATION, "mean", 1.0 / ACCUMULATION), (1.0, "sum", 1.0), (3.0, "mean", 3.0)],
)
def test_divided_summed_or_scaled_losses_give_the_same_sample(loss_scale, reduction, multiplier):
    batches = _micro_batches(seed=11)
    reference_model = linear_model()
    with GradientNoiseMonitor(reference_model, MICRO, every=1) as monitor:
        reference = _run_step(monitor, reference_model, batches)
    model = linear_model()
    with GradientNoiseMonitor(model, MICRO, every=1, loss_reduction=reduction, loss_multiplier=multiplier) as monitor:
        sample = _run_step(monitor, model, batches, loss_scale=loss_scale, reduction=reduction)
    assert sample.sq_norm_small == pytest.approx(reference.sq_norm_small, rel=1e-5)
    assert sample.sq_norm_big == pytest.approx(reference.sq_norm_big, rel=1e-5)


def test_grad_scaler_is_divided_out_and_overflowed_steps_are_skipped():
    batches = _micro_batches(seed=13)
    reference_model = linear_model()
    with GradientNoiseMonitor(reference_model, MICRO, every=1) as monitor:
        reference = _run_step(monitor, reference_model, batches)
    model = linear_model()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    with GradientNoiseMonitor(model, MICRO, every=1, scaler=scaler) as monitor:
        sample = _run_step(monitor, model, batches, scaler=scaler)
        assert sample.sq_norm_small == pytest.approx(reference.sq_norm_small, rel=1e-5)
        assert sample.sq_norm_big == pytest.approx(reference.sq_norm_big, rel=1e-5)
        overflowed = _run_step(monitor, model, batches, loss_scale=float("inf"), scaler=scaler)
        assert overflowed is None
        assert monitor.tracker.skipped == 1 and monitor.tracker.samples == 1


def test_measures_only_every_nth_step():
    model = linear_model()
    monitor = GradientNoiseMonitor(model, MICRO, every=3)
    results = [_run_step(monitor, model, _micro_batches(seed=s)) for s in range(7)]
    assert [r is not None for r in results] == [True, False, False, True, False, False, True]
    assert monitor.tracker.samples == 3
    monitor.close()


def test_one_micro_batch_per_step_records_nothing():
    model = linear_model()
    with GradientNoiseMonitor(model, MICRO, every=1) as monitor:
        assert _run_step(monitor, model, _micro_batches(seed=1, count=1)) is None
        assert monitor.estimate() is None and monitor.tracker.skipped == 0


def test_estimate_over_many_steps_covers_the_analytic_noise_scale():
    model = linear_model()
    truth = analytic_noise(model)["b_simple"]
    with GradientNoiseMonitor(model, MICRO, every=1, window=None) as monitor:
        for seed in range(200):
            _run_step(monitor, model, _micro_batches(seed=1000 + seed))
        estimate = monitor.estimate(0.99)
    assert estimate.status == "ok" and estimate.samples == 200
    assert estimate.ci_low <= truth <= estimate.ci_high
    assert truth / 2 < monitor.b_simple < truth * 2  # the EMA: noisier, same quantity


def test_adam_preconditioned_monitor_matches_the_preconditioned_analytic_value():
    model = linear_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    workload = linear_workload()
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):  # build up second moments; lr small so parameters barely move
        optimizer.zero_grad()
        workload.loss(model, workload.make_batch(16, torch.device("cpu"), generator)).backward()
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    preconditioner = adam_preconditioner(model, optimizer)
    plain, conditioned = analytic_noise(model)["b_simple"], analytic_noise(model, preconditioner)["b_simple"]
    assert abs(math.log(conditioned / plain)) > math.log(1.3)  # the variant measures something else
    with GradientNoiseMonitor(model, MICRO, every=1, window=None, optimizer=optimizer, precondition="adam") as monitor:
        for seed in range(200):
            _run_step(monitor, model, _micro_batches(seed=2000 + seed))
        estimate = monitor.estimate(0.99)
    assert estimate.ci_low <= conditioned <= estimate.ci_high
    assert abs(math.log(estimate.b_simple / conditioned)) < abs(math.log(estimate.b_simple / plain))


def test_adam_precondition_before_the_first_step_skips_the_sample():
    model = linear_model()
    optimizer = torch.optim.Adam(model.parameters())
    with GradientNoiseMonitor(model, MICRO, every=1, optimizer=optimizer, precondition="adam") as monitor:
        assert _run_step(monitor, model, _micro_batches(seed=0)) is None
        assert monitor.tracker.skipped == 1


def test_tracker_window_keeps_only_recent_samples():
    tracker = NoiseTracker(window=3)
    for value in range(1, 6):
        tracker.add(NoiseSample(1, 2, 0.0, 0.0, float(value), 10.0 * value))
    assert tracker.g2_samples == [3.0, 4.0, 5.0]
    assert tracker.estimate().b_simple == pytest.approx(10.0)


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"micro_batch_size": 0}, "micro_batch_size=0"),
        ({"micro_batch_size": 4, "every": 0}, "every=0"),
        ({"micro_batch_size": 4, "loss_reduction": "avg"}, "loss_reduction='avg'"),
        ({"micro_batch_size": 4, "precondition": "adam"}, "optimizer="),
        ({"micro_batch_size": 4, "precondition": "rmsprop"}, "precondition='rmsprop'"),
        ({"micro_batch_size": 4, "window": 1}, "window=1"),
    ],
)
def test_bad_arguments_are_usage_errors(kwargs, fragment):
    with pytest.raises(UsageError, match=fragment.replace("(", r"\(")):
        GradientNoiseMonitor(linear_model(), **kwargs)


def test_set_micro_batches_changes_the_sizes_a_step_is_read_with():
    model = linear_model()
    batches = _micro_batches(seed=9, count=4, size=8)
    expected = _hand_computed_sample(model, batches, micro=8)
    with GradientNoiseMonitor(model, MICRO, every=1) as monitor:
        monitor.set_micro_batches(8, loss_multiplier=0.25)
        sample = _run_step(monitor, model, batches, loss_scale=0.25)
    assert (sample.b_small, sample.b_big) == (8, 32)
    assert sample.grad_sq_norm == pytest.approx(expected.grad_sq_norm, rel=1e-4)
    assert sample.trace_sigma == pytest.approx(expected.trace_sigma, rel=1e-4)
    with pytest.raises(UsageError, match="micro_batch_size=0"):
        monitor.set_micro_batches(0)
    with pytest.raises(UsageError, match="loss_multiplier=True"):
        monitor.set_micro_batches(4, loss_multiplier=True)

