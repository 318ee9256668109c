"""Adaptive batch size: grow the batch during training as the gradient noise scale grows.

`AdaptiveBatchSize` is the helper for a plain PyTorch loop (usually built with
`AdaptiveBatchSize.from_tune(result, model, optimizer, epochs=...)`); `AdaptiveBatchSampler` feeds
it batches of the current size; the decision itself is `analysis.adaptive_policy.BatchSizePolicy`
and the LR schedule by examples seen is `ExampleSchedule`.
"""

from batchscope.adaptive.controller import AdaptiveBatchSize
from batchscope.adaptive.sampler import AdaptiveBatchSampler
from batchscope.adaptive.schedule import ExampleSchedule
from batchscope.analysis.adaptive_policy import BatchDecision, BatchSizePolicy

__all__ = ["AdaptiveBatchSampler", "AdaptiveBatchSize", "BatchDecision", "BatchSizePolicy", "ExampleSchedule"]
