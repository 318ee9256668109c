"""PyTorch Lightning integration (optional: `pip install 'batchscope[lightning]'`).

- `tune(module, datamodule)` / `workload(module, datamodule)`: batchscope's tune on a
  LightningModule's own training job, in place of Lightning's batch-size finder;
  `top1_accuracy(val_loader)` scores it, for `batchscope.sweep`.
- `AdaptiveBatchSizeCallback`: the adaptive mode (`batchscope.AdaptiveBatchSize`) inside
  `Trainer.fit`, for a module with manual optimization.
"""

from __future__ import annotations

from typing import Any

from batchscope.lightning.evaluate import top1_accuracy
from batchscope.lightning.module_workload import tune, workload

__all__ = ["AdaptiveBatchSizeCallback", "top1_accuracy", "tune", "workload"]


def __getattr__(name: str) -> Any:
    # The callback subclasses Lightning's Callback, so Lightning is imported only when it is asked for.
    if name == "AdaptiveBatchSizeCallback":
        from batchscope.lightning.adaptive_callback import AdaptiveBatchSizeCallback

        return AdaptiveBatchSizeCallback
    raise AttributeError(f"module 'batchscope.lightning' has no attribute {name!r}")
