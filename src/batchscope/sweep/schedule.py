"""A trial's learning-rate schedule: the workload's own schedule, re-planned for a batch size.

A trial at batch size B runs the same number of epochs as every other trial, so it takes
`epochs * floor(N / B)` steps. Its peak LR comes from the LR rule (batchscope.scaling), its
warmup is the longer of the workload's own warmup and the rule's gradual warmup (Goyal et al.
2017), and after warmup the workload's schedule (cosine to zero, or constant) runs over the
remaining steps. Plain maths on integers and floats, so it is tested against hand-computed
values.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from batchscope.errors import UsageError
from batchscope.scaling import DEFAULT_WARMUP_EPOCHS, scale_learning_rate, warmup_steps
from batchscope.sweep.grid import SEARCH_RULE, GridPoint

# The rule's warmup is stated for long runs (Goyal et al.: 5 of 90 epochs). A short sweep trial
# of 1-10 epochs would spend most or all of its budget warming up and never train at the peak
# LR it is meant to test, so the rule's warmup is capped at this share of the trial.
MAX_WARMUP_SHARE = 0.2


@dataclass(frozen=True)
class LrSchedule:
    """LR at each optimizer step: linear ramp over `warmup_steps`, then cosine or constant.

    The ramp starts at `peak_lr / warmup_steps` (not zero), so the first step already moves the
    weights; step `warmup_steps - 1` runs at the peak.
    """

    peak_lr: float
    total_steps: int
    warmup_steps: int
    kind: str  # "cosine" or "constant"

    def lr_at(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.peak_lr * (step + 1) / self.warmup_steps
        if self.kind == "constant":
            return self.peak_lr
        decay_steps = self.total_steps - self.warmup_steps
        if decay_steps <= 0:
            return self.peak_lr
        progress = min(1.0, (step - self.warmup_steps) / decay_steps)
        return self.peak_lr * 0.5 * (1.0 + math.cos(math.pi * progress))

    def to_dict(self) -> dict[str, object]:
        return {
            "peak_lr": self.peak_lr,
            "total_steps": self.total_steps,
            "warmup_steps": self.warmup_steps,
            "kind": self.kind,
        }


def plan_schedule(
    point: GridPoint,
    *,
    reference_batch_size: int,
    reference_lr: float,
    schedule: str,
    workload_warmup_epochs: float,
    steps_per_epoch: int,
    epochs: int,
    rule_warmup_epochs: float | None = None,
) -> LrSchedule:
    """The schedule a trial at `point` trains with.

    `rule_warmup_epochs=None` uses the rule's default warmup (5 epochs) capped at
    MAX_WARMUP_SHARE of the trial; pass a number to set it exactly.
    """
    if steps_per_epoch <= 0:
        raise UsageError(
            f"batch size {point.batch_size} leaves zero steps per epoch; use a smaller batch "
            f"or a larger training set"
        )
    if rule_warmup_epochs is None:
        rule_warmup_epochs = min(float(DEFAULT_WARMUP_EPOCHS), MAX_WARMUP_SHARE * epochs)
    if point.lr_rule == SEARCH_RULE or point.learning_rate is not None:
        if point.learning_rate is None:
            raise UsageError(f"search-mode point {point.key} has no learning rate")
        peak = float(point.learning_rate)
        factor = peak / reference_lr
    else:
        plan = scale_learning_rate(
            reference_lr, reference_batch_size, point.batch_size, point.lr_rule
        )
        peak, factor = plan.learning_rate, plan.factor
    # warmup_steps() is "none up to a 2x LR increase": a lower LR needs no warmup either.
    rule_warmup = warmup_steps(max(factor, 1e-12), steps_per_epoch, rule_warmup_epochs)
    own_warmup = int(math.ceil(workload_warmup_epochs * steps_per_epoch))
    total = steps_per_epoch * epochs
    return LrSchedule(
        peak_lr=peak,
        total_steps=total,
        warmup_steps=min(total, max(rule_warmup, own_warmup)),
        kind=schedule,
    )
