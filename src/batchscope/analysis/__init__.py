"""Analysis maths (numpy only, no torch): throughput model, gradient noise statistics,
statistical efficiency and goodput. Probes measure; these functions turn measurements into a plan."""

from batchscope.analysis.efficiency import (
    critical_batch_size,
    examples_to_target,
    statistical_efficiency,
    steps_to_target,
)
from batchscope.analysis.goodput import (
    GoodputPlan,
    GoodputPoint,
    accumulation_for,
    device_split,
    global_samples_per_s,
    goodput,
    plan_batch_size,
)
from batchscope.analysis.noise_stats import (
    BiasCorrectedEMA,
    NoiseScaleEstimate,
    SmoothedNoiseScale,
    noise_scale_with_ci,
    student_t_quantile,
    unbiased_components,
)
from batchscope.analysis.throughput_model import (
    ThroughputModel,
    best_batch_size,
    fit_affine,
    fit_throughput_model,
    has_flattened,
    knee_batch_size,
)

__all__ = [
    "BiasCorrectedEMA",
    "GoodputPlan",
    "GoodputPoint",
    "NoiseScaleEstimate",
    "SmoothedNoiseScale",
    "ThroughputModel",
    "accumulation_for",
    "device_split",
    "best_batch_size",
    "critical_batch_size",
    "examples_to_target",
    "fit_affine",
    "fit_throughput_model",
    "global_samples_per_s",
    "goodput",
    "has_flattened",
    "knee_batch_size",
    "noise_scale_with_ci",
    "plan_batch_size",
    "statistical_efficiency",
    "steps_to_target",
    "student_t_quantile",
    "unbiased_components",
]
