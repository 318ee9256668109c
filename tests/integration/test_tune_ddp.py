"""`tune` called on both ranks of a real two-process gloo job on the CPU: rank 0 measures, both
ranks return the same recommendation, planned for the world size and checked on each rank's
device; a rank that cannot hold the batch, or a failure on rank 0, fails every rank alike."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import test_tune_ddp_worker as worker  # noqa: E402
from gloo_group import spawn_ranks  # noqa: E402

WORLD = 2


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    return spawn_ranks(worker.run_rank, WORLD, tmp_path_factory.mktemp("tune-ddp"))


pytestmark = pytest.mark.slow


def test_every_rank_returns_rank_zeros_recommendation_for_the_world(ranks):
    first, second = ranks[0]["agreed"], ranks[1]["agreed"]
    assert "error" not in first and "error" not in second
    assert first["recommendation"] == second["recommendation"]
    assert first["seconds"] == second["seconds"]  # one measurement, not two
    rec = first["recommendation"]
    assert rec["world_size"] == WORLD
    assert rec["batch_size"] == WORLD * rec["per_device_batch_size"] * rec["grad_accumulation"]
    # The per-device batch ran real steps on both ranks, both fit, and the record says so.
    checked = first["ranks"]
    assert checked["per_device_batch_size"] == rec["per_device_batch_size"]
    assert [c["rank"] for c in checked["checked"]] == [0, 1]
    assert all(c["fits"] and c["peak_bytes"] > 0 for c in checked["checked"])
    # The plan counted the all-reduce of every gradient (fp32), timed across both ranks.
    assert checked["allreduce_bytes"] == first["gradient_bytes"]
    assert 0 < checked["allreduce_s"] == first["plan_sync_seconds"] == second["plan_sync_seconds"]
    assert any(f"counts the gradient all-reduce measured across the ranks "
               f"({checked['allreduce_s'] * 1e3:.3g} ms a step" in c for c in rec["caveats"])
    # Only rank 0 writes.
    assert {"run.json", "report.html"} <= set(first["written"]) and second["written"] == []
    assert first["report_has_ranks"]
    assert first["rng_kept"] and second["rng_kept"]


def test_a_rank_that_cannot_hold_the_batch_fails_every_rank_naming_it(ranks):
    first, second = ranks[0]["smaller"], ranks[1]["smaller"]
    assert first["error"] == second["error"]
    assert first["error"].startswith("ProbeFailedError: per-device batch 32, planned on rank 0, "
                                     "does not fit on rank 1 (over budget: peak ")
    assert "> 2.00 MiB); free memory there, or pass memory_budget=" in first["error"]
    assert first["rng_kept"] and second["rng_kept"]


def test_a_rank_whose_check_raises_fails_every_rank_instead_of_leaving_them_waiting(ranks):
    first, second = ranks[0]["full_device"], ranks[1]["full_device"]
    assert first["error"] == second["error"]
    assert "does not fit on rank 1 (ProbeFailedError: the model of workload" in first["error"]
    assert "CUDA out of memory" in first["error"]


def test_a_failure_on_rank_zero_reaches_the_waiting_ranks(ranks):
    first, second = ranks[0]["broken"], ranks[1]["broken"]
    assert first["error"] == "ValueError: the loss of this workload is broken"  # its own error
    assert second["error"] == ("ProbeFailedError: rank 0's measurement failed on rank 0: ValueError: "
                               "the loss of this workload is broken; rank 1 stops with it")


def test_a_rank_failing_before_any_measurement_stops_every_rank(ranks):
    first, second = ranks[0]["unprepared"], ranks[1]["unprepared"]
    assert second["error"].startswith("UsageError: ") and "'lots'" in second["error"]
    assert first["error"].startswith("ProbeFailedError: preparing tune failed on rank 1: UsageError: ")
    assert first["error"].endswith("; rank 0 stops with it")
