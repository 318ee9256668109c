"""A training batch cut along its first dimension: a tensor, or a tuple, list or dict of
tensors sharing that dimension (what `AdaptiveBatchSize.micro_batches` splits)."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch

from batchscope.errors import UsageError


def batch_length(batch: Any) -> int:
    """Examples in `batch`: the first dimension of its first tensor."""
    if isinstance(batch, torch.Tensor):
        if batch.dim() == 0:
            raise UsageError("the batch is a 0-d tensor; pass tensors whose first dimension is the batch")
        return int(batch.shape[0])
    if isinstance(batch, Mapping) and batch:
        return batch_length(next(iter(batch.values())))
    if isinstance(batch, Sequence) and not isinstance(batch, (str, bytes)) and batch:
        return batch_length(batch[0])
    raise UsageError(f"cannot split a batch of type {type(batch).__name__}; pass a tensor or a "
                     "tuple/list/dict of tensors")


def slice_batch(batch: Any, start: int, end: int) -> Any:
    """Rows start:end of every tensor in `batch`, in the same structure (dicts become dicts)."""
    if isinstance(batch, torch.Tensor):
        return batch[start:end]
    if isinstance(batch, Mapping):
        return {key: slice_batch(value, start, end) for key, value in batch.items()}
    if isinstance(batch, tuple):
        return tuple(slice_batch(value, start, end) for value in batch)
    if isinstance(batch, list):
        return [slice_batch(value, start, end) for value in batch]
    return batch  # non-tensor extras (a string tag, say) go to every micro-batch
