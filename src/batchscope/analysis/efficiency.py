"""Statistical efficiency of a batch size, from the gradient noise scale (McCandlish et al. 2018).

With B_noise the noise scale, training to a fixed target takes
    steps     S = S_min (1 + B_noise / B)      (fewer steps with bigger batches, down to S_min)
    examples  E = E_min (1 + B / B_noise)      (more examples with bigger batches)
so (S/S_min - 1)(E/E_min - 1) = 1, and batches well below B_noise are almost free statistically
while batches well above it waste examples. Relative to a reference batch B0, the examples needed
at B0 divided by the examples needed at B is
    efficiency(B) = (B_noise + B0) / (B_noise + B),
1 at B0, in (0, 1] for B >= B0, falling towards 0 as B grows (and > 1 for B < B0).
All functions accept scalars or numpy arrays for the batch size.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from batchscope.analysis._checks import positive_number
from batchscope.errors import UsageError


def statistical_efficiency(batch_size: Any, noise_scale: float, base_batch_size: float) -> Any:
    """Examples needed at `base_batch_size` / examples needed at `batch_size` for the same target.

    An infinite noise scale (pure noise: every example counts fully) gives 1 everywhere.
    """
    batch = _batches(batch_size)
    base = positive_number("base_batch_size", base_batch_size)
    noise = _noise_scale(noise_scale)
    if math.isinf(noise):
        result = np.ones_like(batch)
    else:
        result = (noise + base) / (noise + batch)
    return _like_input(result, batch_size)


def steps_to_target(batch_size: Any, noise_scale: float, s_min: float) -> Any:
    """S = S_min (1 + B_noise / B): optimizer steps to reach the target at batch size B."""
    batch = _batches(batch_size)
    s_min = positive_number("s_min", s_min)
    noise = _noise_scale(noise_scale)
    return _like_input(s_min * (1.0 + noise / batch), batch_size)


def examples_to_target(batch_size: Any, noise_scale: float, e_min: float) -> Any:
    """E = E_min (1 + B / B_noise): training examples to reach the target at batch size B."""
    batch = _batches(batch_size)
    e_min = positive_number("e_min", e_min)
    noise = _noise_scale(noise_scale)
    if noise == 0:
        raise UsageError("noise_scale=0 makes examples_to_target infinite for every batch; pass a noise scale > 0")
    return _like_input(e_min * (1.0 + batch / noise), batch_size)


def critical_batch_size(s_min: float, e_min: float) -> float:
    """B_crit = E_min / S_min: the batch where S = 2 S_min and E = 2 E_min (McCandlish eq. 2.11);
    B_noise estimates it."""
    return positive_number("e_min", e_min) / positive_number("s_min", s_min)


def _noise_scale(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise UsageError(f"noise_scale={value!r} is not a number; pass the measured B_simple")
    value = float(value)
    if math.isnan(value) or value < 0:
        raise UsageError(f"noise_scale={value!r} must be >= 0; an unresolved noise scale cannot be used here")
    return value


def _batches(batch_size: Any) -> np.ndarray:
    batch = np.atleast_1d(np.asarray(batch_size, dtype=float))
    if not np.all(np.isfinite(batch)) or np.any(batch <= 0):
        raise UsageError(f"batch_size={batch_size!r} must be positive finite number(s)")
    return batch


def _like_input(result: np.ndarray, original: Any) -> Any:
    return float(result.reshape(-1)[0]) if np.ndim(original) == 0 else result
