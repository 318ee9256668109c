"""Gradient noise scale across data-parallel ranks: local gradients (batch b each) versus the
all-reduced gradient (batch world*b), at no cost beyond one all-reduce of three scalars.

Every rank computes its gradient at the same parameters on its own examples, so the rank-local
gradients are the small batch and their average is the big batch of the same identity
E|G_B|^2 = |G|^2 + tr(Sigma)/B that `probes.noise_online` uses for accumulation. Two ways in:

- `DistributedGradientNoiseMonitor` for a `DistributedDataParallel` model: parameter hooks see
  each rank's local micro-batch gradient before DDP averages it (DDP reduces after autograd has
  accumulated `.grad`), and `.grad` holds the averaged gradient when `step()` is called.
  Accumulation under `no_sync()` adds more small batches: b_big = world * k * b.
- `all_reduce_gradients_with_noise` for loops that average gradients themselves: it reads the
  local norm, all-reduces the gradients (mean, in place, as DDP would) and reads the global norm.

Both all-reduce the scalars they need, so every rank computes the same sample from the same
numbers and all ranks agree on the estimate.
"""

from __future__ import annotations

from typing import Any, Iterable, Literal

import torch
import torch.distributed as dist
from torch import nn

from batchscope.checks import require_int
from batchscope.errors import UsageError
from batchscope.probes.noise_online import GradientNoiseMonitor, NoiseSample, _foreach_norms, _sum_of_squares


class DistributedGradientNoiseMonitor(GradientNoiseMonitor):
    """`GradientNoiseMonitor` for DDP: per-rank micro-batch gradients vs the all-reduced one.

    All ranks must call `step()` on the same steps (they do when they call it once per optimizer
    step): on measured steps it performs one collective. Takes the same arguments as
    `GradientNoiseMonitor` plus `group` (the process group; default the world), and works with a
    single micro-batch per step as long as world_size >= 2.
    """

    def __init__(self, model: nn.Module, micro_batch_size: int, *, group: Any = None, **options: Any) -> None:
        _require_initialized()
        self.group = group
        super().__init__(model, micro_batch_size, **options)

    def _combine(self, local: torch.Tensor) -> tuple[float, float, float, float, int]:
        world = dist.get_world_size(self.group)
        dist.all_reduce(local, op=dist.ReduceOp.SUM, group=self.group)
        small_sum, big_sq_sum, micro_batches, valid = local.tolist()
        # .grad is already averaged by DDP, so each rank contributed the same big norm; the sum
        # over ranks / world is that value, now bit-identical everywhere.
        return small_sum, big_sq_sum / world, micro_batches, valid, world


def all_reduce_gradients_with_noise(
    parameters: Iterable[torch.Tensor] | nn.Module,
    local_batch_size: int,
    *,
    group: Any = None,
    loss_reduction: Literal["mean", "sum"] = "mean",
    loss_multiplier: float = 1.0,
) -> NoiseSample:
    """Average `.grad` over the ranks in place (like DDP) and return the noise sample it implies.

    Call it where an explicit-all-reduce loop would all-reduce, after backward and before
    clipping or stepping. `local_batch_size` is the examples behind each rank's `.grad`; the
    loss scaling arguments mean what they mean for `GradientNoiseMonitor`. Returns the same
    sample on every rank; feed it to a `NoiseTracker` to smooth over steps.
    """
    _require_initialized()
    if isinstance(parameters, nn.Module):
        parameters = parameters.parameters()
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        raise UsageError("no parameter has a .grad; call this after backward()")
    local_batch_size = require_int("local_batch_size", local_batch_size)
    if loss_reduction not in ("mean", "sum"):
        raise UsageError(f"loss_reduction={loss_reduction!r} is not one of mean, sum")
    world = dist.get_world_size(group)
    if world < 2:
        raise UsageError(f"world_size={world}: a data-parallel noise estimate needs at least 2 ranks")
    device = grads[0].device
    local_sq = _sum_of_squares(_foreach_norms(grads), device)
    works = [dist.all_reduce(g, op=dist.ReduceOp.SUM, group=group, async_op=True) for g in grads]
    for work in works:
        work.wait()
    torch._foreach_div_(grads, float(world))
    global_sq = _sum_of_squares(_foreach_norms(grads), device)
    scalars = torch.stack([local_sq, global_sq])
    dist.all_reduce(scalars, op=dist.ReduceOp.SUM, group=group)
    local_sum, global_sum = scalars.tolist()
    multiplier = float(loss_multiplier) * (local_batch_size if loss_reduction == "sum" else 1.0)
    return NoiseSample.from_norms(
        local_batch_size,
        local_sum / world / multiplier**2,
        world * local_batch_size,
        global_sum / world / multiplier**2,
    )


def _require_initialized() -> None:
    if not (dist.is_available() and dist.is_initialized()):
        raise UsageError(
            "torch.distributed is not initialised; call torch.distributed.init_process_group(...) "
            "first, or use GradientNoiseMonitor on a single process"
        )
