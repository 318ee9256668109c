"""Statistical efficiency and steps/examples to target: invariants of McCandlish et al. 2018."""

from __future__ import annotations

import math

import numpy as np
import pytest

from batchscope.analysis.efficiency import (
    critical_batch_size,
    examples_to_target,
    statistical_efficiency,
    steps_to_target,
)
from batchscope.errors import UsageError

BATCHES = np.array([1, 2, 8, 32, 128, 512, 2048, 8192, 65536], dtype=float)


def test_efficiency_known_values():
    # (B_noise + B0)/(B_noise + B) with B_noise = 1000, B0 = 128
    assert statistical_efficiency(128, 1000.0, 128) == 1.0
    assert statistical_efficiency(1000, 1000.0, 128) == pytest.approx(1128 / 2000)
    assert statistical_efficiency(32, 1000.0, 128) == pytest.approx(1128 / 1032)


@pytest.mark.parametrize("noise", [0.0, 10.0, 1000.0, 1e6])
def test_efficiency_range_and_monotonic(noise):
    base = 128
    eff = statistical_efficiency(BATCHES, noise, base)
    assert np.all(np.diff(eff) < 0)  # falls as the batch grows
    above = eff[BATCHES >= base]
    assert np.all((above > 0) & (above <= 1))
    assert np.all(eff[BATCHES < base] > 1)


def test_efficiency_limits():
    noise, base = 500.0, 64
    assert statistical_efficiency(1e-9, noise, base) == pytest.approx((noise + base) / noise)
    assert statistical_efficiency(1e12, noise, base) == pytest.approx(0.0, abs=1e-9)
    np.testing.assert_array_equal(statistical_efficiency(BATCHES, math.inf, base), np.ones_like(BATCHES))
    # No noise: doubling the batch halves the work each example does.
    assert statistical_efficiency(256, 0.0, 64) == pytest.approx(0.25)


def test_steps_and_examples_known_values_and_identity():
    noise, s_min, e_min = 400.0, 1000.0, 400_000.0
    steps = steps_to_target(BATCHES, noise, s_min)
    examples = examples_to_target(BATCHES, noise, e_min)
    np.testing.assert_allclose((steps / s_min - 1) * (examples / e_min - 1), 1.0, rtol=1e-12)
    assert steps_to_target(400, noise, s_min) == pytest.approx(2 * s_min)  # at B = B_noise: twice the minimum
    assert examples_to_target(400, noise, e_min) == pytest.approx(2 * e_min)
    assert critical_batch_size(s_min, e_min) == pytest.approx(400.0)


def test_steps_and_examples_limits_and_monotonic():
    noise = 400.0
    steps = steps_to_target(BATCHES, noise, 10.0)
    examples = examples_to_target(BATCHES, noise, 10.0)
    assert np.all(np.diff(steps) < 0) and np.all(np.diff(examples) > 0)
    assert steps_to_target(1e12, noise, 10.0) == pytest.approx(10.0)  # B -> inf: S -> S_min
    assert examples_to_target(1e-9, noise, 10.0) == pytest.approx(10.0)  # B -> 0: E -> E_min
    assert isinstance(steps_to_target(8, noise, 10.0), float)


@pytest.mark.parametrize(
    "call",
    [
        lambda: statistical_efficiency(0, 10.0, 8),
        lambda: statistical_efficiency(8, -1.0, 8),
        lambda: statistical_efficiency(8, float("nan"), 8),
        lambda: statistical_efficiency(8, None, 8),
        lambda: statistical_efficiency(8, 10.0, 0),
        lambda: steps_to_target(8, 10.0, -1.0),
        lambda: examples_to_target(8, 0.0, 1.0),
    ],
)
def test_bad_input_is_a_usage_error(call):
    with pytest.raises(UsageError) as info:
        call()
    assert "\n" not in str(info.value)
