"""`AdaptiveBatchSize`: grow the batch during training as the noise scale grows, LR coupled.

`tune` measures the noise scale early (half an epoch in) and recommends the batch that is best
then; the noise scale keeps growing as the loss falls, and with it the batch that reaches the
target soonest. This helper sits in the user's own loop and does what tune did, continuously:

- measures the noise scale from the loop's own gradients (`GradientNoiseMonitor`: one step in
  `measure_every` is run as two or more equal micro-batches, which is the second batch size the
  estimate needs);
- every `decide_every` steps asks `BatchSizePolicy` whether a larger batch is now faster to the
  target (growth only, at most 2x per change, only for a predicted gain of 5% or more);
- splits each batch into micro-batches that fit in memory (gradient accumulation);
- sets the LR of every step from the batch it actually trains on: the LR rule's factor over
  the base (linear, square root, none, or AdaScale's gain at the latest noise scale), times the
  schedule's multiplier by examples seen (`ExampleSchedule`), so the run still ends after the
  planned epochs whatever the batch sizes were.

The loop (see README, "Adaptive batch size")::

    adaptive = AdaptiveBatchSize.from_tune(result, model, optimizer, epochs=30)
    loader = DataLoader(train_set, batch_sampler=adaptive.batch_sampler(len(train_set)))
    while not adaptive.finished:           # one pass of the loader is one epoch
        for batch in loader:
            for micro, weight in adaptive.micro_batches(batch):   # sets this step's LR
                (weight * loss_fn(model, micro)).backward()
            adaptive.step()                # before clipping and zero_grad()
            optimizer.step(); optimizer.zero_grad()
    adaptive.close()
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import TYPE_CHECKING, Any, Iterator, Mapping

import torch
import torch.distributed as dist
from torch import nn

from batchscope import scaling
from batchscope.adaptive.batch_split import batch_length, slice_batch
from batchscope.adaptive.sampler import AdaptiveBatchSampler
from batchscope.adaptive.schedule import ExampleSchedule
from batchscope.analysis.adaptive_policy import BatchDecision, BatchSizePolicy
from batchscope.checks import require_int
from batchscope.errors import UsageError
from batchscope.probes.noise_ddp import DistributedGradientNoiseMonitor
from batchscope.probes.noise_online import GradientNoiseMonitor

if TYPE_CHECKING:
    from batchscope.tuning import TuneResult

STATE_VERSION = 1
_STATE_KEYS = ("batch_size", "steps", "examples_seen", "lr_noise", "changes", "position")
# Measured steps deferred this many times running (batches no split makes equal) get a warning.
POSTPONED_WARNING = 20


class AdaptiveBatchSize:
    """The loop helper of the module docstring.

    Args:
        model / optimizer: what the loop trains; the optimizer's LR is set for every step in
            `micro_batches` (param groups keep their LR ratios to the largest).
        policy: when and where to move the batch (`BatchSizePolicy`).
        batch_size: the global batch to start with (tune's recommendation).
        base_batch_size / base_lr: the batch and LR the workload was tuned at; the LR rule
            scales from them.
        lr_rule: "linear" (SGD), "sqrt" (Adam family), "none", or "adascale" (needs a noise
            scale: `noise_scale` until the monitor has its own).
        schedule: the LR multiplier by examples seen; None keeps the rule's LR constant.
        noise_scale: the noise scale known at the start (tune's), for "adascale" until measured.
        measure_every: one optimizer step in this many is measured.
        decide_every: steps between decisions; min_samples: measured steps before the first.
        scaler: the loop's `torch.amp.GradScaler`, if any (its scale is divided out of norms).
        group: the process group under data parallelism (default: the world, when
            torch.distributed is initialised with more than one rank).

    Data-parallel (DDP): `batch_size` and every number here are global; each rank trains
    batch_size / world_size examples a step (`batch_sampler` gives each rank its share). The
    ranks' local gradients are the small batch of the noise estimate and DDP's average the big
    one (`DistributedGradientNoiseMonitor`), so measured steps need no split; every rank gets
    the same all-reduced numbers and so takes the same decisions. The plan is made per device:
    the time to target of a global batch B on W devices, (B + B_noise) / (W X(B/W)), is that of a
    per-device batch b = B/W against a noise scale B_noise/W.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        policy: BatchSizePolicy,
        *,
        batch_size: int,
        base_batch_size: int,
        base_lr: float,
        lr_rule: str = "linear",
        schedule: ExampleSchedule | None = None,
        noise_scale: float | None = None,
        measure_every: int = 10,
        decide_every: int = 50,
        min_samples: int = 8,
        scaler: Any = None,
        ema_beta: float = 0.9,
        group: Any = None,
    ) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise UsageError(f"optimizer={type(optimizer).__name__} is not a torch.optim.Optimizer")
        if not isinstance(policy, BatchSizePolicy):
            raise UsageError(f"policy={type(policy).__name__} is not a BatchSizePolicy")
        self.model = model
        self.optimizer = optimizer
        self.policy = policy
        self.batch_size = require_int("batch_size", batch_size)
        self.start_batch_size = self.batch_size
        self.base_batch_size = require_int("base_batch_size", base_batch_size)
        if isinstance(base_lr, bool) or not isinstance(base_lr, (int, float)) or not base_lr > 0 \
                or not math.isfinite(base_lr):
            raise UsageError(f"base_lr={base_lr!r} must be a positive number (the LR at base_batch_size)")
        self.base_lr = float(base_lr)
        self.lr_rule = scaling.rule_name(lr_rule)
        if self.lr_rule == "adascale" and noise_scale is None:
            raise UsageError("lr_rule='adascale' needs noise_scale=<tune's B_simple> to start from; "
                             "or use lr_rule='linear' / 'sqrt'")
        self.schedule = schedule
        self.decide_every = require_int("decide_every", decide_every)
        self.min_samples = require_int("min_samples", min_samples, minimum=0)
        self.group = group
        self.world_size, self.rank = _data_parallel(group)
        if self.batch_size % self.world_size:
            raise UsageError(f"batch_size={self.batch_size} does not split over {self.world_size} ranks; "
                             f"use a multiple of {self.world_size}")
        every = require_int("measure_every", measure_every)
        if self.world_size > 1:
            self.monitor: GradientNoiseMonitor = DistributedGradientNoiseMonitor(
                model, self.batch_size // self.world_size, every=every, scaler=scaler,
                ema_beta=ema_beta, group=group)
        else:
            self.monitor = GradientNoiseMonitor(model, self.batch_size, every=every, scaler=scaler,
                                                ema_beta=ema_beta)
        self._lr_noise = noise_scale  # the noise scale AdaScale's gain uses; updated at decisions
        # Groups keep their LRs relative to the largest (a frozen group at 0 stays at 0).
        largest = max(float(param_group["lr"]) for param_group in optimizer.param_groups)
        self._group_ratios = [float(param_group["lr"]) / largest if largest > 0 else 1.0
                              for param_group in optimizer.param_groups]
        self.dataset_size: int | None = None  # an epoch's examples, when from_tune planned them
        self.steps = 0
        self.examples_seen = 0
        self.changes: list[dict[str, Any]] = []
        # One entry per decision: where training was, what was measured, what the batch became.
        self.history: list[dict[str, Any]] = []
        self.last_decision: BatchDecision | None = None
        self._step_global: int | None = None  # the global batch of the step in progress
        self._sampler: AdaptiveBatchSampler | None = None
        self._trained_through: tuple[int, int] | None = None  # (epoch, end) of the last step
        self._pending_position: tuple[int, int] | None = None  # a resume before batch_sampler()
        self._postponed_in_a_row = 0

    @classmethod
    def from_tune(cls, result: "TuneResult", model: nn.Module, optimizer: torch.optim.Optimizer, *,
                  epochs: float, dataset_size: int | None = None, **options: Any) -> "AdaptiveBatchSize":
        """Start from `tune`'s recommendation and measurements: its batch, LR rule, base, warmup
        (as examples; the workload's own warmup when longer), memory limit, throughput model and
        candidates, and the workload's schedule over `epochs` epochs of `dataset_size` (default:
        the workload's) examples. Under DDP the starting batch is re-planned for the ranks.
        On one device `measure_every` defaults to what keeps the measured steps' split under
        3% of training time at the starting batch (`BatchSizePolicy.measurement_interval`)."""
        if result.step_time is None:
            raise UsageError("this TuneResult has no throughput model; run batchscope.tune() again")
        rec = result.recommendation
        workload = result.record.workload
        size = dataset_size if dataset_size is not None else workload.get("dataset_size")
        if not size:
            raise UsageError("the workload has no dataset_size; pass dataset_size=len(train_set)")
        if isinstance(epochs, bool) or not isinstance(epochs, (int, float)) or not epochs > 0:
            raise UsageError(f"epochs={epochs!r} must be a positive number of epochs to train")
        from batchscope.tuning import EXAMPLES_SLACK, accumulation_limit

        size = require_int("dataset_size", size)
        if not result.candidates:
            raise UsageError("this TuneResult lists no candidate batch sizes; run batchscope.tune() again")
        world, _ = _data_parallel(options.get("group"))
        # The all-reduce tune timed across the ranks holds for this job only on as many ranks.
        sync = float(getattr(result.plan, "sync_seconds", 0.0) or 0.0) if world == rec.world_size else 0.0
        # The policy plans per device (class docstring): the reference and the batches it may
        # pick are per-device ones (tune's one-device candidates), and no global batch may
        # exceed the dataset.
        max_fit = result.memory.recommended_batch_size
        reference = math.ceil(rec.base_batch_size / world)
        shares = sorted(result.candidates)
        policy = BatchSizePolicy(
            result.step_time,
            [b for b in shares if b * world <= size] or shares[:1],
            max_fit_batch_size=max_fit,
            reference_batch_size=reference,
            max_accumulation=max(accumulation_limit(reference, max_fit), rec.grad_accumulation),
            examples_slack=EXAMPLES_SLACK if result.target == "examples" else None,
            sync_seconds=sync, **{k: options.pop(k) for k in ("max_growth", "min_gain", "allow_shrink") if k in options})
        # The longer of the rule's warmup and the workload's own, as sweeps' schedules take it.
        warmup = max(rec.warmup_steps * rec.batch_size,
                     math.ceil(float(workload.get("warmup_epochs") or 0.0) * size))
        schedule = ExampleSchedule(total_examples=int(epochs * size), warmup_examples=warmup,
                                   kind=workload.get("schedule", "cosine"))
        options.setdefault("noise_scale", result.plan.noise_scale)
        # Tune planned for rec.world_size devices (tune(world_size=...)); on another number W
        # of ranks the start is the per-device optimum at B_noise / W (class docstring), times W.
        start = rec.batch_size
        if world != rec.world_size or start % world or start > size:
            # (Also when training runs on fewer examples than tune saw: no batch beyond them.)
            noise = result.plan.noise_scale
            share = min(max(1, rec.batch_size // rec.world_size), max(policy.candidates))
            optimum = policy.decide(share, None if noise is None else noise / world).optimum
            start = world * (optimum or share)
        if world == 1:
            # Measured steps are split in two (see measurement_interval); under DDP the ranks'
            # shares are the small batches and nothing is split.
            options.setdefault("measure_every", policy.measurement_interval(start))
        adaptive = cls(model, optimizer, policy, batch_size=start,
                       base_batch_size=rec.base_batch_size, base_lr=rec.base_learning_rate,
                       lr_rule=rec.lr_rule, schedule=schedule, **options)
        adaptive.dataset_size = size
        return adaptive

    # -- the loop's calls ------------------------------------------------------------------------

    def batch_sampler(self, dataset_size: int, *, shuffle: bool = True, seed: int = 0,
                      drop_last: bool = False) -> AdaptiveBatchSampler:
        """A `DataLoader(batch_sampler=...)` that draws batches of the current size."""
        if self.dataset_size is not None and dataset_size != self.dataset_size:
            raise UsageError(
                f"batch_sampler(dataset_size={dataset_size}) but the schedule was planned for "
                f"epochs of {self.dataset_size} examples; pass dataset_size=len(train_set) to "
                f"from_tune (tune may have run on a subset)")
        self._sampler = AdaptiveBatchSampler(dataset_size, lambda: self.batch_size, shuffle=shuffle,
                                             seed=seed, drop_last=drop_last, rank=self.rank,
                                             world_size=self.world_size, remaining=self._to_draw)
        if self._pending_position is not None:
            self._sampler.resume_at(*self._pending_position)
        return self._sampler

    def micro_batches(self, batch: Any) -> Iterator[tuple[Any, float]]:
        """(micro-batch, weight) pairs to run backward on, `weight * mean loss` each, so the
        accumulated gradient is the mean over the whole batch. `batch` is a tensor, or a tuple,
        list or dict of tensors sharing their first dimension (this rank's share under DDP).
        Sets this step's LR (from the global batch's size), so `optimizer.step()` may come
        before or after `step()`."""
        if self._step_global is not None:
            raise UsageError("micro_batches() was called twice without step() in between: one "
                             "batch per optimizer step, then adaptive.step()")
        size = batch_length(batch)
        global_size = self._step_global = self._global_size(size)
        lr = self.learning_rate(global_size)
        for param_group, ratio in zip(self.optimizer.param_groups, self._group_ratios):
            param_group["lr"] = lr * ratio
        count = self._micro_batch_count(size, global_size)
        if self.monitor.measuring:
            self.monitor.set_micro_batches(size // count, loss_multiplier=1.0 / count)
        bounds = [round(i * size / count) for i in range(count + 1)]
        # Under DDP only the last micro-batch's backward all-reduces (noise_ddp reads the
        # local micro-batch gradients from hooks either way).
        no_sync = getattr(self.model, "no_sync", None) if self.world_size > 1 else None
        for index, (start, end) in enumerate(zip(bounds, bounds[1:])):
            part = (slice_batch(batch, start, end), (end - start) / size)
            if no_sync is not None and index < count - 1:
                with no_sync():
                    yield part
            else:
                yield part

    def step(self) -> BatchDecision | None:
        """After the step's backward passes, before clipping and `zero_grad()`: reads the noise
        sample, counts the examples, and every `decide_every` steps may change the batch size of
        the batches drawn next. Returns the decision on a deciding step, else None. Under DDP
        every rank must call it every step (a measured step is one collective)."""
        if self._step_global is None:
            raise UsageError("step() came before micro_batches(batch): run the step's backward "
                             "passes through adaptive.micro_batches(batch) first")
        batch, self._step_global = self._step_global, None
        skipped = self.monitor.tracker.skipped
        measured = self.monitor.measuring
        sample = self.monitor.step()
        overflowed = self.monitor.tracker.skipped > skipped  # AMP overflow: not the loop's fault
        if measured and not overflowed and (sample is None or sample.sq_norm_big == 0.0):
            raise UsageError("step() found no gradients on a measured step: call adaptive.step() "
                             "after the backward passes and before optimizer.zero_grad()")
        self.examples_seen += batch
        self.steps += 1
        if self._sampler is not None and self._sampler.drawn:
            epoch, _, end = self._sampler.drawn.popleft()
            self._trained_through = (epoch, end)
        if self.steps % self.decide_every or self.monitor.tracker.samples < self.min_samples:
            return None
        decision = self._decide()
        self.last_decision = decision
        self.history.append({"step": self.steps, "examples_seen": self.examples_seen,
                             "noise_scale": decision.noise_scale, "optimum": decision.optimum,
                             "batch_size": decision.batch_size,
                             "learning_rate": float(self.optimizer.param_groups[0]["lr"]),
                             "samples": self.monitor.tracker.samples})
        if decision.noise_scale is not None:
            self._lr_noise = decision.noise_scale
        if decision.changed:
            self.changes.append({"step": self.steps, "examples_seen": self.examples_seen,
                                 **decision.to_dict()})
            self.batch_size = decision.batch_size
        return decision

    def learning_rate(self, batch_size: int, examples_before: int | None = None) -> float:
        """The LR of a step of `batch_size` examples taken after `examples_before` (default: the
        examples seen so far): base LR x the rule's factor x the schedule's multiplier."""
        seen = self.examples_seen if examples_before is None else examples_before
        factor = scaling.lr_factor(self.lr_rule, batch_size, self.base_batch_size, self._lr_noise)
        multiplier = 1.0 if self.schedule is None else self.schedule.multiplier(seen, batch_size)
        return self.base_lr * factor * multiplier

    @property
    def noise_scale(self) -> float | None:
        """The monitor's smoothed B_simple (None until measured)."""
        return self.monitor.b_simple

    @property
    def finished(self) -> bool:
        """Whether the schedule's examples have all been seen, or this helper's sampler has gone
        through the epochs they make up (one dropping each epoch's last partial batch falls a
        few examples short of the count)."""
        if self.schedule is None:
            return False
        total = self.schedule.total_examples
        if self.examples_seen >= total:
            return True
        sampler = self._sampler
        return sampler is not None and sampler.passes_done >= math.ceil(total / sampler.dataset_size)

    def close(self) -> None:
        """Remove the monitor's hooks from the model."""
        self.monitor.close()

    def __enter__(self) -> "AdaptiveBatchSize":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def settings(self) -> dict[str, Any]:
        """The run's settings, for its record."""
        policy = self.policy
        return {
            "start_batch_size": self.start_batch_size, "lr_rule": self.lr_rule,
            "base_batch_size": self.base_batch_size, "base_lr": self.base_lr,
            "world_size": self.world_size, "measure_every": self.monitor.every,
            "decide_every": self.decide_every, "min_samples": self.min_samples,
            "max_growth": policy.max_growth, "min_gain": policy.min_gain,
            "allow_shrink": policy.allow_shrink, "candidates": list(policy.candidates),
            "max_fit_batch_size": policy.max_fit,
            "schedule": None if self.schedule is None else dataclasses.asdict(self.schedule),
        }

    # -- checkpoints -----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs to continue where this one is: the batch, the counts, and
        the place in the data right after the last trained batch (not after what the loader
        has read ahead), and the noise monitor's samples, averages and measuring phase, so a
        resumed run takes the decisions an uninterrupted one would."""
        return {"version": STATE_VERSION, "batch_size": self.batch_size, "steps": self.steps,
                "examples_seen": self.examples_seen, "lr_noise": self._lr_noise,
                "changes": [dict(change) for change in self.changes],
                "history": [dict(entry) for entry in self.history],
                "position": None if self._trained_through is None else list(self._trained_through),
                "monitor": self.monitor.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from `state_dict()`'s output, before or after `batch_sampler()` is made."""
        version = state.get("version") if isinstance(state, Mapping) else None
        missing = [key for key in _STATE_KEYS if not isinstance(state, Mapping) or key not in state]
        if version != STATE_VERSION or missing:
            raise UsageError(f"not an AdaptiveBatchSize state of version {STATE_VERSION} (got version "
                             f"{version!r}, missing {missing}); pass what state_dict() returned")
        self.batch_size = require_int("batch_size", state["batch_size"])
        if self.batch_size % self.world_size:
            raise UsageError(f"the saved batch_size={self.batch_size} does not split over "
                             f"{self.world_size} ranks; resume on a world size that divides it")
        self.steps = require_int("steps", state["steps"], minimum=0)
        self.examples_seen = require_int("examples_seen", state["examples_seen"], minimum=0)
        self._lr_noise = state["lr_noise"]
        self.changes = [dict(change) for change in state["changes"]]
        self.history = [dict(entry) for entry in state.get("history", [])]
        if state.get("monitor") is not None:  # absent from states saved before it was kept
            self.monitor.load_state_dict(state["monitor"])
        position = state["position"]
        self._trained_through = self._pending_position = None if position is None else (
            require_int("position epoch", position[0], minimum=0),
            require_int("position offset", position[1], minimum=0))
        if self._sampler is not None and self._pending_position is not None:
            self._sampler.resume_at(*self._pending_position)

    # -- internals -------------------------------------------------------------------------------

    def _global_size(self, size: int) -> int:
        """The global batch of this step: `size` on one process; under DDP the sampler's record
        of the batch it cut, or - with another sampler - `size` on every rank, checked."""
        if self.world_size == 1:
            return size
        if self._sampler is not None and self._sampler.drawn:
            _, start, end = self._sampler.drawn[0]
            return end - start
        device = next(self.model.parameters()).device
        if not _equal_across_ranks(size, device, self.group):
            raise UsageError(f"the ranks hold different batch sizes this step (this one {size}); "
                             "give every rank an equal share, e.g. with adaptive.batch_sampler()")
        return size * self.world_size

    def _to_draw(self) -> int | None:
        """Examples the schedule still needs beyond those trained and those already drawn."""
        if self.schedule is None or self._sampler is None:
            return None
        queued = sum(end - start for _, start, end in self._sampler.drawn)
        return self.schedule.total_examples - self.examples_seen - queued

    def _decide(self) -> BatchDecision:
        """The policy's decision in global numbers; per device under DDP (class docstring)."""
        world = self.world_size
        noise = self._planning_noise_scale()
        local = self.policy.decide(self.batch_size // world, None if noise is None else noise / world)
        if world == 1:
            return local
        return dataclasses.replace(
            local, previous=local.previous * world, batch_size=local.batch_size * world,
            noise_scale=noise, optimum=None if local.optimum is None else local.optimum * world)

    def _planning_noise_scale(self) -> float | None:
        """The smoothed noise scale; while its smoothed |G|^2 is not positive (the gradient lost
        in its noise, as late in training when the noise scale is largest), the lower end of
        the recent samples' interval when they bound it from below: a noise scale too large to
        measure is a reason to grow the batch, not to wait."""
        noise = self.monitor.b_simple
        if noise is not None:
            return noise
        estimate = self.monitor.estimate()
        if estimate is not None and estimate.status == "lower_bound":
            return float(estimate.ci_low)
        return None

    def _micro_batch_count(self, size: int, global_size: int) -> int:
        """The fewest micro-batches that fit. A measured step on one process needs at least two
        equal ones (the second batch size of the estimate), else its measurement moves to the
        next step; under DDP the ranks' shares are the small batches, and the choice depends
        only on the global size, so every rank makes the same one."""
        count = self.policy.split(size)[1]
        if not self.monitor.measuring:
            return count
        least = 2 if self.world_size == 1 else count
        equal_share = global_size % self.world_size == 0 and size == global_size // self.world_size
        # Up to twice the micro-batches needed: more would make the measured step crawl (and
        # tiny micro-batches starve BatchNorm).
        for equal in range(max(least, count), min(size, 2 * max(2, count)) + 1):
            if equal_share and size % equal == 0:
                self._postponed_in_a_row = 0
                return equal
        self.monitor.postpone()
        self._postponed_in_a_row += 1
        if self._postponed_in_a_row == POSTPONED_WARNING:
            warnings.warn(f"batch size {size} has not split into equal micro-batches for "
                          f"{POSTPONED_WARNING} steps in a row, so the noise scale is not being "
                          f"measured; use batch sizes with small factors (e.g. powers of two)",
                          stacklevel=3)
        return count


def _equal_across_ranks(size: int, device: torch.device, group: Any) -> bool:
    """Whether every rank holds `size` examples this step (one tiny all-reduce; every rank gets
    the same answer, so they raise, or go on, together)."""
    extremes = torch.tensor([size, -size], dtype=torch.int64, device=device)
    dist.all_reduce(extremes, op=dist.ReduceOp.MAX, group=group)
    return int(extremes[0]) == -int(extremes[1])


def _data_parallel(group: Any) -> tuple[int, int]:
    """(world size, rank) of `group` when torch.distributed runs, else (1, 0)."""
    if not (dist.is_available() and dist.is_initialized()):
        if group is not None:
            raise UsageError("group= was given but torch.distributed is not initialised; call "
                             "torch.distributed.init_process_group(...) first")
        return 1, 0
    return dist.get_world_size(group), dist.get_rank(group)
