"""The adaptive mode under DDP with two real gloo processes on the CPU: both ranks take the same
decisions, set the same LRs and end with the same weights; their shares of each global batch are
disjoint, equal and cover the epoch; the noise estimate is read across ranks (local share vs
global batch) without splitting steps."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

HELPERS = Path(__file__).resolve().parents[1] / "unit" / "probes"
sys.path.insert(0, str(HELPERS))
sys.path.insert(0, str(Path(__file__).parent))
import test_adaptive_ddp_worker as worker  # noqa: E402
from gloo_group import spawn_ranks  # noqa: E402
from test_noise_problems import N_EXAMPLES  # noqa: E402

WORLD = 2


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    return spawn_ranks(worker.run_rank, WORLD, tmp_path_factory.mktemp("adaptive-ddp"), str(HELPERS))


RUNS = ("whole", "accumulated", "affine")


@pytest.mark.parametrize("run", RUNS)
def test_every_rank_takes_the_same_decisions_lrs_and_ends_with_the_same_weights(ranks, run):
    first, second = ranks[0][run], ranks[1][run]
    assert first["world_size"] == second["world_size"] == WORLD
    assert first["changes"] == second["changes"]
    assert [s["lr"] for s in first["steps"]] == [s["lr"] for s in second["steps"]]
    assert first["params"] == second["params"]
    assert first["examples_seen"] == second["examples_seen"] == worker.EPOCHS * N_EXAMPLES
    if run == "whole":  # overhead-only step time: the per-device batch doubles, 8 -> ... -> 64
        assert [c["batch_size"] for c in first["changes"]] == [32, 64, 128]
        assert [c["step"] for c in first["changes"]] == [4, 8, 12]
    elif run == "accumulated":  # accumulating past what fits never pays, and it never shrinks
        assert first["changes"] == []


@pytest.mark.parametrize("run", RUNS)
def test_the_ranks_shares_are_disjoint_equal_and_cover_each_epoch(ranks, run):
    first, second = ranks[0][run], ranks[1][run]
    seen = 0
    epoch: list[int] = []
    for mine, theirs in zip(first["steps"], second["steps"]):
        assert len(mine["indices"]) == len(theirs["indices"])
        assert not set(mine["indices"]) & set(theirs["indices"])
        epoch += mine["indices"] + theirs["indices"]
        seen += 2 * len(mine["indices"])
        if seen % N_EXAMPLES == 0:
            assert sorted(epoch) == list(range(N_EXAMPLES))
            epoch = []
    assert seen == worker.EPOCHS * N_EXAMPLES


def test_measured_steps_pair_each_ranks_share_with_the_global_batch(ranks):
    for step in ranks[0]["whole"]["steps"]:  # every step is measured (measure_every=1), none split
        local = len(step["indices"])
        assert step["sample"] == [local, WORLD * local]
    assert ranks[0]["whole"]["noise_scale"] > 0


def test_accumulated_micro_batches_pair_with_the_global_batch_too(ranks):
    # max_fit 16 per device: a 32-example share runs as 2 micro-batches (the first under no_sync).
    steps = ranks[0]["accumulated"]["steps"]
    split = [s for s in steps if len(s["indices"]) == 32]
    assert split and all(s["sample"] == [16, WORLD * 32] for s in split)
    assert ranks[0]["accumulated"]["noise_scale"] > 0


def test_unequal_shares_from_another_sampler_stop_every_rank_with_the_same_error(ranks):
    messages = [rank["unequal"] for rank in ranks]
    assert all("the ranks hold different batch sizes this step" in m for m in messages)


def test_decisions_are_planned_per_device_against_the_noise_scale_over_the_ranks(ranks):
    """Time to target of global B on W devices, (B + B_noise) t(B/W) / B, is per-device
    b = B/W against B_noise / W: each decision's optimum, computed here from the formula."""
    overhead, per_example = worker.AFFINE

    def best(noise: float) -> int:
        return min(worker.CANDIDATES,
                   key=lambda b: ((overhead + per_example * b) * (b + noise) / b, b))

    history = [h for h in ranks[0]["affine"]["history"] if h["noise_scale"]]
    assert history
    for entry in history:
        assert entry["optimum"] == WORLD * best(entry["noise_scale"] / WORLD)
    # Planning against the whole noise scale would have answered differently somewhere.
    assert any(best(h["noise_scale"]) != best(h["noise_scale"] / WORLD) for h in history)
