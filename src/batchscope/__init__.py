"""batchscope: measure, explain and recommend the training batch size for a PyTorch workload."""

from batchscope.errors import BatchscopeError, UsageError
from batchscope.record import RunRecord
from batchscope.workload import Workload, load_entry_point, resolve_workload

__version__ = "0.1.0"

__all__ = [
    "BatchscopeError",
    "RunRecord",
    "UsageError",
    "Workload",
    "__version__",
    "load_entry_point",
    "resolve_workload",
]
