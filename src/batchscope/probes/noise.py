"""The gradient noise scale probe: how large a batch is still statistically efficient.

B_simple = tr(Sigma) / |G|^2 (McCandlish et al. 2018) is the batch size around which doubling
the batch stops halving the steps to a target: below it, bigger batches are nearly free
speed-ups; far above it, they waste examples. The probe measures it at fixed parameters (the
workload's model at initialisation, after `train_steps` of training at the reference settings,
or a model passed in), from `steps` independent samples, each giving unbiased |G|^2 and
tr(Sigma); the two are averaged separately and then divided, with a jackknife interval
(`analysis.noise_stats`).

Methods:
- "accumulation" (default, any model): k micro-batches of b examples per sample; micro-batch
  gradients (batch b) versus their mean (batch k*b), read by `GradientNoiseMonitor`'s hooks;
  no extra passes. With BatchNorm in train mode each micro-batch is normalised by its own
  statistics, so micro-batch gradients are not averages of independent per-example gradients;
  the result then describes batches of b as training forms them, and says so in `notes`.
- "per_example" (small models, the exact reference): per-example gradients with
  `torch.func.vmap(grad(...))` over batches of k*b examples (small batch 1, big batch k*b).
  Refused for BatchNorm in train mode, where one example's gradient is not defined apart from
  its batch; the probe never silently switches BatchNorm to eval mode, which would measure a
  different function than the one being trained. Runs in full precision (no autocast).

The user's objects are untouched: everything runs inside `guard.StateGuard` (parameters,
buffers, grads, train/eval mode, optimizer state and all RNG states are restored).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

import torch
from torch import nn

from batchscope import step as steps_module
from batchscope.analysis.noise_stats import NoiseScaleEstimate
from batchscope.device import resolve_device
from batchscope.errors import ProbeFailedError, UsageError
from batchscope.guard import StateGuard
from batchscope.probes.noise_online import (
    GradientNoiseMonitor,
    NoiseTracker,
    Precondition,
    adam_denominator,
)
from batchscope.probes.noise_per_example import measure_per_example
from batchscope.workload import Workload, resolve_workload

Method = Literal["accumulation", "per_example"]
METHODS = ("accumulation", "per_example")
# Sees the estimate after each sample; True ends the probe early (see `stop_when`).
StopRule = Callable[[NoiseScaleEstimate], bool]
DEFAULT_STEPS = 32
DEFAULT_ACCUMULATION = 4
# fp16 overflow retries per sample before giving up (the loss scale halves each time).
_MAX_OVERFLOW_RETRIES = 8


@dataclass(frozen=True)
class NoiseScaleResult:
    """The measured noise scale, the numbers it rests on, and how to read it.

    b_simple / ci_low / ci_high are in examples (None when not resolved, see `status`);
    grad_sq_norm and trace_sigma are the averaged unbiased |G|^2 and tr(Sigma) in per-mean-loss
    units; `samples` is how many independent samples they average. For token workloads the same
    numbers in tokens (scaled by the mean tokens per example) are given too.
    """

    b_simple: float | None
    ci_low: float | None
    ci_high: float | None
    grad_sq_norm: float
    trace_sigma: float
    samples: int
    seconds: float
    status: str
    detail: str
    method: Method
    micro_batch_size: int
    big_batch_size: int
    confidence: float
    unit: str
    train_steps: int
    precondition: str | None
    skipped_samples: int = 0
    tokens_per_example: float | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def b_simple_tokens(self) -> float | None:
        return _times(self.b_simple, self.tokens_per_example)

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "b_simple": _finite(self.b_simple),
            "ci_low": _finite(self.ci_low),
            "ci_high": _finite(self.ci_high),
            "grad_sq_norm": _finite(self.grad_sq_norm),
            "trace_sigma": _finite(self.trace_sigma),
            "samples": self.samples,
            "seconds": self.seconds,
            "status": self.status,
            "detail": self.detail,
            "method": self.method,
            "micro_batch_size": self.micro_batch_size,
            "big_batch_size": self.big_batch_size,
            "confidence": self.confidence,
            "unit": self.unit,
            "train_steps": self.train_steps,
            "precondition": self.precondition,
            "skipped_samples": self.skipped_samples,
            "notes": list(self.notes),
        }
        if self.unit == "tokens":
            data["tokens_per_example"] = self.tokens_per_example
            data["b_simple_tokens"] = _finite(self.b_simple_tokens)
            data["ci_low_tokens"] = _finite(_times(self.ci_low, self.tokens_per_example))
            data["ci_high_tokens"] = _finite(_times(self.ci_high, self.tokens_per_example))
        return data


def estimate_noise_scale(
    workload: Workload | str,
    device: str | torch.device | None = None,
    *,
    steps: int = DEFAULT_STEPS,
    micro_batch_size: int | None = None,
    accumulation: int = DEFAULT_ACCUMULATION,
    method: Method = "accumulation",
    train_steps: int = 0,
    train_batch_size: int | None = None,
    model: nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    precondition: Precondition = None,
    confidence: float = 0.9,
    seed: int = 0,
    stop_when: StopRule | None = None,
) -> NoiseScaleResult:
    """Measure B_simple for `workload` at fixed parameters.

    Args:
        workload: a `Workload`, built-in name or `module:function` entry point.
        device: where to run (default: the model's device, else the best available).
        steps: independent samples (each one big batch of micro_batch_size * accumulation).
        micro_batch_size: b (default: reference batch / accumulation, so a sample costs the
            forward/backward work of one reference step).
        accumulation: k >= 2 micro-batches per sample.
        method: "accumulation" or "per_example" (see the module docstring).
        train_steps: first train this many steps at the reference batch size and LR (constant
            LR) - the noise scale grows during training, so the value at initialisation
            understates it.
        train_batch_size: the largest batch that fits, when the reference batch does not: the
            training steps then accumulate reference-sized batches from micro-batches of at
            most this size, so the dynamics stay the reference's.
        model: measure at this model's parameters instead of a freshly built one (it is
            restored afterwards, train_steps included).
        optimizer: a user optimizer whose Adam state preconditions (read only; with
            train_steps >= 1 the optimizer of that training is used instead).
        precondition: "adam" measures the noise scale of Adam's update direction,
            g / (sqrt(v_hat) + eps); needs Adam state, from `optimizer` or from train_steps >= 1
            with an Adam-family workload optimizer.
        confidence: level of the interval.
        seed: seeds the batches drawn and the model's randomness (dropout).
        stop_when: consulted after each sample with the estimate so far (at `confidence`);
            returning True ends the probe before `steps` samples, e.g. once the decision the
            noise scale feeds no longer depends on where it lies in its interval
            (`tune_noise.SettledDecision`). `notes` say when it stopped, quoting the rule's
            `reason` attribute if it has one.
    """
    workload = resolve_workload(workload)
    _check_arguments(steps, micro_batch_size, accumulation, method, train_steps, seed, precondition)
    if train_batch_size is not None and (isinstance(train_batch_size, bool)
                                         or not isinstance(train_batch_size, int) or train_batch_size < 1):
        raise UsageError(f"train_batch_size={train_batch_size!r} must be a positive integer "
                         f"(the largest batch that fits)")
    device = _pick_device(device, model)
    b = micro_batch_size if micro_batch_size is not None else max(1, workload.reference_batch_size // accumulation)
    started = time.perf_counter()
    notes: list[str] = []
    protected = [obj for obj in (model, optimizer) if obj is not None]
    with StateGuard(*protected, rng=True) as guard:
        torch.manual_seed(seed)
        if model is None:
            # protected before build_model changes it: a `from_objects` workload hands back
            # the user's own model
            model = steps_module.build_model(workload, device, guard)
        model.train()
        # Refused before any training, which can take minutes.
        if method == "per_example" and _has_train_mode_batchnorm(model):
            raise UsageError(
                "method='per_example' is undefined for BatchNorm in train mode (each example's "
                "gradient depends on the rest of its batch through the batch statistics); use "
                "method='accumulation'"
            )
        generator = torch.Generator(device="cpu").manual_seed(seed)
        scaler = _grad_scaler(workload, device)
        if train_steps:
            optimizer = _train(workload, model, device, train_steps, generator, scaler, notes,
                               train_batch_size)
        _check_adam_state(precondition, optimizer, model)
        if _has_train_mode_batchnorm(model):
            notes.append(
                f"BatchNorm in train mode: each micro-batch of {b} is normalised by its own statistics, "
                f"so micro-batch gradients are not exact averages of i.i.d. per-example gradients; "
                f"B_simple describes batches formed that way"
            )
        done = _stopper(stop_when, confidence, steps, notes)
        if method == "accumulation":
            tracker, tokens_per_example = _measure_accumulation(
                workload, model, device, steps, b, accumulation, generator, scaler, optimizer, precondition,
                notes, done
            )
            small, big = b, b * accumulation
        else:
            tracker, units, examples = measure_per_example(
                workload, model, device, steps, b * accumulation, generator, optimizer, precondition, notes,
                done
            )
            tokens_per_example = _tokens_per_example(workload, units, examples)
            small, big = 1, b * accumulation
    if tracker.skipped:
        notes.append(f"{tracker.skipped} sample(s) skipped (gradients overflowed)")
    estimate = tracker.estimate(confidence)
    if estimate is None:
        raise ProbeFailedError(f"no finite noise sample in {steps} steps; every step overflowed")
    return _result(estimate, time.perf_counter() - started, method, small, big, workload, train_steps,
                   precondition, tracker.skipped, tokens_per_example, notes)


def _stopper(stop_when: StopRule | None, confidence: float, steps: int,
             notes: list[str]) -> Callable[[NoiseTracker, int], bool]:
    """Whether the samples so far end the probe after pass `index` of `steps`: `stop_when` on
    the estimate so far (never after the last pass, which ends it anyway, even when skipped
    samples left fewer than `steps`). Says so in `notes` when it does."""

    def done(tracker: NoiseTracker, index: int) -> bool:
        if stop_when is None or tracker.samples < 2 or index >= steps - 1:
            return False
        estimate = tracker.estimate(confidence)
        if estimate is None or not stop_when(estimate):
            return False
        reason = getattr(stop_when, "reason", "stop_when was met")
        notes.append(f"stopped after {tracker.samples} of at most {steps} samples: {reason}")
        return True

    return done


# -- the two measurements -------------------------------------------------------------------


def _measure_accumulation(
    workload: Workload,
    model: nn.Module,
    device: torch.device,
    steps: int,
    micro_batch_size: int,
    accumulation: int,
    generator: torch.Generator,
    scaler: torch.amp.GradScaler | None,
    optimizer: torch.optim.Optimizer | None,
    precondition: Precondition,
    notes: list[str],
    done: Callable[[NoiseTracker, int], bool],
) -> tuple[NoiseTracker, float | None]:
    monitor = GradientNoiseMonitor(
        model,
        micro_batch_size,
        every=1,
        loss_reduction=workload.loss_reduction,
        scaler=scaler,
        optimizer=optimizer,
        precondition=precondition,
        window=None,
    )
    units = examples = 0
    try:
        for index in range(steps):
            for _retry in range(_MAX_OVERFLOW_RETRIES + 1):
                model.zero_grad(set_to_none=True)
                for _micro in range(accumulation):
                    batch = workload.sample(micro_batch_size, device, generator)
                    units += workload.units_in(batch, micro_batch_size)
                    examples += micro_batch_size
                    steps_module.forward_backward(workload, model, batch, device, scaler)
                if monitor.step() is not None or scaler is None:
                    break
                # fp16 gradients overflowed: retry the sample at half the loss scale.
                scaler.update(new_scale=scaler.get_scale() / 2.0)
            if done(monitor.tracker, index):
                break
    finally:
        monitor.close()
        model.zero_grad(set_to_none=True)
    return monitor.tracker, _tokens_per_example(workload, units, examples)


# -- set-up ---------------------------------------------------------------------------------


def _train(
    workload: Workload,
    model: nn.Module,
    device: torch.device,
    train_steps: int,
    generator: torch.Generator,
    scaler: torch.amp.GradScaler | None,
    notes: list[str],
    train_batch_size: int | None = None,
) -> torch.optim.Optimizer:
    reference = workload.reference_batch_size
    micro = min(reference, train_batch_size or reference)
    chunks = math.ceil(reference / micro)
    optimizer = workload.build_optimizer(model.parameters(), workload.reference_lr)
    for _ in range(train_steps):
        for size in steps_module.split_sizes(reference, chunks):
            batch = workload.sample(size, device, generator)
            # Each chunk's share of a reference-batch mean (or its sum, for sum losses).
            steps_module.forward_backward(workload, model, batch, device, scaler,
                                          share=size / reference)
        steps_module.optimizer_step(optimizer, scaler)
    how = f" as {chunks} accumulated micro-batches" if chunks > 1 else ""
    notes.append(
        f"measured after {train_steps} training step(s) at batch {reference}{how}, "
        f"constant lr {workload.reference_lr:g}"
    )
    return optimizer


def _check_adam_state(precondition: Precondition, optimizer: torch.optim.Optimizer | None, model: nn.Module) -> None:
    if precondition is None:
        return
    first = next(p for p in model.parameters() if p.requires_grad)
    if optimizer is None or adam_denominator(optimizer, first) is None:
        raise UsageError(
            "precondition='adam' needs Adam second moments (exp_avg_sq): pass optimizer=<an Adam/AdamW "
            "that has stepped>, or train_steps>=1 with an Adam-family workload optimizer"
        )


def _grad_scaler(workload: Workload, device: torch.device) -> torch.amp.GradScaler | None:
    if not steps_module.needs_grad_scaler(workload, device):
        return None
    return torch.amp.GradScaler(device.type)


def _has_train_mode_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training for m in model.modules())


def _pick_device(device: str | torch.device | None, model: nn.Module | None) -> torch.device:
    model_device = next((p.device for p in model.parameters()), None) if model is not None else None
    if device is None and model_device is not None:
        return model_device
    resolved = resolve_device(device)
    if model_device is not None and model_device != resolved and not (
        model_device.type == resolved.type and resolved.index is None
    ):
        raise UsageError(f"the model lives on {model_device} but device={str(resolved)!r}; pass device=None")
    return model_device if model_device is not None else resolved


def _check_arguments(
    steps: Any, micro_batch_size: Any, accumulation: Any, method: Any, train_steps: Any, seed: Any, precondition: Any
) -> None:
    if method not in METHODS:
        raise UsageError(f"method={method!r} is not one of {', '.join(METHODS)}")
    if not _is_int(steps) or steps < 2:
        raise UsageError(f"steps={steps!r} must be an integer >= 2 (an interval needs two samples)")
    if micro_batch_size is not None and (not _is_int(micro_batch_size) or micro_batch_size < 1):
        raise UsageError(f"micro_batch_size={micro_batch_size!r} must be a positive integer")
    if not _is_int(accumulation) or accumulation < (2 if method == "accumulation" else 1):
        raise UsageError(
            f"accumulation={accumulation!r} must be an integer >= 2: two batch sizes (b and k*b) are "
            f"what the estimate solves for"
        )
    if not _is_int(train_steps) or train_steps < 0:
        raise UsageError(f"train_steps={train_steps!r} must be an integer >= 0")
    if not _is_int(seed):
        raise UsageError(f"seed={seed!r} must be an integer")
    if precondition not in (None, "adam"):
        raise UsageError(f"precondition={precondition!r} is not one of None, 'adam'")


def _result(
    estimate: NoiseScaleEstimate,
    seconds: float,
    method: Method,
    small: int,
    big: int,
    workload: Workload,
    train_steps: int,
    precondition: Precondition,
    skipped: int,
    tokens_per_example: float | None,
    notes: list[str],
) -> NoiseScaleResult:
    return NoiseScaleResult(
        b_simple=_finite(estimate.b_simple),
        ci_low=_finite(estimate.ci_low),  # an unbounded end (unresolved |G|^2) becomes None
        ci_high=_finite(estimate.ci_high),
        grad_sq_norm=estimate.grad_sq_norm,
        trace_sigma=estimate.trace_sigma,
        samples=estimate.samples,
        seconds=seconds,
        status=estimate.status,
        detail=estimate.detail,
        method=method,
        micro_batch_size=small,
        big_batch_size=big,
        confidence=estimate.confidence,
        unit=workload.unit,
        train_steps=train_steps,
        precondition=precondition,
        skipped_samples=skipped,
        tokens_per_example=tokens_per_example,
        notes=tuple(notes),
    )


def _tokens_per_example(workload: Workload, units: int, examples: int) -> float | None:
    if workload.unit != "tokens" or examples == 0:
        return None
    return units / examples


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _times(value: float | None, factor: float | None) -> float | None:
    return None if value is None or factor is None else value * factor


def _finite(value: float | None) -> float | None:
    return float(value) if value is not None and math.isfinite(value) else None
