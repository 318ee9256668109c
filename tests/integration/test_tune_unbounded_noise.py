"""`tune` when the noise scale can only be bounded from below: a least-squares problem started
at its exact optimum, where the true gradient is 0 and B_noise is infinite. The probe resolves
tr(Sigma) but not |G|^2; the plan must use the lower bound (not fall back to throughput alone),
say so, and name the batch an unlimited noise scale would give."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

import batchscope
from batchscope.tune_noise import NoisePlan

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit" / "probes"))
from test_noise_problems import linear_workload_at_the_optimum  # noqa: E402


@pytest.fixture(autouse=True)
def fixed_noise_plan(monkeypatch):
    # Two training steps and 16 samples, whatever the machine's speed.
    monkeypatch.setattr("batchscope.tuning.plan_noise_probe",
                        lambda *args, **kwargs: NoisePlan(train_steps=2, standard_train_steps=2,
                                                          samples=16))


def test_a_noise_scale_bounded_only_from_below_is_planned_at_its_bound(tmp_path):
    result = batchscope.tune(linear_workload_at_the_optimum(), device="cpu", budget_s=30,
                             memory_budget="256MiB", out_dir=tmp_path)
    noise = result.noise
    assert noise.status == "lower_bound", noise.detail
    assert 0 < noise.ci_low < math.inf and noise.ci_high is None

    # The plan and the recommendation rest on the bound, not on throughput alone.
    assert result.plan.mode == "goodput" and result.plan.noise_scale == pytest.approx(noise.ci_low)
    assert result.evidence.noise_scale == pytest.approx(noise.ci_low)
    unlimited = result.evidence.noise_unlimited_batch_size
    assert unlimited is not None and unlimited >= result.recommendation.batch_size
    assert any(f"B_simple ≥ {noise.ci_low:,.0f}" in line for line in result.recommendation.rationale)
    if unlimited != result.recommendation.batch_size:
        assert any(f"up to batch {unlimited}" in c for c in result.recommendation.caveats)

    record = json.loads((tmp_path / "run.json").read_text())
    saved = record["sections"]["noise"]
    assert saved["status"] == "lower_bound" and saved["ci_high"] is None
    assert saved["ci_low"] == pytest.approx(noise.ci_low)
    assert f"B_simple ≥ {noise.ci_low:,.0f}" in (tmp_path / "report.html").read_text()
