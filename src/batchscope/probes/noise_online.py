"""Gradient noise scale inside a training loop, from the gradients the loop computes anyway.

Two batch sizes come for free with gradient accumulation: each micro-batch gradient g_i is a
gradient at batch b, and the accumulated gradient is one at batch k*b (McCandlish et al. 2018,
appendix A.1). Both at the same parameters, so
    E|g_i|^2 = |G|^2 + tr(Sigma)/b      and      E|mean_i g_i|^2 = |G|^2 + tr(Sigma)/(k b)
give unbiased |G|^2 and tr(Sigma) per optimizer step (`analysis.noise_stats.unbiased_components`).

How the micro-batch norms are read without extra passes or gradient copies: a tensor hook on each
parameter sees the gradient of *one* backward pass before autograd adds it into `.grad`, so its
squared norm is taken right there (one reduction per parameter per micro-batch, on the device,
no synchronisation). The big-batch norm is one fused `torch._foreach_norm` over `.grad` when the
step ends. Under DistributedDataParallel the same hooks see the rank-local gradient (DDP reduces
after accumulation), which is what `probes.noise_ddp` builds on.

Usage (call `step()` after the last backward of an optimizer step and BEFORE clipping, unscaling
or `optimizer.step()`: clipping rescales `.grad` and would bias the big-batch norm)::

    monitor = GradientNoiseMonitor(model, micro_batch_size=64, every=10, scaler=scaler)
    for inputs in loader:
        for micro in split(inputs, accumulation):
            scaler.scale(loss_fn(model, micro)).backward()
        monitor.step()                      # before unscale_/clip_grad_norm_/step
        scaler.unscale_(optimizer); clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(optimizer); scaler.update(); optimizer.zero_grad()
    print(monitor.estimate().b_simple)

With one micro-batch per step there is only one batch size: the monitor then records nothing
(use `noise_ddp` across ranks, or accumulate at least two micro-batches).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Literal

import torch
from torch import nn

from batchscope.analysis.noise_stats import (
    NoiseScaleEstimate,
    SmoothedNoiseScale,
    noise_scale_with_ci,
    unbiased_components,
)
from batchscope.checks import require_int
from batchscope.errors import UsageError

Precondition = Literal["adam"] | None


@dataclass(frozen=True)
class NoiseSample:
    """One optimizer step's measurement: mean squared norm of the b-example gradients and the
    squared norm of their b_big-example mean, both in per-mean-loss units, and the unbiased
    |G|^2 and tr(Sigma) they imply."""

    b_small: int
    b_big: int
    sq_norm_small: float
    sq_norm_big: float
    grad_sq_norm: float
    trace_sigma: float

    @classmethod
    def from_norms(cls, b_small: int, sq_norm_small: float, b_big: int, sq_norm_big: float) -> "NoiseSample":
        g2, trace = unbiased_components(b_small, sq_norm_small, b_big, sq_norm_big)
        return cls(int(b_small), int(b_big), float(sq_norm_small), float(sq_norm_big), float(g2), float(trace))

    @property
    def finite(self) -> bool:
        return all(math.isfinite(v) for v in (self.sq_norm_small, self.sq_norm_big))


class NoiseTracker:
    """Collects `NoiseSample`s; |G|^2 and tr(Sigma) are averaged separately, then divided.

    `estimate()` uses plain means over the last `window` samples (all of them when window is
    None, right for fixed parameters) with a jackknife interval; `smoothed_b_simple` is the
    bias-corrected EMA of each quantity, which follows a drifting noise scale during training.
    Non-finite samples (an fp16 overflow step) are counted and skipped, never averaged in.
    """

    def __init__(self, window: int | None = None, ema_beta: float = 0.9) -> None:
        if window is not None:
            window = require_int("window", window, minimum=2, hint="samples per estimate, or None for all")
        self.window = window
        self._g2: list[float] = []
        self._trace: list[float] = []
        self._smoothed = SmoothedNoiseScale(ema_beta)
        self.skipped = 0
        self.last: NoiseSample | None = None

    def add(self, sample: NoiseSample) -> bool:
        """Record a sample; returns False (and counts it) when it is not finite."""
        if not (sample.finite and math.isfinite(sample.grad_sq_norm) and math.isfinite(sample.trace_sigma)):
            self.skipped += 1
            return False
        self.last = sample
        self._g2.append(sample.grad_sq_norm)
        self._trace.append(sample.trace_sigma)
        if self.window is not None and len(self._g2) > self.window:
            del self._g2[0], self._trace[0]
        self._smoothed.update(sample.grad_sq_norm, sample.trace_sigma)
        return True

    @property
    def samples(self) -> int:
        return len(self._g2)

    @property
    def g2_samples(self) -> list[float]:
        return list(self._g2)

    @property
    def trace_samples(self) -> list[float]:
        return list(self._trace)

    @property
    def smoothed_b_simple(self) -> float | None:
        return self._smoothed.b_simple

    def state_dict(self) -> dict[str, Any]:
        """The samples in the window and both smoothed averages, so a resumed run estimates from
        the same numbers an uninterrupted one would (plain floats: JSON- and torch.save-safe)."""
        return {"g2": list(self._g2), "trace": list(self._trace), "skipped": self.skipped,
                "ema_g2": list(self._smoothed.grad_sq_norm.state()),
                "ema_trace": list(self._smoothed.trace_sigma.state())}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        g2, trace = [float(v) for v in state["g2"]], [float(v) for v in state["trace"]]
        if len(g2) != len(trace):
            raise UsageError(f"noise tracker state has {len(g2)} |G|^2 and {len(trace)} tr(Sigma) "
                             "samples; pass what state_dict() returned")
        keep = len(g2) if self.window is None else self.window
        self._g2, self._trace = g2[-keep:], trace[-keep:]
        self.skipped = int(state["skipped"])
        self._smoothed.grad_sq_norm.restore(tuple(state["ema_g2"]))
        self._smoothed.trace_sigma.restore(tuple(state["ema_trace"]))

    def estimate(self, confidence: float = 0.9) -> NoiseScaleEstimate | None:
        """B_simple with its interval, or None before the first sample."""
        if not self._g2:
            return None
        return noise_scale_with_ci(self._g2, self._trace, confidence)


class GradientNoiseMonitor:
    """Online B_simple for a user's loop with gradient accumulation (see the module docstring).

    Args:
        model: the module being trained (a DDP wrapper or its `.module`; same parameters).
        micro_batch_size: examples in each micro-batch (per rank under DDP).
        every: measure one optimizer step in `every`; the hooks do nothing on the others.
        loss_reduction: "sum" when the loss is summed over the micro-batch (gradients are then
            divided by micro_batch_size to get per-mean-loss gradients).
        loss_multiplier: the constant the loss is multiplied by before backward, besides AMP
            scaling (e.g. 1/accumulation when the loop divides the loss by the number of
            micro-batches). B_simple does not depend on it; the reported |G|^2, tr(Sigma) do.
        scaler: the loop's `torch.amp.GradScaler`, if any: norms are divided by its current
            scale, and steps whose gradients overflowed are skipped.
        optimizer / precondition: precondition="adam" measures the noise scale of the update
            direction Adam takes, g / (sqrt(v_hat) + eps), from the optimizer's `exp_avg_sq`;
            steps before the optimizer has that state are skipped.
        window / ema_beta: see `NoiseTracker`.
    """

    def __init__(
        self,
        model: nn.Module,
        micro_batch_size: int,
        *,
        every: int = 10,
        loss_reduction: Literal["mean", "sum"] = "mean",
        loss_multiplier: float = 1.0,
        scaler: Any = None,
        optimizer: torch.optim.Optimizer | None = None,
        precondition: Precondition = None,
        window: int | None = 64,
        ema_beta: float = 0.9,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise UsageError(f"model={type(model).__name__} is not a torch.nn.Module")
        micro_batch_size = require_int("micro_batch_size", micro_batch_size)
        every = require_int("every", every)
        if loss_reduction not in ("mean", "sum"):
            raise UsageError(f"loss_reduction={loss_reduction!r} is not one of mean, sum")
        _check_multiplier(loss_multiplier)
        check_precondition(precondition, optimizer)
        self.micro_batch_size = micro_batch_size
        self.every = every
        self.scaler = scaler
        self.optimizer = optimizer
        self.precondition = precondition
        # Micro-batch gradient in per-mean-loss units = raw gradient / multiplier.
        self._sum_reduction = loss_reduction == "sum"
        self._multiplier = float(loss_multiplier) * (micro_batch_size if self._sum_reduction else 1.0)
        self.tracker = NoiseTracker(window=window, ema_beta=ema_beta)
        self._params = [p for p in model.parameters() if p.requires_grad]
        if not self._params:
            raise UsageError("the model has no parameters with requires_grad=True; nothing to measure")
        self._step_index = 0
        self._measuring = True
        self._postponed = False
        self._small_norms: list[torch.Tensor] = []
        self._hook_calls = [0] * len(self._params)
        self._denominators: dict[int, torch.Tensor] = {}
        self._precondition_missing = False
        self._handles = [p.register_hook(self._make_hook(i)) for i, p in enumerate(self._params)]

    # -- checkpoints --------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Which step comes next (so the same steps are measured after a resume) and the
        tracker's samples and averages. Call between optimizer steps."""
        return {"step_index": self._step_index, "measuring": self._measuring,
                "tracker": self.tracker.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._step_index = require_int("step_index", state["step_index"], minimum=0)
        self._measuring = bool(state["measuring"])
        self._postponed = False
        self.tracker.load_state_dict(state["tracker"])

    # -- the loop's calls ---------------------------------------------------------------------

    def step(self) -> NoiseSample | None:
        """End of an optimizer step's backward passes (before clipping/unscaling/stepping).

        Returns the step's sample, or None when the step was not measured or had fewer than two
        micro-batches, and also when its gradients overflowed or Adam state was missing (those
        are counted in `tracker.skipped`).
        """
        sample = self._finish_step() if self._measuring else None
        self._step_index += 1
        self._measuring = self._step_index % self.every == 0 or self._postponed
        self._postponed = False
        self._small_norms.clear()
        self._hook_calls = [0] * len(self._params)
        self._denominators.clear()
        self._precondition_missing = False
        if sample is not None and not self.tracker.add(sample):
            return None
        return sample

    def estimate(self, confidence: float = 0.9) -> NoiseScaleEstimate | None:
        """Current B_simple (means over the recent window) with its interval; None before data."""
        return self.tracker.estimate(confidence)

    @property
    def b_simple(self) -> float | None:
        """The bias-corrected-EMA B_simple (follows training); None until |G|^2 > 0."""
        return self.tracker.smoothed_b_simple

    @property
    def measuring(self) -> bool:
        """Whether the current optimizer step is being measured."""
        return self._measuring

    def set_micro_batches(self, micro_batch_size: int, loss_multiplier: float = 1.0) -> None:
        """Change the micro-batch size and loss multiplier from the next backward pass on (for a
        loop whose batch changes during training, `batchscope.adaptive`). Call it before the
        step's first backward: a step must have equal micro-batches throughout."""
        micro_batch_size = require_int("micro_batch_size", micro_batch_size)
        _check_multiplier(loss_multiplier)
        self.micro_batch_size = micro_batch_size
        self._multiplier = float(loss_multiplier) * (micro_batch_size if self._sum_reduction else 1.0)

    def postpone(self) -> None:
        """Do not measure the current step; measure the next one instead (for a step whose
        micro-batches are of unequal sizes). Call it before the step's first backward."""
        if self._measuring:
            self._measuring = False
            self._postponed = True

    def close(self) -> None:
        """Remove the hooks; the model is then exactly as before the monitor was attached."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> "GradientNoiseMonitor":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- internals ----------------------------------------------------------------------------

    def _make_hook(self, index: int):
        param = self._params[index]

        def hook(grad: torch.Tensor) -> None:
            if not self._measuring:
                return None
            self._hook_calls[index] += 1
            if self.precondition is not None:
                denominator = self._denominator(param)
                if denominator is None:
                    self._precondition_missing = True
                    return None
                grad = grad / denominator
            self._small_norms.append(torch.linalg.vector_norm(grad, dtype=torch.float32))
            return None  # the gradient itself is left unchanged

        return hook

    def _denominator(self, param: nn.Parameter) -> torch.Tensor | None:
        key = id(param)
        if key not in self._denominators:
            denominator = adam_denominator(self.optimizer, param)
            if denominator is None:
                return None
            self._denominators[key] = denominator
        return self._denominators[key]

    def _finish_step(self) -> NoiseSample | None:
        device = self._params[0].device
        with_grad = [p for p in self._params if p.grad is not None]
        valid = not self._precondition_missing
        grads = [p.grad.detach() for p in with_grad]
        if self.precondition is not None and valid:
            denominators = [self._denominator(p) for p in with_grad]
            valid = all(d is not None for d in denominators)
            if valid:
                grads = list(torch._foreach_div(grads, denominators))
        big_sq = _sum_of_squares(_foreach_norms(grads), device) if grads and valid else _zero(device)
        local = torch.stack([
            _sum_of_squares(self._small_norms, device),
            big_sq,
            torch.tensor(float(max(self._hook_calls)), device=device),
            torch.tensor(1.0 if valid else 0.0, device=device),
        ])
        small_sum, big_sq_value, micro_batches, valid_ranks, world = self._combine(local)
        if valid_ranks < world:
            self.tracker.skipped += 1
            return None
        if micro_batches < 2:
            return None
        local_micro = micro_batches / world
        # .grad holds the sum over the local micro-batches (averaged over ranks under DDP), so the
        # big-batch mean gradient is .grad / local_micro; everything is then put in
        # per-mean-loss units by dividing by the loss multiplier and the AMP scale.
        scale = self._multiplier * self._amp_scale()
        sq_small = small_sum / micro_batches / scale**2
        sq_big = big_sq_value / local_micro**2 / scale**2
        b = self.micro_batch_size
        return NoiseSample.from_norms(b, sq_small, int(round(b * micro_batches)), sq_big)

    def _combine(self, local: torch.Tensor) -> tuple[float, float, float, float, int]:
        """(sum of micro-batch squared norms, big-batch squared norm, micro-batches, ranks with a
        valid measurement, world size). One process: the local values; this `.tolist()` is the
        one synchronisation per measured step. `noise_ddp` overrides it with an all-reduce."""
        small_sum, big_sq, micro_batches, valid = local.tolist()
        return small_sum, big_sq, micro_batches, valid, 1

    def _amp_scale(self) -> float:
        if self.scaler is None or not self.scaler.is_enabled():
            return 1.0
        return float(self.scaler.get_scale())


# -- helpers shared with the offline probe and the DDP estimator ------------------------------


def _check_multiplier(loss_multiplier: float) -> None:
    if not (isinstance(loss_multiplier, (int, float)) and not isinstance(loss_multiplier, bool)
            and math.isfinite(loss_multiplier) and loss_multiplier != 0):
        raise UsageError(f"loss_multiplier={loss_multiplier!r} must be a finite non-zero number")


def check_precondition(precondition: Precondition, optimizer: torch.optim.Optimizer | None) -> None:
    if precondition not in (None, "adam"):
        raise UsageError(f"precondition={precondition!r} is not one of None, 'adam'")
    if precondition == "adam" and not isinstance(optimizer, torch.optim.Optimizer):
        raise UsageError("precondition='adam' needs optimizer=<your Adam/AdamW optimizer> (it reads exp_avg_sq)")


def adam_denominator(optimizer: torch.optim.Optimizer | None, param: torch.Tensor) -> torch.Tensor | None:
    """sqrt(v_hat) + eps as Adam divides by it (v_hat = exp_avg_sq / (1 - beta2^step)), or None
    while the optimizer holds no second moment for `param` (before its first step)."""
    if optimizer is None:
        return None
    state = optimizer.state.get(param)
    if not state or "exp_avg_sq" not in state:
        return None
    group = next((g for g in optimizer.param_groups if any(p is param for p in g["params"])), None)
    if group is None:
        return None
    step = float(state["step"]) if "step" in state else 1.0
    beta2 = float(group.get("betas", (0.9, 0.999))[1])
    eps = float(group.get("eps", 1e-8))
    bias_correction = 1.0 - beta2**step if step > 0 else 1.0
    return state["exp_avg_sq"].detach().float().sqrt() / math.sqrt(bias_correction) + eps


def _foreach_norms(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """One fused norm kernel per device/dtype group, computed in float32 (fp16 norms overflow)."""
    try:
        return list(torch._foreach_norm(tensors, 2.0, dtype=torch.float32))
    except (TypeError, RuntimeError):  # older torch without the dtype argument
        return [torch.linalg.vector_norm(t, dtype=torch.float32) for t in tensors]


def _sum_of_squares(norms: Iterable[torch.Tensor], device: torch.device) -> torch.Tensor:
    norms = [n.to(device) for n in norms]
    if not norms:
        return _zero(device)
    return torch.stack(norms).square().sum()


def _zero(device: torch.device) -> torch.Tensor:
    return torch.zeros((), dtype=torch.float32, device=device)
