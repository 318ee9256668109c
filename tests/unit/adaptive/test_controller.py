"""AdaptiveBatchSize in a real loop on the linear problem with known gradients: the accumulated
gradient is the whole batch's, measured steps read the right micro-batch norms, the LR of every
step follows the rule and the schedule from the batch actually used, and the batch grows when the
policy says so, at the sampler's next batch."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from batchscope.adaptive import AdaptiveBatchSize, BatchSizePolicy, ExampleSchedule
from batchscope.analysis.throughput_model import fit_throughput_model
from batchscope.errors import UsageError
from batchscope.probes.noise_online import NoiseSample

sys.path.insert(0, str(Path(__file__).parents[1] / "probes"))
from test_noise_problems import (  # noqa: E402
    N_EXAMPLES, linear_data, linear_model, linear_workload_at_the_optimum)

CANDIDATES = [8, 16, 32, 64, 128]


def step_time(overhead: float = 1.0, per_example: float = 1e-6):
    sizes = [8, 16, 32, 64, 128]
    return fit_throughput_model(sizes, [overhead + per_example * m for m in sizes])


def make(model, *, batch_size=8, max_fit=128, lr_rule="linear", schedule=None, groups=None,
         step_time=step_time(), **options):
    optimizer = torch.optim.SGD(groups or model.parameters(), lr=0.01)
    policy = BatchSizePolicy(step_time, CANDIDATES, max_fit_batch_size=max_fit, reference_batch_size=16)
    return AdaptiveBatchSize(model, optimizer, policy, batch_size=batch_size, base_batch_size=16,
                             base_lr=0.01, lr_rule=lr_rule, schedule=schedule, **options), optimizer


def loss(model, batch):
    inputs, targets = batch
    return (0.5 * (model(inputs).squeeze(-1) - targets) ** 2).mean()


def flat_grad(model) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()]).double()


def full_batch_grad(indices) -> torch.Tensor:
    x, y = linear_data()
    model = linear_model()
    loss(model, (x[indices], y[indices])).backward()
    return flat_grad(model)


def run_step(adaptive, model, batch):
    for micro, weight in adaptive.micro_batches(batch):
        (weight * loss(model, micro)).backward()
    return adaptive.step()


@pytest.mark.parametrize("size, max_fit, measure_every", [(32, 8, 1), (30, 8, 10), (16, 64, 1), (16, 64, 10)])
def test_the_accumulated_gradient_is_the_whole_batch_gradient(size, max_fit, measure_every):
    x, y = linear_data()
    model = linear_model()
    adaptive, _ = make(model, max_fit=max_fit, measure_every=measure_every)
    indices = torch.arange(3, 3 + size)
    run_step(adaptive, model, (x[indices], y[indices]))
    assert torch.allclose(flat_grad(model), full_batch_grad(indices), rtol=1e-5, atol=1e-7)


def test_a_measured_step_is_split_in_two_halves_and_reads_their_norms():
    x, y = linear_data()
    model = linear_model()
    adaptive, _ = make(model, max_fit=64, measure_every=1)
    indices = torch.arange(10, 26)
    run_step(adaptive, model, (x[indices], y[indices]))
    halves = [full_batch_grad(indices[:8]), full_batch_grad(indices[8:])]
    mean = (halves[0] + halves[1]) / 2
    expected = NoiseSample.from_norms(8, float(np.mean([float(h @ h) for h in halves])), 16, float(mean @ mean))
    tracker = adaptive.monitor.tracker
    assert tracker.samples == 1
    assert tracker.g2_samples[-1] == pytest.approx(expected.grad_sq_norm, rel=1e-4)
    assert tracker.trace_samples[-1] == pytest.approx(expected.trace_sigma, rel=1e-4)


def test_a_batch_that_cannot_be_split_evenly_moves_the_measurement_to_the_next_step():
    x, y = linear_data()
    model = linear_model()
    adaptive, optimizer = make(model, measure_every=10)
    run_step(adaptive, model, (x[:11], y[:11]))  # 11 is prime: no 2..8 equal micro-batches
    assert adaptive.monitor.tracker.samples == 0
    optimizer.zero_grad()
    run_step(adaptive, model, (x[:8], y[:8]))  # step 1 of 10, measured in its place
    assert adaptive.monitor.tracker.samples == 1


def test_a_batch_size_that_never_splits_evenly_is_warned_about():
    x, y = linear_data()
    model = linear_model()
    adaptive, optimizer = make(model, measure_every=1)
    with pytest.warns(UserWarning, match="batch size 11 has not split into equal micro-batches"):
        for _ in range(20):
            run_step(adaptive, model, (x[:11], y[:11]))
            optimizer.zero_grad()
    assert adaptive.monitor.tracker.samples == 0


def test_every_steps_lr_is_base_times_rule_times_schedule_for_the_batch_it_trains_on():
    x, y = linear_data()
    model = linear_model()
    groups = [{"params": [model.weight], "lr": 0.01}, {"params": [model.bias], "lr": 0.001}]
    schedule = ExampleSchedule(total_examples=320, warmup_examples=40)
    adaptive, optimizer = make(model, batch_size=32, schedule=schedule, groups=groups, lr_rule="sqrt")
    seen = 0
    for size in (32, 32, 24, 32):
        run_step(adaptive, model, (x[:size], y[:size]))
        if seen < 40:
            multiplier = min(1.0, (seen + size) / 40)
        else:
            multiplier = 0.5 * (1 + math.cos(math.pi * (seen - 40) / 280))
        expected = 0.01 * math.sqrt(size / 16) * multiplier
        assert optimizer.param_groups[0]["lr"] == pytest.approx(expected)
        assert optimizer.param_groups[1]["lr"] == pytest.approx(expected / 10)
        optimizer.step()
        optimizer.zero_grad()
        seen += size
    assert adaptive.examples_seen == seen and adaptive.steps == 4


def test_the_batch_doubles_at_each_decision_and_the_sampler_serves_the_new_size_next():
    x, y = linear_data()
    model = linear_model()
    adaptive, optimizer = make(model, batch_size=8, measure_every=1, decide_every=4, min_samples=2)
    loader = DataLoader(TensorDataset(x, y), batch_sampler=adaptive.batch_sampler(N_EXAMPLES, seed=0))
    sizes, decisions = [], []
    for epoch in range(5):
        for batch in loader:
            sizes.append(len(batch[0]))
            decision = run_step(adaptive, model, batch)
            if decision is not None:
                decisions.append(decision)
            optimizer.step()
            optimizer.zero_grad()
    # Step time is all overhead, so the optimum is the largest candidate: 8 -> 16 -> ... -> 128.
    assert [c["batch_size"] for c in adaptive.changes] == [16, 32, 64, 128]
    assert [c["step"] for c in adaptive.changes] == [4, 8, 12, 16]
    assert sizes[:4] == [8] * 4 and sizes[4:8] == [16] * 4 and sizes[8:10] == [32, 32]
    assert all(c["noise_scale"] > 0 and c["predicted_gain"] >= 0.05 for c in adaptive.changes)
    assert adaptive.examples_seen == sum(sizes) == 5 * N_EXAMPLES
    assert decisions[-1].batch_size == 128 and not decisions[-1].changed


def test_a_resume_continues_right_after_the_last_trained_batch_not_the_loaders_read_ahead():
    x, y = linear_data()
    schedule = ExampleSchedule(total_examples=1000)
    model = linear_model()
    adaptive, optimizer = make(model, schedule=schedule, measure_every=1, decide_every=2, min_samples=1)
    sampler = adaptive.batch_sampler(N_EXAMPLES, seed=4)
    drawn = iter(sampler)
    trained = [next(drawn) for _ in range(5)]
    read_ahead = [next(drawn), next(drawn)]  # drawn by a prefetching loader, never trained
    for indices in trained:
        run_step(adaptive, model, (x[indices], y[indices]))
        optimizer.zero_grad()
    state = adaptive.state_dict()
    # The natural order on a restart: load the state, then build the loader's sampler.
    resumed, _ = make(linear_model(), schedule=schedule)
    resumed.load_state_dict(state)
    rest = list(resumed.batch_sampler(N_EXAMPLES, seed=4))
    assert (resumed.batch_size, resumed.steps) == (adaptive.batch_size, adaptive.steps)
    assert resumed.changes == adaptive.changes and resumed.examples_seen == adaptive.examples_seen
    assert rest[0][:len(read_ahead[0])] == read_ahead[0][:len(rest[0])]
    epoch = [i for batch in trained + rest for i in batch]
    assert sorted(epoch) == list(range(N_EXAMPLES))  # the epoch completes, nothing twice
    assert resumed.learning_rate(32) == adaptive.learning_rate(32)


def _train(adaptive, model, optimizer, x, y, steps=None):
    """Train through the adaptive sampler (up to `steps` steps); the sizes trained."""
    sizes = []
    for indices in adaptive.batch_sampler(N_EXAMPLES, seed=1):
        if steps is not None and len(sizes) == steps:
            break
        run_step(adaptive, model, (x[indices], y[indices]))
        optimizer.step()
        optimizer.zero_grad()
        sizes.append(len(indices))
    return sizes


@pytest.mark.parametrize("keep_monitor", [True, False])
def test_a_resumed_run_takes_the_decisions_an_uninterrupted_one_takes(keep_monitor):
    x, y = linear_data()
    settings = dict(schedule=ExampleSchedule(total_examples=900), measure_every=2, decide_every=3,
                    min_samples=3, step_time=step_time(overhead=1e-3, per_example=2e-5))

    def fresh():
        model = linear_model()
        adaptive, optimizer = make(model, **settings)
        return adaptive, model, optimizer

    whole, model, optimizer = fresh()
    sizes = _train(whole, model, optimizer, x, y)

    first, model, optimizer = fresh()
    head = _train(first, model, optimizer, x, y, steps=7)  # mid-phase: step 7 is not measured
    state, weights, moments = first.state_dict(), model.state_dict(), optimizer.state_dict()
    if not keep_monitor:
        state.pop("monitor")  # what a resume did before the monitor's state was kept
    second, model, optimizer = fresh()
    model.load_state_dict(weights)
    optimizer.load_state_dict(moments)
    second.load_state_dict(state)
    tail = _train(second, model, optimizer, x, y)

    assert head + tail == sizes if keep_monitor else head + tail != sizes
    assert (second.history == whole.history) is keep_monitor
    assert whole.changes and whole.history[-1]["noise_scale"] is not None
    if keep_monitor:
        assert second.monitor.b_simple == whole.monitor.b_simple
        assert second.monitor.tracker.samples == whole.monitor.tracker.samples


def test_finished_ends_a_drop_last_loop_after_the_planned_epochs():
    x, y = linear_data()
    model = linear_model()
    adaptive, optimizer = make(model, batch_size=48, schedule=ExampleSchedule(total_examples=2 * N_EXAMPLES))
    sampler = adaptive.batch_sampler(N_EXAMPLES, drop_last=True)
    passes = 0
    while not adaptive.finished:
        for indices in sampler:
            run_step(adaptive, model, (x[indices], y[indices]))
            optimizer.zero_grad()
        passes += 1
        assert passes <= 2
    assert passes == 2 and adaptive.examples_seen == 2 * 144


def test_the_lr_is_set_before_the_backward_passes_so_optimizer_step_may_come_first():
    x, y = linear_data()
    model = linear_model()
    groups = [{"params": [model.weight], "lr": 0.0}, {"params": [model.bias], "lr": 0.01}]
    schedule = ExampleSchedule(total_examples=640, warmup_examples=320)
    adaptive, optimizer = make(model, batch_size=32, schedule=schedule, groups=groups)
    for step in range(3):
        for micro, weight in adaptive.micro_batches((x[:32], y[:32])):
            (weight * loss(model, micro)).backward()
        expected = 0.01 * 2 * (32 * (step + 1)) / 320
        assert optimizer.param_groups[1]["lr"] == pytest.approx(expected)
        assert optimizer.param_groups[0]["lr"] == 0.0  # a frozen group stays frozen
        optimizer.step()  # the scheduler-style order: optimizer first
        adaptive.step()
        optimizer.zero_grad()


def test_loop_order_mistakes_are_caught_at_once():
    x, y = linear_data()
    model = linear_model()
    adaptive, optimizer = make(model, measure_every=1)
    for micro, weight in adaptive.micro_batches((x[:16], y[:16])):
        (weight * loss(model, micro)).backward()
    with pytest.raises(UsageError, match="micro_batches\\(\\) was called twice"):
        next(adaptive.micro_batches((x[:16], y[:16])))
    optimizer.zero_grad(set_to_none=True)
    with pytest.raises(UsageError, match="before optimizer.zero_grad"):
        adaptive.step()


def test_close_removes_the_hooks():
    model = linear_model()
    adaptive, _ = make(model)
    assert model.weight._backward_hooks
    with adaptive:
        pass
    assert not model.weight._backward_hooks and not model.bias._backward_hooks


def test_loop_mistakes_and_bad_settings_are_one_line_usage_errors():
    model = linear_model()
    adaptive, _ = make(model)
    with pytest.raises(UsageError, match="step\\(\\) came before micro_batches"):
        adaptive.step()
    with pytest.raises(UsageError, match="cannot split a batch of type str"):
        next(adaptive.micro_batches("images"))
    with pytest.raises(UsageError, match="lr_rule='adascale' needs noise_scale"):
        make(linear_model(), lr_rule="adascale")
    with pytest.raises(UsageError, match="base_lr=0"):
        AdaptiveBatchSize(model, torch.optim.SGD(model.parameters(), lr=0.1),
                          BatchSizePolicy(step_time(), CANDIDATES, max_fit_batch_size=8, reference_batch_size=16),
                          batch_size=8, base_batch_size=16, base_lr=0)
    with pytest.raises(UsageError, match="not an AdaptiveBatchSize state of version 1 \\(got version None"):
        adaptive.load_state_dict({"batch_size": 8})
    with pytest.raises(UsageError, match="missing \\['position'\\]"):
        adaptive.load_state_dict({k: v for k, v in adaptive.state_dict().items() if k != "position"})


def test_adascale_follows_the_latest_measured_noise_scale():
    x, y = linear_data()
    model = linear_model()
    adaptive, optimizer = make(model, batch_size=64, lr_rule="adascale", noise_scale=1e9,
                               measure_every=1, decide_every=3, min_samples=1)
    run_step(adaptive, model, (x[:64], y[:64]))
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.01 * 4, rel=1e-6)  # noise ~inf: linear
    optimizer.zero_grad()
    for _ in range(2):
        run_step(adaptive, model, (x[:64], y[:64]))
        optimizer.zero_grad()
    noise = adaptive.last_decision.noise_scale
    run_step(adaptive, model, (x[:64], y[:64]))
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.01 * (noise / 16 + 1) / (noise / 64 + 1))


def _tune_result(warmup_steps: int, warmup_epochs: float, target: str = "time", world_size: int = 1,
                 base_batch_size: int = 16):
    """The parts of a TuneResult that from_tune reads (a real one: tests/integration)."""
    from types import SimpleNamespace

    from batchscope.recommend import Recommendation

    rec = Recommendation(batch_size=32 * world_size, per_device_batch_size=32, grad_accumulation=1,
                         learning_rate=0.02, lr_rule="linear", warmup_steps=warmup_steps,
                         predicted_speedup_vs_reference=1.5, base_batch_size=base_batch_size,
                         base_learning_rate=0.01, world_size=world_size)
    return SimpleNamespace(
        recommendation=rec, step_time=step_time(), candidates=tuple(CANDIDATES), target=target,
        plan=SimpleNamespace(curve=[SimpleNamespace(batch_size=b) for b in CANDIDATES], noise_scale=40.0),
        memory=SimpleNamespace(recommended_batch_size=64),
        record=SimpleNamespace(workload={"dataset_size": N_EXAMPLES, "schedule": "cosine",
                                         "warmup_epochs": warmup_epochs}))


@pytest.mark.parametrize("warmup_steps, warmup_epochs, expected", [(5, 0.0, 160), (5, 2.0, 320), (0, 0.5, 80)])
def test_from_tune_starts_at_the_recommendation_with_the_longer_warmup(warmup_steps, warmup_epochs, expected):
    model = linear_model()
    adaptive = AdaptiveBatchSize.from_tune(_tune_result(warmup_steps, warmup_epochs), model,
                                           torch.optim.SGD(model.parameters(), lr=0.1), epochs=3)
    assert adaptive.batch_size == 32 and adaptive.lr_rule == "linear" and adaptive.base_lr == 0.01
    assert adaptive.schedule == ExampleSchedule(total_examples=3 * N_EXAMPLES, warmup_examples=expected)
    assert adaptive.policy.max_fit == 64 and adaptive.policy.candidates == CANDIDATES
    with pytest.raises(UsageError, match="epochs=0"):
        AdaptiveBatchSize.from_tune(_tune_result(0, 0.0), model, torch.optim.SGD(model.parameters(), lr=0.1), epochs=0)


def test_a_tune_planned_for_four_devices_run_on_one_restarts_from_the_one_device_optimum():
    model = linear_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    adaptive = AdaptiveBatchSize.from_tune(_tune_result(0, 0.0, world_size=4), model, optimizer, epochs=1)
    # Its 128 = 4 x 32 is not one device's batch: the policy's optimum for one device at the
    # tuned noise scale is (overhead-only step time: the largest candidate that fits).
    expected = adaptive.policy.decide(32, 40.0).optimum
    assert adaptive.batch_size == expected == 64
    same = AdaptiveBatchSize.from_tune(_tune_result(0, 0.0), model, optimizer, epochs=1)
    assert same.batch_size == 32  # planned for this world size: taken as it is
    # The all-reduce tune timed on 4 ranks does not hold on 1; on as many ranks it is kept.
    assert adaptive.policy.sync_seconds == 0.0
    timed = _tune_result(0, 0.0)
    timed.plan.sync_seconds = 0.004
    assert AdaptiveBatchSize.from_tune(timed, model, optimizer, epochs=1).policy.sync_seconds == 0.004


def test_training_on_fewer_examples_than_tune_saw_keeps_every_batch_within_them():
    model = linear_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    adaptive = AdaptiveBatchSize.from_tune(_tune_result(0, 0.0), model, optimizer, epochs=1, dataset_size=20)
    assert adaptive.policy.candidates == [8, 16] and adaptive.batch_size == 16  # not tune's 32
    with pytest.raises(UsageError, match="dataset_size"):
        AdaptiveBatchSize.from_tune(_tune_result(0, 0.0), model, optimizer, epochs=1, dataset_size="many")


def test_a_reference_far_above_what_fits_still_lets_the_policy_plan():
    # 2048 at 64 a micro-batch is 32 accumulated steps: tune allows it (its plan must express
    # the reference), so the policy must too, or its first decision raises.
    model = linear_model()
    adaptive = AdaptiveBatchSize.from_tune(_tune_result(0, 0.0, base_batch_size=2048), model,
                                           torch.optim.SGD(model.parameters(), lr=0.1), epochs=1)
    assert adaptive.policy.max_accumulation == 32
    assert adaptive.policy.decide(32, 40.0).optimum in CANDIDATES


def test_with_a_grad_scaler_the_measured_sample_is_the_unscaled_one():
    x, y = linear_data()
    indices = torch.arange(10, 26)
    plain_model, scaled_model = linear_model(), linear_model()
    plain, _ = make(plain_model, max_fit=64, measure_every=1)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    scaled, _ = make(scaled_model, max_fit=64, measure_every=1, scaler=scaler)
    run_step(plain, plain_model, (x[indices], y[indices]))
    for micro, weight in scaled.micro_batches((x[indices], y[indices])):
        scaler.scale(weight * loss(scaled_model, micro)).backward()
    scaled.step()
    assert scaled.monitor.tracker.g2_samples[-1] == pytest.approx(plain.monitor.tracker.g2_samples[-1], rel=1e-5)
    assert scaled.monitor.tracker.trace_samples[-1] == pytest.approx(plain.monitor.tracker.trace_samples[-1], rel=1e-5)


def test_a_fractional_number_of_epochs_stops_where_the_schedule_ends():
    x, y = linear_data()
    model = linear_model()
    total = 5 * N_EXAMPLES // 2  # 2.5 epochs
    adaptive, optimizer = make(model, batch_size=48, schedule=ExampleSchedule(total_examples=total))
    sampler = adaptive.batch_sampler(N_EXAMPLES)
    sizes = []
    while not adaptive.finished:
        for indices in sampler:
            sizes.append(len(indices))
            run_step(adaptive, model, (x[indices], y[indices]))
            optimizer.zero_grad()
        assert len(sizes) < 100
    assert adaptive.examples_seen == sum(sizes) == total
    assert sizes[-2:] == [48, 32]  # the third pass: 48, then the 32 left of 400


def test_a_single_process_counts_the_examples_it_is_handed_not_what_the_sampler_cut():
    x, y = linear_data()
    model = linear_model()
    adaptive, optimizer = make(model, batch_size=8)
    sampler = adaptive.batch_sampler(N_EXAMPLES)
    indices = next(iter(sampler))
    run_step(adaptive, model, (x[indices[:7]], y[indices[:7]]))  # a collate_fn dropped one
    assert adaptive.examples_seen == 7


def test_from_tune_with_the_examples_target_grows_as_the_noise_scale_allows():
    model = linear_model()
    adaptive = AdaptiveBatchSize.from_tune(_tune_result(0, 0.0, target="examples"), model,
                                           torch.optim.SGD(model.parameters(), lr=0.1), epochs=1)
    assert adaptive.policy.examples_slack == 0.1 and adaptive.policy.candidates == CANDIDATES
    # Batches up to 10% of the noise scale keep examples within 10% of the minimum.
    assert adaptive.policy.decide(32, 400.0).batch_size == 32  # 64 > 40
    assert adaptive.policy.decide(32, 700.0).batch_size == 64
    assert adaptive.policy.decide(16, 10_000.0).batch_size == 32  # 2x a change at most


def test_a_sampler_over_another_dataset_size_than_the_schedules_is_refused():
    model = linear_model()
    adaptive = AdaptiveBatchSize.from_tune(_tune_result(0, 0.0), model,
                                           torch.optim.SGD(model.parameters(), lr=0.1), epochs=2)
    with pytest.raises(UsageError, match="batch_sampler\\(dataset_size=1000\\) but the schedule was planned "
                                         "for epochs of 160 examples"):
        adaptive.batch_sampler(1000)


def test_from_tune_spaces_measured_steps_by_what_their_split_costs_unless_told():
    model = linear_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    adaptive = AdaptiveBatchSize.from_tune(_tune_result(0, 0.0), model, optimizer, epochs=1)
    # The same number the policy gives for the starting batch (its maths: test_adaptive_policy).
    assert adaptive.monitor.every == adaptive.policy.measurement_interval(32) > 10
    told = AdaptiveBatchSize.from_tune(_tune_result(0, 0.0), linear_model(), optimizer, epochs=1,
                                       measure_every=3)
    assert told.monitor.every == 3


def test_a_noise_scale_too_large_to_measure_grows_the_batch_from_its_lower_bound():
    # At the least-squares optimum the true gradient is 0 (B_noise infinite): the smoothed
    # |G|^2 is not positive, so there is no smoothed noise scale, but the recent samples bound
    # it from below, and that bound is what the policy plans with (not "wait").
    x, y = linear_data()
    model = linear_workload_at_the_optimum().build_model("cpu")
    adaptive, optimizer = make(model, batch_size=8, measure_every=1, decide_every=12, min_samples=12)
    draws = torch.Generator().manual_seed(1)
    for _ in range(12):
        index = torch.randint(len(x), (8,), generator=draws)
        decision = run_step(adaptive, model, (x[index], y[index]))
        optimizer.zero_grad()  # no optimizer step: the parameters stay at the optimum
    estimate = adaptive.monitor.estimate()
    assert adaptive.monitor.b_simple is None and estimate.status == "lower_bound"
    assert decision.noise_scale == pytest.approx(estimate.ci_low)
    assert decision.changed and decision.batch_size == 16  # the policy's doubling brake
