"""`tune`: the whole pipeline for one workload, within a time budget.

memory probe -> throughput probe -> noise probe -> goodput plan -> input-pipeline check at the
planned batch -> recommendation -> record/report.

The record is saved after every stage, so a run that fails or is interrupted keeps what it
measured (and says what went wrong in `errors`). The time budget is shared out up front: the
memory probe first (everything depends on it), then throughput up to the memory limit, then the
noise probe, less a few seconds kept for the input-pipeline check when the workload has a data
loader. The budget is a ceiling: the noise probe trains a fixed half epoch before measuring and
stops sampling once the planned batch no longer depends on where the noise scale lies in its
interval (`tune_noise`), so a generous budget finishes early with the same answer.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

import torch
from torch import nn

from batchscope import device as devices
from batchscope import scaling
from batchscope.analysis.goodput import GoodputPlan, plan_batch_size
from batchscope.analysis.throughput_model import fit_throughput_model
from batchscope.atomic import check_writable_directory
from batchscope.errors import UsageError
from batchscope.guard import StateGuard
from batchscope.probes.memory import MemoryProbeResult, parse_size, probe_memory
from batchscope.probes.noise import NoiseScaleResult, estimate_noise_scale
from batchscope.probes.input_pipeline import TIMED_WINDOWS, InputPipelineResult, not_measured
from batchscope.probes.throughput import ThroughputResult, check_data_path, measure_throughput
from batchscope.record import RunRecord, environment_info
from batchscope.recommend import (BATCHNORM_MIN_PER_DEVICE, USABLE_NOISE, Evidence, Recommendation,
                                  recommend)
from batchscope.tune_noise import (NOISE_ACCUMULATION, SettledDecision, plan_noise_probe,
                                   unlimited_noise_scale)
from batchscope.workload import Workload, resolve_workload

logger = logging.getLogger(__name__)

Target = Literal["time", "examples"]
Progress = Callable[[str], None]

# Below this the probes cannot each take a few steps at several sizes. (On an H100/H200 a
# ResNet-18 tune measures all three probes in about 15 s; a CPU needs minutes.)
MIN_BUDGET_S = 10.0
# On CPU there is no device capacity to probe against; a quarter of RAM (at most 2 GiB) keeps
# a default tune from swapping the machine and its largest probes short.
CPU_DEFAULT_BUDGET_BYTES = 2 * 1024**3
# Shares of the budget. Memory and throughput stop refining when their share is spent (each
# finishes the probe in flight); the noise probe plans its training and sample ceiling from
# what is left.
# Noise gets the largest share because its interval narrows only as 1/sqrt(samples), while
# memory converges in a handful of probes and throughput stops once the curve flattens.
# (How the noise probe spends its part: `tune_noise`.)
MEMORY_SHARE = 0.30
THROUGHPUT_SHARE = 0.30
MAX_ACCUMULATION = 16
# Batches leaving fewer optimizer steps than this per epoch are not training batches anyone
# would pick (on CIFAR-10 that is 5,000 of 50,000), so neither the memory probe nor the plan
# goes beyond them: probing a dataset-sized batch cost 2.4 s of a 19 s tune on an H200.
MIN_STEPS_PER_EPOCH = 10
# Seconds per timed window of the input-pipeline check (device-resident batches, the user's
# loader, device-resident again): a third of what the budget has left, but at least enough for
# a few steps.
PIPELINE_MIN_S = 1.0
PIPELINE_MAX_S = 10.0
# "examples" target: batches whose examples-to-target stay within 10% of the minimum,
# E/E_min = 1 + B/B_noise <= 1.1.
EXAMPLES_SLACK = 0.10


@dataclass
class TuneResult:
    recommendation: Recommendation
    plan: GoodputPlan
    memory: MemoryProbeResult
    throughput: ThroughputResult
    noise: NoiseScaleResult | None
    record: RunRecord
    out_dir: Path | None
    seconds: float
    evidence: Evidence | None = None
    optimizer_family: str = "sgd"
    target: str = "time"
    steps_per_epoch: int | None = None
    # The step-time model fitted to the throughput probe (the plan's and the adaptive mode's).
    step_time: Any = None
    # Every batch a one-device "time" plan could pick (the "examples" target keeps those below
    # 10% of the noise scale): the per-device batches the adaptive mode re-plans over as the
    # noise scale grows (on any world size).
    candidates: tuple[int, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return self.record.to_dict()

    def with_lr_rule(self, lr_rule: str) -> Recommendation:
        """The same plan and evidence with another LR rule (no probe runs again)."""
        if self.evidence is None:
            raise UsageError("this TuneResult keeps no evidence; run tune() again")
        return recommend(
            self.plan, self.evidence, base_batch_size=self.recommendation.base_batch_size,
            base_learning_rate=self.recommendation.base_learning_rate,
            optimizer_family=self.optimizer_family, steps_per_epoch=self.steps_per_epoch,
            target=self.target, lr_rule=lr_rule,
        )


def tune(
    workload: Workload | str,
    *,
    device: str | torch.device | None = None,
    budget_s: float = 300.0,
    target: Target = "time",
    optimizer_family: str | None = None,
    lr_rule: str | None = None,
    memory_budget: int | str | None = None,
    out_dir: str | Path | None = None,
    workload_options: dict[str, Any] | None = None,
    progress: Progress | None = None,
    world_size: int | None = None,
    distributed: bool = False,
) -> TuneResult:
    """Measure memory, throughput and gradient noise, then recommend batch size, LR, warmup and
    gradient accumulation for `workload` on `device`.

    Args:
        budget_s: the most wall-clock seconds to spend (a ceiling: the probes stop once they
            have their answer; a budget too short for the noise probe's half epoch of training
            trains less, and the recommendation says so).
        target: "time" minimises predicted wall time to the target loss; "examples" keeps the
            examples needed within 10% of the minimum, then picks the fastest such batch.
        optimizer_family: "sgd" (linear LR rule) or "adam" (square root); defaults to the
            workload's.
        lr_rule: "linear", "sqrt", "none" or "adascale" (the measured noise scale's gain);
            defaults to the family's rule (linear for SGD, square root for Adam).
        memory_budget: bytes or "4GiB"; required meaningfully on CPU (default there: a quarter of
            RAM, at most 2 GiB), optional on accelerators.
        out_dir: where `run.json`, `report.html` and the plots go (None: nothing written).
        world_size: plan for this many data-parallel devices (DDP): the probes run on this
            device, the recommended batch is global, each device's share per step is
            `per_device_batch_size` x `grad_accumulation`, and the LR is the global batch's.
            Default: 1, or the job's world size with `distributed=True`.
        distributed: call tune on every rank of an initialised torch.distributed job: rank 0
            measures for the job, every rank checks the per-device batch and returns the same
            result. Without it, an initialised job of several ranks is refused (one process
            cannot know whether the others call tune too, and waiting for them would hang a
            call made on rank 0 alone): pass world_size= to tune on this process only.
    """
    started = time.perf_counter()
    say = progress or (lambda message: logger.info(message))
    _check_arguments(budget_s, target, optimizer_family)
    world = _world_size(world_size)
    _check_distributed(distributed, world_size, world)

    def prepare() -> _Prepared:
        # A bad rule fails before minutes of probing, not after.
        rule = scaling.rule_name(lr_rule) if lr_rule is not None else None
        resolved = resolve_workload(workload, **(workload_options or {}))
        where = devices.resolve_device(device)
        return _Prepared(resolved, where, _memory_budget(memory_budget, where),
                         optimizer_family or resolved.optimizer_family, rule)

    def measure(prepared: _Prepared, sync_seconds: float = 0.0, write_report: bool = True) -> TuneResult:
        return _measure(prepared.workload, prepared.device, prepared.budget_bytes,
                        _prepare_out_dir(out_dir), world=world, budget_s=budget_s, target=target,
                        family=prepared.family, lr_rule=prepared.lr_rule, say=say, started=started,
                        write_report=write_report, sync_seconds=sync_seconds)

    if distributed:
        # Every rank of a data-parallel job called tune: rank 0 measures for all of them (with
        # the all-reduce timed across the ranks), and writes the report once every rank has
        # checked the batch (tune_distributed).
        from batchscope.tune_distributed import tune_on_every_rank

        return tune_on_every_rank(prepare, lambda prepared, sync: measure(prepared, sync, False),
                                  budget_s=budget_s, say=say)
    return measure(prepare())


@dataclass(frozen=True)
class _Prepared:
    workload: Workload
    device: torch.device
    budget_bytes: int | None
    family: str
    lr_rule: str | None


def _measure(resolved: Workload, where: torch.device, budget_bytes: int | None, out: Path | None,
             *, world: int, budget_s: float, target: str, family: str, lr_rule: str | None,
             say: Progress, started: float, write_report: bool = True,
             sync_seconds: float = 0.0) -> TuneResult:
    """The pipeline of the module docstring on this process's device."""
    record = RunRecord(kind="tune", workload=resolved.describe(), environment=environment_info(where))
    record.sections["settings"] = {
        "budget_s": budget_s, "target": target, "optimizer_family": family, "lr_rule": lr_rule,
        "memory_budget_bytes": budget_bytes, "device": str(where), "world_size": world,
    }

    def stage(name: str, run: Callable[[], Any]) -> Any:
        say(f"{name}...")
        try:
            value = run()
        except BaseException as exc:
            record.errors.append(f"{name}: {type(exc).__name__}: {exc}")
            _save(record, out)
            raise
        _save(record, out)
        return value

    memory: MemoryProbeResult = stage("memory probe", lambda: probe_memory(
        resolved, device=where, memory_budget=budget_bytes, time_budget_s=MEMORY_SHARE * budget_s,
        max_batch_size=_largest_useful_batch(resolved),
        max_batch_size_reason=_largest_useful_reason(resolved)))
    record.sections["memory"] = memory.to_dict()
    _save(record, out)

    limit = memory.recommended_batch_size
    has_batchnorm = _has_batchnorm(resolved, where)
    floor = min(BATCHNORM_MIN_PER_DEVICE, limit) if has_batchnorm else 1

    # The data path is checked later, at the planned batch (see _check_data_path). Batches
    # below the BatchNorm floor are not measured: the plan could not pick them.
    throughput: ThroughputResult = stage("throughput probe", lambda: measure_throughput(
        resolved, device=where, max_batch_size=limit, min_batch_size=floor if floor > 1 else None,
        time_budget_s=THROUGHPUT_SHARE * budget_s, data_path=False))
    record.sections["throughput"] = throughput.to_dict()
    step_time = _throughput_model(throughput)

    def plan_for(noise_value: float | None) -> GoodputPlan:
        candidates = _candidates(resolved, throughput, limit, target, noise_value, floor, world)
        return plan_batch_size(
            candidates, step_time, noise_value, max_fit_batch_size=limit,
            reference_batch_size=resolved.reference_batch_size,
            max_accumulation=accumulation_limit(resolved.reference_batch_size, limit, world),
            world_size=world, sync_seconds=sync_seconds)

    reserved_s = TIMED_WINDOWS * PIPELINE_MIN_S if resolved.data_loader is not None else 0.0
    noise_plan = plan_noise_probe(resolved, step_time.step_seconds,
                                  budget_s - (time.perf_counter() - started), limit, reserved_s)
    if noise_plan.shortfall:
        record.errors.append(noise_plan.shortfall)
    # Micro-batches within what fits; reference-sized training steps are accumulated.
    micro = min(max(1, resolved.reference_batch_size // NOISE_ACCUMULATION), limit)
    noise: NoiseScaleResult = stage("noise probe", lambda: estimate_noise_scale(
        resolved, device=where, steps=noise_plan.samples, train_steps=noise_plan.train_steps,
        micro_batch_size=micro, accumulation=NOISE_ACCUMULATION,
        train_batch_size=min(resolved.reference_batch_size, limit),
        stop_when=SettledDecision(lambda value: plan_for(value).batch_size,
                                  what="planned batch size")))
    record.sections["noise"] = {**noise.to_dict(), "plan": dataclasses.asdict(noise_plan)}

    noise_value = _usable_noise(noise)
    plan = _at_the_floor(plan_for(noise_value), floor)
    record.sections["goodput"] = plan.to_dict()
    if resolved.data_loader is not None:
        pipeline = stage("input pipeline check", lambda: _check_data_path(
            resolved, where, plan.micro_batch_size,
            budget_s - (time.perf_counter() - started), record))
    else:
        pipeline = not_measured("the workload has no data_loader (its batches come from "
                                "make_batch only)")
    throughput = dataclasses.replace(throughput, input_pipeline=pipeline)
    record.sections["throughput"] = throughput.to_dict()
    evidence = Evidence(
        memory_limit=memory.recommended_batch_size,
        noise_scale=noise_value,
        noise_status=noise.status,
        noise_interval=(noise.ci_low, noise.ci_high),
        noise_measured_at_step=noise_plan.train_steps,
        noise_standard_train_steps=(noise_plan.standard_train_steps if noise_plan.budget_limited
                                    else None),
        noise_unlimited_batch_size=(
            plan_for(unlimited_noise_scale(noise_value)).batch_size
            if noise.status == "lower_bound" and noise_value is not None else None),
        knee_batch_size=throughput.knee_batch_size,
        input_pipeline=_as_dict(throughput.input_pipeline),
        has_batchnorm=has_batchnorm,
        memory_budget_note=f"budget {budget_bytes / 1024**3:.2f} GiB" if budget_bytes else None,
        memory_capped_by=memory.capped_by if memory.recommended_is_bound else None,
    )
    steps_per_epoch = (resolved.dataset_size // plan.batch_size) if resolved.dataset_size else None
    recommendation = recommend(
        plan, evidence, base_batch_size=resolved.reference_batch_size,
        base_learning_rate=resolved.reference_lr, optimizer_family=family,
        steps_per_epoch=steps_per_epoch or None, target=target, lr_rule=lr_rule,
    )
    record.sections["recommendation"] = recommendation.to_dict()
    seconds = time.perf_counter() - started
    record.sections["settings"]["seconds"] = seconds
    _save(record, out)
    if out is not None and write_report:
        from batchscope.report.tune_report import write_tune_report

        write_tune_report(record, out)
    return TuneResult(recommendation, plan, memory, throughput, noise, record, out, seconds,
                      evidence=evidence, optimizer_family=family, target=target,
                      steps_per_epoch=steps_per_epoch or None, step_time=step_time,
                      candidates=tuple(_candidates(resolved, throughput, limit, "time", None, floor)))


# -- stages' details -----------------------------------------------------------------------------


def _check_arguments(budget_s: float, target: str, family: str | None) -> None:
    if isinstance(budget_s, float) and math.isnan(budget_s):
        raise UsageError("budget=nan is not a number of seconds; give a finite number such as 300")
    if isinstance(budget_s, (int, float)) and not isinstance(budget_s, bool) and budget_s == math.inf:
        raise UsageError("budget=inf: give a finite number of seconds (a ceiling; tune stops once "
                         "it has its answer, so a generous one costs nothing)")
    if isinstance(budget_s, bool) or not isinstance(budget_s, (int, float)) or not budget_s >= MIN_BUDGET_S:
        raise UsageError(
            f"budget={budget_s!r} seconds is too small to measure anything; give at least "
            f"{MIN_BUDGET_S:g} (a few minutes is typical)"
        )
    if target not in ("time", "examples"):
        raise UsageError(f"target={target!r} is not one of time, examples")
    if family is not None and family not in ("sgd", "adam"):
        raise UsageError(f"optimizer_family={family!r} is not one of sgd, adam")


def _prepare_out_dir(out_dir: str | Path | None) -> Path | None:
    if out_dir is None:
        return None
    out = Path(out_dir)
    try:
        check_writable_directory(out)
    except OSError as exc:
        raise UsageError(
            f"output directory {str(out)!r} is not writable ({exc.strerror}); pass --out with a "
            f"writable directory"
        ) from None
    return out


def _memory_budget(memory_budget: int | str | None, where: torch.device) -> int | None:
    if memory_budget is not None:
        return parse_size(memory_budget)
    if where.type == "cpu":
        return min(CPU_DEFAULT_BUDGET_BYTES, devices.total_memory_bytes(where) // 4)
    return None


def _save(record: RunRecord, out: Path | None) -> None:
    if out is not None:
        record.save(out / "run.json")


def _throughput_model(throughput: ThroughputResult) -> Any:
    points = [p for p in throughput.points if p.samples_per_s]
    if not points:
        raise UsageError("the throughput probe measured no batch size; raise --budget or check the workload")
    return fit_throughput_model([p.batch_size for p in points], [p.step_s for p in points])


def accumulation_limit(reference_batch_size: int, limit: int, world_size: int = 1) -> int:
    """MAX_ACCUMULATION, or more when the reference batch itself needs more micro-batches on
    each device (the plan must be able to express the reference to compare against it)."""
    return max(MAX_ACCUMULATION, math.ceil(math.ceil(reference_batch_size / world_size) / limit))


def _world_size(world_size: int | None) -> int:
    if world_size is None:
        return torch.distributed.get_world_size() if _distributed() else 1
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise UsageError(f"world_size={world_size!r} must be a whole number of data-parallel "
                         f"devices, at least 1")
    return world_size


def _check_distributed(distributed: bool, world_size: int | None, world: int) -> None:
    """The collective path only when asked for: entered on one rank alone, it waits in
    dist.new_group for ranks that never come (the coordination group's timeout, 30 minutes
    or more)."""
    if not isinstance(distributed, bool):
        raise UsageError(f"distributed={distributed!r} must be True (every rank of a job calls "
                         f"tune) or False")
    if distributed and world_size is not None:
        raise UsageError("distributed=True plans for the job's world size; drop world_size=")
    if distributed and not _distributed():
        raise UsageError("distributed=True needs torch.distributed initialised on every rank "
                         "(init_process_group, or torchrun ... -m batchscope tune --distributed); "
                         "drop it to tune on this process")
    if not distributed and world_size is None and world > 1:
        raise UsageError(f"torch.distributed is initialised with world size {world}: pass "
                         f"distributed=True on every rank (rank 0 measures for the job), or "
                         f"world_size={world} to tune on this process alone")


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _check_data_path(workload: Workload, where: torch.device, batch_size: int,
                     remaining_s: float, record: RunRecord) -> InputPipelineResult:
    """The input-pipeline check at `batch_size`, the per-device batch the plan picked: that is
    the batch the user's loader will feed, and it is usually far smaller than the throughput
    knee, where a CPU loader can take seconds a batch. A check that fails (a broken loader, say)
    is recorded as an error; the recommendation stands without it."""
    per_window_s = min(PIPELINE_MAX_S, max(PIPELINE_MIN_S, remaining_s / TIMED_WINDOWS))
    try:
        return check_data_path(workload, batch_size, device=where,
                               max_seconds_per_window=per_window_s)
    except Exception as exc:  # noqa: BLE001 - a broken loader must not cost the recommendation
        record.errors.append(f"input pipeline check: {type(exc).__name__}: {exc}")
        return not_measured(f"the input pipeline check failed: {type(exc).__name__}: {exc}")


def _usable_noise(noise: NoiseScaleResult | None) -> float | None:
    """The noise scale the plan uses: the estimate when resolved, the lower end of its interval
    when only that is (planning at the bound is the sample-efficient side), else None."""
    if noise is None or noise.status not in USABLE_NOISE:
        return None
    value = noise.ci_low if noise.status == "lower_bound" else noise.b_simple
    return float(value) if value is not None and math.isfinite(value) and value > 0 else None


def _candidates(workload: Workload, throughput: ThroughputResult, memory_limit: int,
                target: str, noise: float | None, floor: int = 1, world_size: int = 1) -> list[int]:
    """Global batch sizes the plan may pick on `world_size` devices: each device's share a
    power of two from the smallest measured size (or `floor`, the BatchNorm minimum) up to what
    fits times the accumulation limit, or the memory limit itself; plus the reference."""
    reference = workload.reference_batch_size
    smallest = max(floor, min(p.batch_size for p in throughput.points))
    largest = memory_limit * accumulation_limit(reference, memory_limit, world_size)
    useful = _largest_useful_batch(workload)
    if useful is not None:
        largest = min(largest, useful // world_size)
    shares = {memory_limit, math.ceil(reference / world_size)}
    size = 1 << max(0, smallest.bit_length() - 1)
    while size <= largest:
        shares.add(size)
        size *= 2
    shares = {s for s in shares if smallest <= s <= largest} or {smallest}
    sizes = {world_size * s for s in shares}
    if math.ceil(reference / world_size) in shares:
        sizes.add(reference)  # on W devices the reference may not be W times a share
    if target == "examples" and noise is not None:
        sample_efficient = {s for s in sizes if s <= EXAMPLES_SLACK * noise}
        sizes = sample_efficient or {min(sizes)}
    return sorted(sizes)


def _at_the_floor(plan: GoodputPlan, floor: int) -> GoodputPlan:
    """At the BatchNorm floor the plan's "a smaller batch might be faster" is beside the point:
    smaller batches were ruled out, not missed. Say that instead."""
    if floor <= 1 or (plan.micro_batch_size, plan.accumulation) != (floor, 1) \
            or plan.batch_size != floor * plan.world_size:
        return plan
    notes = [note for note in plan.notes if not note.startswith("the optimum is the smallest candidate")]
    notes.append(f"the optimum is the BatchNorm floor ({floor}): smaller batches were ruled out")
    return dataclasses.replace(plan, notes=tuple(notes))


def _largest_useful_batch(workload: Workload) -> int | None:
    """The batch giving MIN_STEPS_PER_EPOCH optimizer steps an epoch, or the reference batch if
    that is larger (the plan must be able to express it); None without a dataset size."""
    if not workload.dataset_size:
        return None
    return max(workload.reference_batch_size, workload.dataset_size // MIN_STEPS_PER_EPOCH)


def _largest_useful_reason(workload: Workload) -> str:
    if workload.dataset_size and workload.dataset_size // MIN_STEPS_PER_EPOCH < workload.reference_batch_size:
        return "reference batch"  # the dataset is too small for MIN_STEPS_PER_EPOCH at it
    return f"batch giving {MIN_STEPS_PER_EPOCH} steps an epoch"


def _has_batchnorm(workload: Workload, where: torch.device) -> bool:
    # Only reads the module tree; the guard is for the RNG that building a model consumes.
    with StateGuard(rng=True):
        model = workload.build_model(where)
        found = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    del model
    return found


def _as_dict(value: Any) -> dict[str, Any] | None:
    if value is None:
        return None
    return value.to_dict() if hasattr(value, "to_dict") else dict(value)
