"""Held-out top-1 accuracy from a DataLoader, as a Workload's `evaluate`: what `batchscope sweep`
and the adaptive benchmark score trials by, for a LightningModule classifier.

    job = batchscope.lightning.workload(module, datamodule,
                                        evaluate=batchscope.lightning.top1_accuracy(datamodule.val_dataloader()))
    batchscope.sweep(job, batch_sizes=[128, 512, 1024], epochs=30)

The model is called on the batch's first element (`model(x)` for `(x, y, ...)` batches, as a
LightningModule's `forward` takes it) and scored against the second; a validation_step is not
used (it logs rather than returns, and there is no trainer to log to).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

from batchscope.errors import UsageError


def top1_accuracy(loader: Iterable[Any]) -> Callable[[nn.Module, torch.device], float]:
    """An `evaluate(model, device)` returning the share of `loader`'s examples whose argmax
    output is the label, in eval mode under no_grad; every module's train/eval flag is given
    back as it was."""

    def evaluate(model: nn.Module, device: torch.device) -> float:
        modes = [(module, module.training) for module in model.modules()]
        model.eval()
        correct = torch.zeros((), dtype=torch.int64, device=device)
        seen = 0
        try:
            # A DataLoader draws its shuffling seed from the global RNG: keep that out of it.
            with torch.no_grad(), torch.random.fork_rng(devices=[]):
                for batch in loader:
                    inputs, labels = _inputs_and_labels(batch)
                    labels = labels.to(device)
                    outputs = model(inputs.to(device))
                    _check_shapes(outputs, labels)
                    correct += (outputs.argmax(dim=1) == labels).sum()
                    seen += labels.numel()
        finally:
            for module, training in modes:
                module.training = training
        if seen == 0:
            raise UsageError("the evaluation loader yielded no examples; pass the validation DataLoader")
        return int(correct.item()) / seen  # one device-to-host read, at the end

    return evaluate


def _inputs_and_labels(batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(batch, Sequence) and len(batch) >= 2 and all(
            isinstance(part, torch.Tensor) for part in batch[:2]):
        return batch[0], batch[1]
    raise UsageError(f"top1_accuracy needs (inputs, labels, ...) batches of tensors, got "
                     f"{type(batch).__name__}; pass evaluate=<your own (model, device) -> metric>")


def _check_shapes(outputs: torch.Tensor, labels: torch.Tensor) -> None:
    """Class scores along dim 1 and one integer label per remaining position; anything else
    (one-hot labels, a single-logit head) would score nonsense without an error."""
    expected = outputs.shape[:1] + outputs.shape[2:]
    if outputs.dim() < 2 or outputs.shape[1] < 2 or labels.shape != expected \
            or labels.is_floating_point():
        raise UsageError(f"top1_accuracy needs class scores (N, C, ...) with C >= 2 and integer "
                         f"labels (N, ...); got outputs {tuple(outputs.shape)} and labels "
                         f"{tuple(labels.shape)} ({labels.dtype}); pass evaluate=<your own "
                         "(model, device) -> metric>")
