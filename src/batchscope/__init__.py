"""batchscope: measure, explain and recommend the training batch size for a PyTorch workload.

The pipeline: `probe_memory` (largest batch that fits) -> `measure_throughput` (samples/s per
batch, knee) -> `estimate_noise_scale` (gradient noise scale) -> goodput plan -> `tune`'s
recommendation; `sweep` runs real training trials over batch sizes (Optuna or Ray Tune);
`AdaptiveBatchSize` grows the batch during training as the noise scale grows.
"""

__version__ = "0.1.0"

from batchscope.adaptive import AdaptiveBatchSize  # noqa: E402
from batchscope.errors import BatchscopeError, ProbeFailedError, UsageError  # noqa: E402
from batchscope.guard import StateGuard, preserve_user_state  # noqa: E402
from batchscope.oom import is_oom, run_catching_oom  # noqa: E402
from batchscope.probes.memory import MemoryProbeResult, probe_memory  # noqa: E402
from batchscope.probes.noise import NoiseScaleResult, estimate_noise_scale  # noqa: E402
from batchscope.probes.noise_online import GradientNoiseMonitor  # noqa: E402
from batchscope.probes.throughput import ThroughputResult, measure_throughput  # noqa: E402
from batchscope.record import RunRecord  # noqa: E402
from batchscope.recommend import Recommendation  # noqa: E402
from batchscope.tuning import TuneResult, tune  # noqa: E402
from batchscope.workload import Workload, load_entry_point, resolve_workload  # noqa: E402

# `batchscope.sweep` is also the subpackage's name; the function is bound last on purpose, so
# `batchscope.sweep(...)` is the API while `from batchscope.sweep.api import ...` still works.
from batchscope.sweep.api import SweepResult  # noqa: E402
from batchscope.sweep.api import sweep  # noqa: E402

__all__ = [
    "AdaptiveBatchSize",
    "BatchscopeError",
    "GradientNoiseMonitor",
    "MemoryProbeResult",
    "NoiseScaleResult",
    "ProbeFailedError",
    "Recommendation",
    "RunRecord",
    "StateGuard",
    "SweepResult",
    "ThroughputResult",
    "TuneResult",
    "UsageError",
    "Workload",
    "__version__",
    "estimate_noise_scale",
    "is_oom",
    "load_entry_point",
    "measure_throughput",
    "preserve_user_state",
    "probe_memory",
    "resolve_workload",
    "run_catching_oom",
    "sweep",
    "tune",
]
