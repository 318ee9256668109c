import random

import pytest
import torch

from batchscope.sweep.api import trial_runner
from batchscope.sweep.grid import GridPoint
from batchscope.sweep.trial import eval_steps, run_trial
from batchscope.sweep.trial_record import EvalPoint, TrialRecord, TrialSettings, apply_target

CPU = torch.device("cpu")


def test_eval_steps_are_equal_epoch_fractions_rounded_half_up():
    assert eval_steps(10, TrialSettings(epochs=2, evals_per_epoch=2)) == [5, 10, 15, 20]
    assert eval_steps(3, TrialSettings(epochs=2, evals_per_epoch=2)) == [2, 3, 5, 6]
    assert eval_steps(1, TrialSettings(epochs=1, evals_per_epoch=2)) == [1, 1]


def test_trial_trains_for_real_and_is_evaluated_on_the_samples_grid(tiny):
    settings = TrialSettings(epochs=2, evals_per_epoch=2, target_metric=0.8)
    record = run_trial(tiny(), GridPoint(16, "linear"), settings, CPU)
    assert record.outcome == "complete" and record.full_budget
    assert [p.index for p in record.curve] == [1, 2, 3, 4]
    assert [p.step for p in record.curve] == [8, 16, 24, 32]
    assert [p.samples_seen for p in record.curve] == [128, 256, 384, 512]
    assert [p.epoch for p in record.curve] == [0.5, 1.0, 1.5, 2.0]
    assert record.steps_done == record.total_steps == 32
    assert record.final_metric == record.curve[-1].metric
    assert record.final_metric > 0.9  # two separable blobs: a linear model must learn them
    assert record.curve[0].train_seconds <= record.curve[-1].train_seconds == record.train_seconds
    assert record.samples_per_second == pytest.approx(512 / record.train_seconds)
    assert record.time_to_target is not None and record.samples_to_target in (128, 256, 384, 512)


def test_different_batch_sizes_are_compared_at_equal_samples(tiny):
    settings = TrialSettings(epochs=2, evals_per_epoch=2)
    small = run_trial(tiny(), GridPoint(16, "none"), settings, CPU)
    large = run_trial(tiny(), GridPoint(32, "none"), settings, CPU)
    assert [p.samples_seen for p in small.curve] == [p.samples_seen for p in large.curve]
    assert [p.step for p in large.curve] == [4, 8, 12, 16]
    # 256 // 48 = 5 steps per epoch, 240 samples: half an epoch is step 3 (2.5 rounded up)
    odd = run_trial(tiny(), GridPoint(48, "none"), settings, CPU)
    assert [p.samples_seen for p in odd.curve] == [144, 240, 384, 480]


def test_trials_are_seeded_deterministically_with_one_data_order_per_epoch(tiny):
    calls = []
    settings = TrialSettings(epochs=2, evals_per_epoch=1, seed=3)
    first = run_trial(tiny(calls=calls), GridPoint(16, "linear"), settings, CPU)
    second = run_trial(tiny(), GridPoint(16, "linear"), settings, CPU)
    assert [p.metric for p in first.curve] == [p.metric for p in second.curve]
    assert [p.train_loss for p in first.curve] == [p.train_loss for p in second.curve]
    # burn-in batch (untimed, seed 0), then epoch e uses seed + e
    assert calls == [(16, 0), (16, 3), (16, 4)]


def test_the_lr_follows_the_scaled_schedule_and_keeps_group_ratios(tiny):
    optimizers = []
    base = tiny(schedule="constant")

    def build_optimizer(params, lr):
        params = list(params)
        optimizer = torch.optim.SGD([{"params": params[:1], "lr": lr},
                                     {"params": params[1:], "lr": lr * 0.1}], lr=lr)
        optimizers.append(optimizer)
        return optimizer

    workload = base.with_settings(build_optimizer=build_optimizer)
    settings = TrialSettings(epochs=1, evals_per_epoch=1)
    record = run_trial(workload, GridPoint(64, "linear"), settings, CPU)
    trained = optimizers[-1]  # [0] is the burn-in's throwaway optimizer
    assert record.learning_rate == pytest.approx(0.5 * 64 / 16)
    assert [g["lr"] for g in trained.param_groups] == pytest.approx([2.0, 0.2])


