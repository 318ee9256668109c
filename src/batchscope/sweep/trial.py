"""One sweep trial: real training at one batch size, evaluated on a common samples-seen grid.

Every trial trains for the same number of epochs, so trials at different batch sizes see the
same number of samples and take different numbers of steps. Evaluations happen at the same
fractions of an epoch for every trial (`evals_per_epoch` per epoch, the last one at the end of
each epoch), so curves of different batch sizes can be compared at equal samples seen, and the
index of an evaluation point is the "step" the pruners (Optuna's successive halving, Ray's ASHA)
compare trials at.

Wall time on the curves is *training* time: the clock stops while the model is evaluated,
because every trial evaluates equally often and evaluation cost says nothing about the batch
size. Throughput is samples per training second.
"""

from __future__ import annotations

import math
import random
import time
from typing import Callable

import numpy as np
import torch

from batchscope import device as devices
from batchscope.errors import UsageError
from batchscope.guard import StateGuard
from batchscope.oom import run_catching_oom
from batchscope.step import accumulated_train_step, build_model, needs_grad_scaler, train_step
from batchscope.sweep.grid import GridPoint
from batchscope.sweep.schedule import LrSchedule, plan_schedule
from batchscope.sweep.trial_record import EvalPoint, TrialRecord, TrialSettings, summarise
from batchscope.workload import Workload

OnEval = Callable[[EvalPoint, TrialRecord], bool]
"""Called after each evaluation with the point and the record so far; True stops the trial
(pruned)."""


