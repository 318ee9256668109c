"""The exact reference for the noise probe on small models: per-example gradients.

`torch.func.vmap(grad(...))` gives every example's gradient in a batch of B, so each sample
compares batch 1 with batch B directly, free of the micro-batch approximation. It runs in
full precision (autocast off) and is undefined for BatchNorm in train mode (the caller refuses
that case): one example's gradient there depends on the rest of its batch.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torch.utils import _pytree as pytree

from batchscope import step as steps_module
from batchscope.errors import UsageError
from batchscope.probes.noise_online import NoiseSample, NoiseTracker, Precondition, adam_denominator
from batchscope.workload import Batch, Workload

# Per-example gradients held at once: chunk * parameters floats (~64 MiB at fp32).
_PER_EXAMPLE_FLOATS = 1 << 24


def measure_per_example(
    workload: Workload,
    model: nn.Module,
    device: torch.device,
    steps: int,
    batch_size: int,
    generator: torch.Generator,
    optimizer: torch.optim.Optimizer | None,
    precondition: Precondition,
    notes: list[str],
    done: Callable[[NoiseTracker, int], bool],
) -> tuple[NoiseTracker, int, int]:
    """B_simple samples from exact per-example gradients (small batch 1, big batch
    `batch_size`): `steps` batches, each example's gradient by `vmap(grad(...))` in chunks
    that bound the memory held. Returns the tracker and the units and examples drawn.
    `done(tracker, index)` ends the sampling early."""
    if batch_size < 2:
        raise UsageError(f"per-example batch micro_batch_size*accumulation={batch_size} must be >= 2")
    if workload.autocast_dtype is not None:
        notes.append("per-example gradients computed in full precision (autocast off)")
    if workload.loss_reduction == "sum":
        notes.append("loss_reduction='sum': a one-example sum equals its mean, no rescaling needed")
    names = [name for name, p in model.named_parameters() if p.requires_grad]
    trainable = {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}
    frozen = {name: p.detach() for name, p in model.named_parameters() if not p.requires_grad}
    frozen.update({name: b for name, b in model.named_buffers()})
    denominators = None
    if precondition == "adam":
        params = dict(model.named_parameters())
        denominators = {name: adam_denominator(optimizer, params[name]) for name in names}
    loss_module = _LossOfModel(workload, model)

    def example_loss(params: dict[str, torch.Tensor], example: Batch) -> torch.Tensor:
        one = pytree.tree_map(lambda leaf: leaf.unsqueeze(0) if isinstance(leaf, torch.Tensor) else leaf, example)
        merged = {**{f"model.{k}": v for k, v in frozen.items()}, **{f"model.{k}": v for k, v in params.items()}}
        return torch.func.functional_call(loss_module, merged, (one,)).float()

    per_example_grad = torch.func.vmap(
        torch.func.grad(example_loss), in_dims=(None, 0), randomness="different"
    )
    n_params = sum(t.numel() for t in trainable.values())
    chunk = max(1, min(batch_size, _PER_EXAMPLE_FLOATS // max(1, n_params)))
    tracker = NoiseTracker(window=None)
    units = examples = 0
    for index in range(steps):
        batch = workload.sample(batch_size, device, generator)
        units += workload.units_in(batch, batch_size)
        examples += batch_size
        sq_norm_sum = torch.zeros((), dtype=torch.float64, device=device)
        grad_sum = {name: torch.zeros_like(t, dtype=torch.float64) for name, t in trainable.items()}
        for start in range(0, batch_size, chunk):
            part = _slice_batch(batch, start, min(batch_size, start + chunk))
            grads = per_example_grad(trainable, part)
            for name in names:
                g = grads[name].double()
                if denominators is not None:
                    g = g / denominators[name].double()
                sq_norm_sum += g.flatten(1).square().sum()
                grad_sum[name] += g.sum(0)
        big_sq = sum(float((total / batch_size).square().sum()) for total in grad_sum.values())
        tracker.add(NoiseSample.from_norms(1, float(sq_norm_sum) / batch_size, batch_size, big_sq))
        if done(tracker, index):
            break
    return tracker, units, examples


class _LossOfModel(nn.Module):
    """The workload's loss as a module whose only submodule is the model, so
    `functional_call` can swap the model's parameters for per-example ones."""

    def __init__(self, workload: Workload, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self._loss = workload.loss

    def forward(self, batch: Batch) -> torch.Tensor:
        return self._loss(self.model, batch)


def _slice_batch(batch: Batch, start: int, stop: int) -> Batch:
    leaves = [leaf for leaf in pytree.tree_leaves(batch) if isinstance(leaf, torch.Tensor)]
    if not leaves:
        raise UsageError("method='per_example' needs batches whose tensors have the examples along dim 0")
    return steps_module.slice_batch(batch, start, stop)
