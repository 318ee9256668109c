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
    assert first["error"].startswith("ProbeFailedError: per-device batch")
    assert "planned on rank 0, does not fit on rank(s) [1]" in first["error"]
    assert "does not fit on rank(s) [1]" in second["error"]
    assert "(here: over budget" in second["error"] and "(here:" not in first["error"]
    assert "memory_budget=" in first["error"]
    assert first["rng_kept"] and second["rng_kept"]


def test_a_failure_on_rank_zero_reaches_the_waiting_ranks(ranks):
    first, second = ranks[0]["broken"], ranks[1]["broken"]
    assert "the loss of this workload is broken" in first["error"]
    assert second["error"].startswith("ProbeFailedError: rank 0's tune failed, so rank 1 has no "
                                      "recommendation")
    assert "the loss of this workload is broken" in second["error"]
