"""Data-parallel noise scale with two real gloo processes on the CPU: per-rank gradients versus
the all-reduced one must find the analytic B_simple of the linear problem, agree with the
single-process estimators on a small network, and be identical on every rank."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch.distributed as dist

from batchscope.errors import UsageError
from batchscope.probes.noise import estimate_noise_scale
from batchscope.probes.noise_ddp import DistributedGradientNoiseMonitor, all_reduce_gradients_with_noise

HELPERS = Path(__file__).resolve().parents[1] / "unit" / "probes"
sys.path.insert(0, str(HELPERS))  # the shared noise problems
sys.path.insert(0, str(Path(__file__).parent))  # the rank function spawned processes import
import test_noise_ddp_worker as worker  # noqa: E402
from gloo_group import spawn_ranks  # noqa: E402
from test_noise_problems import analytic_noise, linear_model, mlp_exact_noise, mlp_workload  # noqa: E402

WORLD = 2


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory) -> list[dict]:
    return spawn_ranks(worker.run_rank, WORLD, tmp_path_factory.mktemp("ddp"), str(HELPERS))


def test_all_ranks_report_the_same_estimates(rank_results):
    first, second = rank_results
    assert first == second


def test_ddp_monitor_covers_the_analytic_value(rank_results):
    result = rank_results[0]["linear_ddp"]
    truth = analytic_noise(linear_model())["b_simple"]
    assert (result["b_small"], result["b_big"]) == (worker.MICRO, WORLD * 2 * worker.MICRO)
    assert result["mismatches"] == []  # per-step numbers equal the hand-gathered ones
    assert rank_results[0]["mlp_ddp"]["mismatches"] == []
    estimate = result["estimate"]
    assert estimate["samples"] == worker.STEPS and estimate["status"] == "ok"
    assert estimate["ci_low"] <= truth <= estimate["ci_high"]


def test_explicit_all_reduce_averages_gradients_and_covers_the_analytic_value(rank_results):
    result = rank_results[0]["linear_explicit"]
    truth = analytic_noise(linear_model())["b_simple"]
    assert (result["b_small"], result["b_big"]) == (2 * worker.MICRO, WORLD * 2 * worker.MICRO)
    assert result["grad_is_rank_mean"]
    assert result["estimate"]["ci_low"] <= truth <= result["estimate"]["ci_high"]


def test_three_estimators_agree_on_a_small_network(rank_results):
    workload = mlp_workload()
    model = worker.trained_mlp(workload)
    exact = mlp_exact_noise(model)["b_simple"]
    ddp = rank_results[0]["mlp_ddp"]["estimate"]
    single = {
        method: estimate_noise_scale(workload, model=model, steps=60, micro_batch_size=4, accumulation=8,
                                     method=method, seed=5)
        for method in ("accumulation", "per_example")
    }
    intervals = [(ddp["ci_low"], ddp["ci_high"])] + [(r.ci_low, r.ci_high) for r in single.values()]
    for low, high in intervals:
        assert low <= exact <= high
    # Pairwise: the intervals overlap (each estimator is consistent with the others).
    assert max(low for low, _ in intervals) <= min(high for _, high in intervals)


def test_distributed_helpers_need_an_initialised_process_group():
    if dist.is_available() and dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    with pytest.raises(UsageError, match="init_process_group"):
        DistributedGradientNoiseMonitor(linear_model(), 4)
    with pytest.raises(UsageError, match="init_process_group"):
        all_reduce_gradients_with_noise(linear_model(), 4)
