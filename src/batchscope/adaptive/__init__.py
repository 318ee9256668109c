"""Adaptive batch size: grow the batch during training as the gradient noise scale grows.

`AdaptiveBatchSize` is the helper for a plain PyTorch loop (usually built with
`AdaptiveBatchSize.from_tune(result, model, optimizer, epochs=...)`); `AdaptiveBatchSampler` feeds
it batches of the current size; the decision itself is `analysis.adaptive_policy.BatchSizePolicy`
and the LR schedule by examples seen is `ExampleSchedule`; `save_adaptive_run` writes the run's
record and report.
"""

from batchscope.adaptive.controller import AdaptiveBatchSize
from batchscope.adaptive.record import adaptive_record, save_adaptive_run
from batchscope.adaptive.sampler import AdaptiveBatchSampler
from batchscope.adaptive.schedule import ExampleSchedule
from batchscope.analysis.adaptive_policy import BatchDecision, BatchSizePolicy

__all__ = ["AdaptiveBatchSampler", "AdaptiveBatchSize", "BatchDecision", "BatchSizePolicy", "ExampleSchedule",
           "adaptive_record", "save_adaptive_run"]
