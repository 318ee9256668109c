"""tune's upper bound on the batch: the batch giving MIN_STEPS_PER_EPOCH steps an epoch, never
below the reference batch, and none without a dataset size."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from batchscope import tuning


@pytest.mark.parametrize("dataset_size, reference, bound, reason", [
    (50_000, 128, 5_000, "batch giving 10 steps an epoch"),
    (640, 64, 64, "batch giving 10 steps an epoch"),
    (500, 64, 64, "reference batch"),
    (None, 64, None, "batch giving 10 steps an epoch"),
])
def test_the_largest_useful_batch(dataset_size, reference, bound, reason):
    workload = SimpleNamespace(dataset_size=dataset_size, reference_batch_size=reference)
    assert tuning._largest_useful_batch(workload) == bound
    assert tuning._largest_useful_reason(workload) == reason


def test_the_plan_never_goes_past_the_bound_even_with_accumulation():
    workload = SimpleNamespace(dataset_size=50_000, reference_batch_size=128)
    throughput = SimpleNamespace(points=[SimpleNamespace(batch_size=b) for b in (8, 16, 32)])
    # 1000 fits; accumulation could reach 16,000, the dataset 50,000: the bound is 5,000.
    sizes = tuning._candidates(workload, throughput, 1000, "time", None, floor=32)
    assert max(sizes) == 4096 and 128 in sizes and 1000 in sizes and min(sizes) == 32


def test_a_plan_at_the_batchnorm_floor_says_smaller_batches_were_ruled_out_not_missed():
    from batchscope.analysis.goodput import plan_batch_size
    from batchscope.analysis.throughput_model import fit_throughput_model
    from batchscope.tuning import _at_the_floor

    model = fit_throughput_model([32, 64, 128], [0.010, 0.020, 0.040])  # throughput flat
    plan = plan_batch_size([32, 64, 128], model, 10.0, max_fit_batch_size=128, reference_batch_size=64)
    assert plan.batch_size == 32 and any("smallest candidate" in n for n in plan.notes)
    at_floor = _at_the_floor(plan, 32)
    assert not any("smallest candidate" in n for n in at_floor.notes)
    assert "the optimum is the BatchNorm floor (32): smaller batches were ruled out" in at_floor.notes
    assert _at_the_floor(plan, 1) is plan and _at_the_floor(plan, 16) is plan
