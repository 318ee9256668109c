"""Policy: turn measurements into a Recommendation a user can train with, and say why.

The numbers come from the goodput plan (analysis/goodput.py) and the LR rules (scaling.py); this
module only decides, explains and warns. It is torch-free so a recommendation can be recomputed
from a saved run record.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Mapping

from batchscope import scaling
from batchscope.analysis._checks import finite_or_none as _finite_or_none

# Below ~16-32 examples per device BatchNorm's batch statistics get noisy enough to hurt accuracy
# (Wu & He 2018, "Group Normalization", fig. 1); 32 is the conservative end.
BATCHNORM_MIN_PER_DEVICE = 32
# A noise scale measured in the first few hundred steps is an underestimate: B_noise grows as the
# loss falls (McCandlish et al. 2018, sec. 4).
EARLY_TRAINING_STEPS = 1000
# Noise-probe verdicts the plan can use: an estimate with an interval, or (unresolved |G|^2 but
# resolved tr(Sigma)) only a lower bound, which the plan takes as the noise scale.
USABLE_NOISE = ("ok", "lower_bound")


@dataclass(frozen=True)
class Recommendation:
    batch_size: int
    per_device_batch_size: int
    grad_accumulation: int
    learning_rate: float
    lr_rule: str
    warmup_steps: int
    predicted_speedup_vs_reference: float | None
    base_batch_size: int
    base_learning_rate: float
    world_size: int = 1
    good_range: tuple[int, int] | None = None
    # Set when the LR needs warmup but steps per epoch are unknown (warmup_steps is then 0).
    warmup_epochs: float = 0.0
    rationale: list[str] = field(default_factory=list)
    caveats: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["good_range"] = list(self.good_range) if self.good_range else None
        return data


@dataclass(frozen=True)
class Evidence:
    """What the probes found, as plain numbers (all optional but the memory limit)."""

    memory_limit: int
    noise_scale: float | None = None
    noise_status: str = "missing"
    noise_interval: tuple[float | None, float | None] = (None, None)
    noise_measured_at_step: int = 0
    # The steps tune trains before measuring when the budget allows, set only when the budget
    # cut them short (None otherwise).
    noise_standard_train_steps: int | None = None
    # When the noise scale is only a lower bound (noise_status "lower_bound", noise_scale the
    # bound): the batch the plan would pick for a practically unlimited noise scale.
    noise_unlimited_batch_size: int | None = None
    knee_batch_size: int | None = None
    input_pipeline: Mapping[str, Any] | None = None
    has_batchnorm: bool = False
    memory_budget_note: str | None = None
    # The bound that stopped the memory search short of the memory edge, if one did.
    memory_capped_by: str | None = None


def recommend(
    plan: Any,
    evidence: Evidence,
    *,
    base_batch_size: int,
    base_learning_rate: float,
    optimizer_family: str,
    steps_per_epoch: int | None = None,
    lr_rule: str | None = None,
    target: str = "time",
) -> Recommendation:
    """Combine a goodput plan with the LR rule for the optimizer family, then collect caveats.

    `plan` is an `analysis.goodput.GoodputPlan` (batch_size: global; micro_batch_size: per
    device; accumulation, world_size, speedup_vs_reference, good_range). The LR follows the
    global batch.
    """
    world_size = int(getattr(plan, "world_size", 1))
    rule = scaling.rule_name(lr_rule) if lr_rule else scaling.rule_for_family(optimizer_family)
    batch = int(plan.batch_size)
    usable_noise = evidence.noise_scale if evidence.noise_status in USABLE_NOISE else None
    fallback = []
    if rule == "adascale" and usable_noise is None:
        # The gain needs the noise scale; failing here would throw away the whole measurement.
        rule = scaling.rule_for_family(optimizer_family)
        fallback.append(f"rule 'adascale' needs a usable noise scale (the probe's status: "
                        f"{evidence.noise_status}, value: {evidence.noise_scale}); the LR follows "
                        f"the {optimizer_family} rule '{rule}' instead")
    lr_plan = scaling.scale_learning_rate(
        base_learning_rate, base_batch_size, batch, rule,
        noise_scale=usable_noise, family=optimizer_family,
        noise_is_lower_bound=evidence.noise_status == "lower_bound",
        # steps per epoch at the NEW batch size turns "5 warmup epochs" into steps
        steps_per_epoch=max(1, steps_per_epoch) if steps_per_epoch else None,
    )
    warmup = lr_plan.warmup_steps or 0
    lr_caveats = list(lr_plan.warnings)
    warmup_epochs = 0.0
    if lr_plan.warmup_steps is None and lr_plan.factor > scaling.NO_WARMUP_MAX_FACTOR:
        # tune knows why the steps are unknown: the workload gives no dataset size.
        warmup_epochs = float(scaling.DEFAULT_WARMUP_EPOCHS)
        generic = scaling.warmup_in_epochs_warning(lr_plan.factor, warmup_epochs)
        lr_caveats = [warning for warning in lr_caveats if warning != generic]
        lr_caveats.append(f"The LR grows {lr_plan.factor:.3g}x: warm it up gradually over "
                          f"~{warmup_epochs:g} epochs. The workload gives no dataset size, so "
                          f"that cannot be counted in steps here (set the Workload's "
                          f"dataset_size to get warmup_steps).")
    per_device = int(plan.micro_batch_size)
    accumulation = int(plan.accumulation)
    speedup = _finite_or_none(getattr(plan, "speedup_vs_reference", None))

    rationale = _rationale(plan, evidence, rule, lr_plan, base_batch_size, base_learning_rate, target)
    caveats = fallback + lr_caveats
    caveats += _caveats(evidence, per_device, accumulation, world_size,
                        float(getattr(plan, "sync_seconds", 0.0) or 0.0), batch)
    return Recommendation(
        batch_size=batch,
        per_device_batch_size=per_device,
        grad_accumulation=accumulation,
        learning_rate=float(lr_plan.learning_rate),
        lr_rule=rule,
        warmup_steps=int(warmup),
        predicted_speedup_vs_reference=speedup,
        base_batch_size=base_batch_size,
        base_learning_rate=base_learning_rate,
        world_size=world_size,
        good_range=tuple(int(b) for b in plan.good_range) if plan.good_range else None,
        warmup_epochs=warmup_epochs,
        rationale=rationale,
        caveats=_unique(caveats),
    )


def _after_steps(steps: int) -> str:
    if steps == 0:
        return "at initialisation"
    return f"after {steps} training step{'' if steps == 1 else 's'}"


def _rationale(plan: Any, evidence: Evidence, rule: str, lr_plan: Any, base_batch: int,
               base_lr: float, target: str) -> list[str]:
    budget = f" ({evidence.memory_budget_note})" if evidence.memory_budget_note else ""
    if evidence.memory_capped_by:
        lines = [f"Largest batch per step: {evidence.memory_limit}, where the memory search "
                 f"stopped at the {evidence.memory_capped_by}{budget}; larger batches may fit."]
    else:
        lines = [f"Largest batch per step within memory (verified fit minus the margin): "
                 f"{evidence.memory_limit}{budget}."]
    if evidence.knee_batch_size:
        lines.append(f"Throughput stops growing (95% of best) at batch {evidence.knee_batch_size}.")
    if evidence.noise_scale is not None and evidence.noise_status == "lower_bound":
        lines.append(
            f"Gradient noise scale B_simple ≥ {evidence.noise_scale:,.0f} (the lower end of its "
            f"interval; |G|² was not resolved from 0, so there is no upper end): planned at that "
            f"bound, the most sample-efficient reading of the evidence."
        )
    elif evidence.noise_scale is not None and evidence.noise_status == "ok":
        low, high = evidence.noise_interval
        interval = f" (CI {low:,.0f}-{high:,.0f})" if low is not None and high is not None else ""
        lines.append(
            f"Gradient noise scale B_simple ≈ {evidence.noise_scale:,.0f}{interval}: batches well "
            f"above it waste examples."
        )
    else:
        lines.append(
            f"Noise scale not usable ({evidence.noise_status}); the choice rests on throughput only."
        )
    objective = ("fewest examples (within 10% of the minimum), then fastest" if target == "examples"
                 else "shortest predicted time to the same loss, (B + B_noise) / throughput(B)")
    lines.append(f"Objective: {objective}.")
    speedup = _finite_or_none(getattr(plan, "speedup_vs_reference", None))
    if speedup is not None and speedup >= 1:
        lines.append(f"Predicted {speedup:.2f}x faster to target than the reference batch {base_batch}.")
    elif speedup is not None:
        # The reference is still the yardstick when the plan's rules kept it out of reach.
        lines.append(f"Predicted {1 / speedup:.2f}x slower to target than the reference batch "
                     f"{base_batch}, which the plan's rules (BatchNorm floor, target, throughput "
                     f"knee) ruled out.")
    if int(plan.accumulation) > 1:
        lines.append(
            f"Batch {plan.batch_size} does not fit at once: {plan.accumulation} accumulation steps of "
            f"{plan.micro_batch_size}."
        )
    lines.append(
        f"LR {lr_plan.learning_rate:.4g} by the {rule} rule from {base_lr:g} at batch {base_batch} "
        f"(factor {lr_plan.factor:.3g})."
    )
    return lines


def _caveats(evidence: Evidence, per_device: int, accumulation: int, world_size: int,
             sync_seconds: float = 0.0, global_batch: int | None = None) -> list[str]:
    caveats: list[str] = []
    pipeline = evidence.input_pipeline or {}
    if evidence.has_batchnorm:
        caveats.append(
            f"The model has BatchNorm: batches below {BATCHNORM_MIN_PER_DEVICE} per device were "
            f"neither measured nor considered (noisy batch statistics)."
        )
    if evidence.has_batchnorm and per_device < BATCHNORM_MIN_PER_DEVICE:
        caveats.append(
            f"BatchNorm sees only {per_device} examples per device per step"
            + (" (accumulation does not enlarge BN batches)" if accumulation > 1 else "")
            + ": its statistics get noisy; consider SyncBatchNorm, GroupNorm or ghost batch norm."
        )
    if evidence.has_batchnorm and accumulation > 1 and per_device >= BATCHNORM_MIN_PER_DEVICE:
        caveats.append(
            "With gradient accumulation BatchNorm normalises over each micro-batch, not the global batch."
        )
    if world_size > 1:
        each = f"{accumulation} accumulated micro-batches of {per_device}" if accumulation > 1 \
            else f"{per_device} examples"
        communication = (
            f"counts the gradient all-reduce measured across the ranks ({sync_seconds * 1e3:.3g} ms "
            f"a step, in full, as if the backward pass overlapped none of it)" if sync_seconds > 0
            else "leaves out the gradient all-reduce, which costs most at small per-device "
                 "batches (tune measures it when called on every rank)")
        loaders = (" The input pipeline was timed with one process; ranks sharing a host also "
                   "share its CPU cores for loading." if pipeline.get("measured") else "")
        caveats.append(
            f"batch_size is global across {world_size} data-parallel devices: each device runs "
            f"{each} a step (a DistributedSampler's share), and the LR is the global batch's. "
            f"The plan assumes every device as fast as the one measured and {communication}."
            + loaders
        )
    unlimited = evidence.noise_unlimited_batch_size
    if evidence.noise_status == "lower_bound" and unlimited and unlimited != global_batch:
        caveats.append(
            f"The noise scale is only known to be at least {evidence.noise_scale:,.0f}; the plan "
            f"uses that bound. If it is much larger, up to batch {unlimited} would reach the "
            f"target sooner: a larger --budget buys the samples to bound it, or the adaptive mode "
            f"grows the batch as it measures."
        )
    if evidence.noise_status in USABLE_NOISE and evidence.noise_measured_at_step < EARLY_TRAINING_STEPS:
        caveats.append(
            f"The noise scale was measured {_after_steps(evidence.noise_measured_at_step)}; it "
            f"usually grows as training proceeds, so larger batches pay off later: the adaptive "
            f"mode grows the batch and its LR as it does "
            f"(batchscope.AdaptiveBatchSize.from_tune(result, model, optimizer, epochs=...))."
        )
    standard = evidence.noise_standard_train_steps
    if evidence.noise_status in USABLE_NOISE and standard and evidence.noise_measured_at_step < standard:
        caveats.append(
            f"The budget paid for {evidence.noise_measured_at_step} of the {standard} training "
            f"steps tune runs before measuring the noise scale; with a larger --budget the "
            f"measurement, and possibly the recommendation, would differ."
        )
    if pipeline.get("bottleneck"):
        # The probe's note already says where the time goes and what would help.
        note = str(pipeline.get("note") or "").strip()
        caveats.append(
            note[:1].upper() + note[1:] if note else
            "The input pipeline caps throughput: the data path is slower than the model step; "
            "move augmentation to the device or add DataLoader workers."
        )
    return caveats


def _unique(items: list[str]) -> list[str]:
    seen: set[str] = set()
    return [item for item in items if not (item in seen or seen.add(item))]
