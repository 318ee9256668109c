"""The adaptive mode end to end on CPU: a real `tune` of the small CIFAR-10 workload, then two
epochs of real training on the real images through `AdaptiveBatchSize.from_tune`, a DataLoader-
style batch sampler, and the workload's own model, optimizer and loss."""

from __future__ import annotations

import math

import torch

import batchscope
from batchscope.adaptive import AdaptiveBatchSize
from batchscope.workload import resolve_workload

EPOCHS = 2


def test_adaptive_training_follows_tunes_plan_and_its_own_rules_on_real_cifar():
    workload = resolve_workload("small-cnn-cifar10")
    cpu = torch.device("cpu")
    result = batchscope.tune(workload, device=cpu, budget_s=15, memory_budget="256MiB")
    rec = result.recommendation

    torch.manual_seed(0)
    model = workload.build_model(cpu)
    optimizer = workload.build_optimizer(model.parameters(), rec.learning_rate)
    adaptive = AdaptiveBatchSize.from_tune(result, model, optimizer, epochs=EPOCHS,
                                           measure_every=2, decide_every=10, min_samples=3)
    generator = torch.Generator().manual_seed(0)
    total = EPOCHS * workload.dataset_size
    warmup = rec.warmup_steps * rec.batch_size

    sizes, losses, seen = [], [], 0
    sampler = adaptive.batch_sampler(workload.dataset_size, seed=0)
    for _ in range(EPOCHS):
        for indices in sampler:
            # Every batch but an epoch's last is the size the helper asked for when it was drawn.
            short = len(indices) != adaptive.batch_size
            assert not short or seen + len(indices) in (workload.dataset_size, total)
            batch = workload.batch_at(torch.tensor(indices), cpu, generator)
            step_loss = 0.0
            for micro, weight in adaptive.micro_batches(batch):
                loss = weight * workload.loss(model, micro)
                loss.backward()
                step_loss += float(loss.detach())
            adaptive.step()
            # The LR, computed here from the rule and a cosine over examples, not by the helper.
            size = len(indices)
            if seen < warmup:
                multiplier = min(1.0, (seen + size) / warmup)
            else:
                multiplier = 0.5 * (1 + math.cos(math.pi * min(1.0, (seen - warmup) / (total - warmup))))
            expected_lr = rec.base_learning_rate * size / rec.base_batch_size * multiplier
            assert math.isclose(optimizer.param_groups[0]["lr"], expected_lr, rel_tol=1e-9)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            sizes.append(size)
            losses.append(step_loss)
            seen += size
    adaptive.close()

    assert rec.lr_rule == "linear" and sizes[0] == rec.batch_size
    assert adaptive.examples_seen == seen == total and adaptive.finished
    # Growth only, at most 2x a change, each change one the policy still makes from its record.
    previous = rec.batch_size
    for change in adaptive.changes:
        assert change["previous"] == previous
        previous, new, noise = change["previous"], change["batch_size"], change["noise_scale"]
        # Checked against time to target computed here from tune's fitted step time.
        reachable = [b for b in adaptive.policy.candidates if previous < b <= 2 * previous]
        assert new == min(reachable, key=lambda b: _time_to_target(result, b, noise))
        gain = _time_to_target(result, previous, noise) / _time_to_target(result, new, noise) - 1
        assert gain >= 0.05 and math.isclose(change["predicted_gain"], gain, rel_tol=1e-9)
        previous = new
    assert adaptive.monitor.tracker.samples >= 3
    # A smoothed |G|^2 lost in the noise (<= 0) gives no estimate, and then the batch stays.
    # (Checked on the decision's own noise scale: samples after the last decision may have
    # moved the running one since.)
    last = adaptive.last_decision
    assert (last.noise_scale or 0) > 0 or (last.reason == "no usable noise-scale estimate yet"
                                           and not last.changed)
    # It trained: the last steps' loss is well below the first steps'.
    assert sum(losses[-20:]) / 20 < 0.9 * sum(losses[:20]) / 20


def _time_to_target(result, batch: int, noise: float) -> float:
    """k steps of t(ceil(B/k)) per batch, k the fewest micro-batches that fit, times the
    examples needed, (B + B_noise) / B (up to a constant)."""
    steps = math.ceil(batch / result.memory.recommended_batch_size)
    return steps * float(result.step_time.step_seconds(math.ceil(batch / steps))) * (batch + noise) / batch