def eval_steps(steps_per_epoch: int, settings: TrialSettings) -> list[int]:
    """The global step after which grid point k (1-based) is evaluated: the same fraction of an
    epoch for every batch size, at least one step in, each epoch's last point at its last step."""
    per = settings.evals_per_epoch
    # k * S / per rounded half up, in integers (round() would round half to even).
    return [
        max(1, (2 * k * steps_per_epoch + per) // (2 * per))
        for k in range(1, settings.eval_points + 1)
    ]


def run_trial(
    workload: Workload,
    point: GridPoint,
    settings: TrialSettings,
    device: torch.device,
    on_eval: OnEval | None = None,
) -> TrialRecord:
    """Train a fresh model at `point` and return what was measured.

    Divergence (a non-finite training loss) and out-of-memory end the trial with that outcome;
    any other exception is the workload's bug and propagates. The model the workload's factory
    returns and every RNG (seeded here) are restored afterwards, on every way out.
    """
    if workload.epoch_batches is None or workload.evaluate is None:
        raise UsageError(
            f"workload {workload.name!r} has no epoch_batches/evaluate; a sweep trains and "
            f"evaluates real epochs, so the workload must provide both"
        )
    if workload.dataset_size is None:
        raise UsageError(
            f"workload {workload.name!r} has no dataset_size; a sweep needs it to give every "
            f"batch size the same epochs"
        )
    steps_per_epoch = workload.dataset_size // point.batch_size
    schedule = plan_schedule(
        point,
        reference_batch_size=workload.reference_batch_size,
        reference_lr=workload.reference_lr,
        schedule=workload.schedule,
        workload_warmup_epochs=workload.warmup_epochs,
        steps_per_epoch=steps_per_epoch,
        epochs=settings.epochs,
        rule_warmup_epochs=settings.rule_warmup_epochs,
    )
    record = TrialRecord(
        key=point.key,
        batch_size=point.batch_size,
        lr_rule=point.lr_rule,
        learning_rate=schedule.peak_lr,
        warmup_steps=schedule.warmup_steps,
        steps_per_epoch=steps_per_epoch,
        total_steps=schedule.total_steps,
        seed=settings.seed,
    )
    micro = _micro_batch_size(point, settings)
    if micro is not None:
        record.extra.update(micro_batch_size=micro,
                            accumulation=math.ceil(point.batch_size / micro))
    started = time.perf_counter()
    # A `Workload.from_objects` factory hands back the user's own model: the guard puts it back
    # as it was (weights, buffers, train/eval flags), so the sweep leaves it untouched and every
    # trial starts from the same initial weights, as independent trials must. It also restores
    # every RNG this trial seeds.
    with StateGuard(rng=True) as guard:
        # OOM is caught inside the guard: the memory the failed step held is released before
        # the guard writes the user's tensors back.
        outcome = run_catching_oom(
            lambda: _train(workload, point, settings, device, schedule, record, on_eval, guard),
            device,
        )
    if outcome.oom:
        record.outcome, record.message = "oom", outcome.message
    record.wall_seconds = time.perf_counter() - started
    summarise(record, settings, workload.higher_is_better)
    return record


def _train(
    workload: Workload,
    point: GridPoint,
    settings: TrialSettings,
    device: torch.device,
    schedule: LrSchedule,
    record: TrialRecord,
    on_eval: OnEval | None,
    guard: StateGuard,
) -> None:
    micro = _micro_batch_size(point, settings)
    burn_in(workload, point, device, schedule.peak_lr, micro)
    seed_everything(settings.seed, device)
    model = build_model(workload, device, guard)
    optimizer = workload.build_optimizer(model.parameters(), schedule.peak_lr)
    # Keep the ratios between parameter groups the user's factory set up; scale them all.
    group_peaks = [group["lr"] / schedule.peak_lr for group in optimizer.param_groups]
    scaler = torch.amp.GradScaler(device.type) if needs_grad_scaler(workload, device) else None
    targets = eval_steps(record.steps_per_epoch, settings)
    loss_sum = torch.zeros((), device=device)
    loss_steps = 0
    train_seconds = 0.0
    step = 0
    next_eval = 0
    for epoch in range(settings.epochs):
        devices.synchronize(device)
        clock = time.perf_counter()
        batches = workload.epoch_batches(point.batch_size, device, settings.seed + epoch)
        for batch_index, batch in enumerate(batches):
            if batch_index >= record.steps_per_epoch:
                break
            lr = schedule.lr_at(step)
            for group, share in zip(optimizer.param_groups, group_peaks):
                group["lr"] = lr * share
            # Summed on the device: reading the loss every step would sync every step.
            if micro is None:
                loss_sum += train_step(workload, model, optimizer, batch, device, scaler).float()
            else:
                loss_sum += accumulated_train_step(workload, model, optimizer, batch, device,
                                                   micro, scaler).float()
            loss_steps += 1
            step += 1
            while next_eval < len(targets) and targets[next_eval] == step:
                devices.synchronize(device)
                train_seconds += time.perf_counter() - clock
                record.steps_done, record.samples_seen = step, step * point.batch_size
                record.train_seconds = train_seconds
                evaluation = evaluate_into(record, workload, model, device, loss_sum, loss_steps,
                                           index=next_eval + 1, step=step,
                                           epoch=(next_eval + 1) / settings.evals_per_epoch)
                if evaluation is None:
                    return
                loss_steps = 0
                next_eval += 1
                if on_eval is not None and on_eval(evaluation, record):
                    record.outcome = "pruned"
                    return
                clock = time.perf_counter()
        devices.synchronize(device)
        train_seconds += time.perf_counter() - clock
    record.steps_done, record.samples_seen = step, step * point.batch_size
    if not record.curve or record.curve[-1].step != step:
        record.train_seconds = train_seconds  # else it stays the last evaluation's clock
    if step == 0:
        raise UsageError(
            f"workload {workload.name!r} yielded no batch of size {point.batch_size}; a trial "
            f"that trains zero steps measures nothing"
        )


def _micro_batch_size(point: GridPoint, settings: TrialSettings) -> int | None:
    """The micro-batch when this point's batch exceeds the sweep's largest forward pass."""
    limit = settings.max_micro_batch_size
    return limit if limit is not None and point.batch_size > limit else None


def evaluate_into(record: TrialRecord, workload: Workload, model: torch.nn.Module, device: torch.device,
                  loss_sum: torch.Tensor, loss_steps: int, *, index: int, epoch: float,
                  step: int) -> EvalPoint | None:
    """One evaluation of a run, appended to `record.curve` at the record's samples and seconds:
    the mean training loss since the last one (non-finite: the run is marked diverged and None
    comes back), then the workload's metric, the model back in train mode and `loss_sum` zeroed
    (the caller restarts its step count)."""
    mean_loss = float(loss_sum.item()) / loss_steps if loss_steps else None
    if mean_loss is not None and not math.isfinite(mean_loss):
        record.outcome = "diverged"
        record.message = f"training loss became non-finite before step {step}"
        return None
    metric = float(workload.evaluate(model, device))
    model.train()
    loss_sum.zero_()
    evaluation = EvalPoint(index=index, epoch=epoch, step=step, samples_seen=record.samples_seen,
                           train_seconds=record.train_seconds, metric=metric, train_loss=mean_loss)
    record.curve.append(evaluation)
    return evaluation


def burn_in(workload: Workload, point: GridPoint, device: torch.device, lr: float,
             micro: int | None = None) -> None:
    """One untimed step on a throwaway model, so one-time costs (decoding the dataset into its
    cache, the CUDA context, cuDNN autotuning for this batch shape) are not charged to whichever
    trial happens to run first.

    Under its own guard: when the factory returns the user's model, this step must be undone
    before the trial snapshots the model (the trial's guard keeps its first snapshot). An OOM
    here is ignored after its memory is released: the trial's first step meets it again and
    records it.
    """

    def step() -> None:
        model = build_model(workload, device, guard)
        optimizer = workload.build_optimizer(model.parameters(), lr)
        batch = next(iter(workload.epoch_batches(point.batch_size, device, 0)), None)
        if batch is not None and micro is not None:
            accumulated_train_step(workload, model, optimizer, batch, device, micro)
        elif batch is not None:
            train_step(workload, model, optimizer, batch, device)
        devices.synchronize(device)

    with StateGuard(rng=True) as guard:
        run_catching_oom(step, device)


def seed_everything(seed: int, device: torch.device) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    devices.manual_seed_device(device, seed)