def test_non_finite_loss_is_a_diverged_trial_not_a_crash(tiny):
    workload = tiny(task="regress", reference_lr=1e6)
    record = run_trial(workload, GridPoint(16, "linear"), TrialSettings(epochs=2), CPU)
    assert record.outcome == "diverged"
    assert "non-finite" in record.message
    assert not record.full_budget and record.curve == []


def test_out_of_memory_is_an_outcome_and_other_errors_propagate(tiny):
    record = run_trial(tiny(oom_above=32), GridPoint(64, "none"), TrialSettings(epochs=1), CPU)
    assert record.outcome == "oom" and "out of memory" in record.message
    assert not record.full_budget

    def broken_loss(model, batch):
        raise ValueError("user bug")

    broken = tiny().with_settings(loss=broken_loss)
    with pytest.raises(ValueError, match="user bug"):
        run_trial(broken, GridPoint(16, "none"), TrialSettings(epochs=1), CPU)


def test_a_pruning_hook_stops_the_trial_after_that_evaluation(tiny):
    seen = []

    def prune_at_first(point, record):
        seen.append(point.index)
        return True

    record = run_trial(tiny(), GridPoint(16, "none"), TrialSettings(epochs=2), CPU, prune_at_first)
    assert record.outcome == "pruned" and seen == [1] and len(record.curve) == 1
    assert not record.full_budget and record.steps_done == 8


def test_time_to_target_is_the_first_evaluation_that_reaches_it():
    record = TrialRecord("k", 16, "none", 0.1, 0, 8, 16, 0)
    record.curve = [EvalPoint(1, 0.5, 8, 128, 1.0, 0.4, None), EvalPoint(2, 1.0, 16, 256, 2.0, 0.7, None),
                    EvalPoint(3, 1.5, 24, 384, 3.0, 0.6, None)]
    apply_target(record, 0.6, higher_is_better=True)
    assert (record.time_to_target, record.samples_to_target, record.epochs_to_target) == (2.0, 256, 1.0)
    apply_target(record, 0.5, higher_is_better=False)
    assert record.time_to_target == 1.0
    apply_target(record, 0.9, higher_is_better=True)
    assert record.time_to_target is None
    apply_target(record, None, higher_is_better=True)
    assert record.samples_to_target is None


def test_trial_runner_leaves_the_callers_rng_untouched(tiny):
    random.seed(123)
    torch.manual_seed(123)
    expected = (random.random(), torch.rand(1).item())
    random.seed(123)
    torch.manual_seed(123)
    messages = []
    run = trial_runner(tiny(), TrialSettings(epochs=1), CPU, messages.append)
    run(GridPoint(16, "none"), lambda point, record: False)
    assert (random.random(), torch.rand(1).item()) == expected
    assert messages[0].startswith("[b16-none] epoch 0.5: accuracy ")
    assert messages[-1].startswith("[b16-none] complete")


def test_a_batch_past_the_micro_batch_limit_is_accumulated_to_the_same_result(tiny):
    # The tiny model has no BatchNorm, so 64 as micro-batches of 22, 21, 21 (64 in
    # ceil(64/24) = 3 near-equal parts) must train the same model as 64 in one pass; with
    # forward passes above 32 failing as out of memory, only the accumulated trial completes.
    point = GridPoint(64, "linear")
    whole = run_trial(tiny(), point, TrialSettings(epochs=2, evals_per_epoch=1), torch.device("cpu"))
    too_big = run_trial(tiny(oom_above=32), point, TrialSettings(epochs=2, evals_per_epoch=1),
                        torch.device("cpu"))
    accumulated = run_trial(tiny(oom_above=32), point,
                            TrialSettings(epochs=2, evals_per_epoch=1, max_micro_batch_size=24),
                            torch.device("cpu"))
    assert too_big.outcome == "oom"
    assert accumulated.outcome == "complete"
    assert accumulated.extra == {"micro_batch_size": 24, "accumulation": 3}
    assert accumulated.steps_done == whole.steps_done == 2 * (256 // 64)
    for mine, theirs in zip(accumulated.curve, whole.curve, strict=True):
        assert mine.metric == pytest.approx(theirs.metric, abs=1e-6)
        assert mine.train_loss == pytest.approx(theirs.train_loss, rel=1e-5)
    # Batches within the limit are not touched.
    small = run_trial(tiny(), GridPoint(16, "linear"),
                      TrialSettings(epochs=1, evals_per_epoch=1, max_micro_batch_size=24),
                      torch.device("cpu"))
    assert small.extra == {}
