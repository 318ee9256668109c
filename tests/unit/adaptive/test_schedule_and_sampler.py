"""ExampleSchedule against hand-computed multipliers; AdaptiveBatchSampler's epochs stay exact
permutations whatever the batch size does in the middle of them."""

from __future__ import annotations

import math

import pytest

from batchscope.adaptive.sampler import AdaptiveBatchSampler
from batchscope.adaptive.schedule import ExampleSchedule
from batchscope.errors import UsageError


def test_warmup_ramps_by_examples_including_the_step_being_taken():
    schedule = ExampleSchedule(total_examples=10_000, warmup_examples=1_000)
    assert schedule.multiplier(0, 100) == pytest.approx(0.1)
    assert schedule.multiplier(400, 200) == pytest.approx(0.6)
    assert schedule.multiplier(900, 100) == pytest.approx(1.0)
    assert schedule.multiplier(950, 400) == 1.0  # a step straddling the end of warmup is capped


def test_cosine_runs_over_the_examples_after_warmup_and_never_hits_zero_on_the_last_step():
    schedule = ExampleSchedule(total_examples=11_000, warmup_examples=1_000)
    assert schedule.multiplier(1_000, 64) == pytest.approx(1.0)
    assert schedule.multiplier(6_000, 64) == pytest.approx(0.5)
    assert schedule.multiplier(3_500, 64) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    last = schedule.multiplier(11_000 - 64, 64)
    assert 0 < last < 1e-3
    assert schedule.multiplier(20_000, 64) == 0.0  # past the end: held at the bottom


def test_constant_schedule_is_one_after_warmup():
    schedule = ExampleSchedule(total_examples=500, warmup_examples=100, kind="constant")
    assert schedule.multiplier(0, 50) == pytest.approx(0.5)
    assert schedule.multiplier(100, 50) == schedule.multiplier(499, 50) == 1.0


@pytest.mark.parametrize("kwargs, fragment", [
    ({"total_examples": 0}, "total_examples"),
    ({"total_examples": 10, "warmup_examples": -1}, "warmup_examples=-1"),
    ({"total_examples": 10, "kind": "step"}, "kind='step'"),
])
def test_bad_schedules_are_usage_errors(kwargs, fragment):
    with pytest.raises(UsageError, match=fragment):
        ExampleSchedule(**kwargs)


def _epoch(sampler, sizes_after):
    """One epoch; after the n-th batch the batch size becomes sizes_after.get(n, unchanged)."""
    batches = []
    for batch in sampler:
        batches.append(batch)
        if len(batches) in sizes_after:
            current[0] = sizes_after[len(batches)]
    return batches


current = [8]


def test_an_epoch_covers_every_example_once_while_the_batch_size_changes():
    current[0] = 8
    sampler = AdaptiveBatchSampler(100, lambda: current[0], seed=3)
    batches = _epoch(sampler, {2: 16, 4: 32})
    assert [len(b) for b in batches] == [8, 8, 16, 16, 32, 20]
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(100))


def test_epochs_are_different_permutations_and_repeat_with_the_seed():
    current[0] = 10
    first = AdaptiveBatchSampler(50, lambda: current[0], seed=1)
    again = AdaptiveBatchSampler(50, lambda: current[0], seed=1)
    other_seed = AdaptiveBatchSampler(50, lambda: current[0], seed=2)
    epoch0, epoch1 = list(first), list(first)
    assert epoch0 != epoch1 and sorted(sum(epoch1, [])) == list(range(50))
    assert list(again) == epoch0 and list(other_seed) != epoch0
    again.set_epoch(1)
    assert list(again) == epoch1  # a resumed run sees the same order


def test_drop_last_and_len_follow_the_current_batch_size():
    current[0] = 30
    keep = AdaptiveBatchSampler(100, lambda: current[0], shuffle=False)
    drop = AdaptiveBatchSampler(100, lambda: current[0], shuffle=False, drop_last=True)
    assert [len(b) for b in keep] == [30, 30, 30, 10] and len(keep) == 4
    assert [len(b) for b in drop] == [30, 30, 30] and len(drop) == 3
    assert list(keep)[0] == list(range(30))


def test_bad_sampler_input_is_a_usage_error():
    with pytest.raises(UsageError, match="dataset_size=0"):
        AdaptiveBatchSampler(0, lambda: 4)
    with pytest.raises(UsageError, match="must be a callable"):
        AdaptiveBatchSampler(10, 4)
    with pytest.raises(UsageError, match="epoch=-1"):
        AdaptiveBatchSampler(10, lambda: 4).set_epoch(-1)


def test_ranks_take_disjoint_equal_shares_of_each_global_batch():
    current[0] = 16
    shares = [list(AdaptiveBatchSampler(41, lambda: current[0], seed=5, rank=r, world_size=2))
              for r in range(2)]
    one = list(AdaptiveBatchSampler(41, lambda: current[0], seed=5))
    # Global batches 16, 16, then 9 trimmed to 8 so both ranks hold 4.
    assert [len(b) for b in shares[0]] == [len(b) for b in shares[1]] == [8, 8, 4]
    for mine, theirs, whole in zip(shares[0], shares[1], one):
        assert sorted(mine + theirs) == sorted(whole[:2 * len(mine)])
        assert not set(mine) & set(theirs)
    with pytest.raises(UsageError, match="rank=2"):
        AdaptiveBatchSampler(41, lambda: 16, rank=2, world_size=2)


def test_a_resume_after_a_trimmed_final_batch_starts_the_next_epoch():
    sampler = AdaptiveBatchSampler(103, lambda: 16, world_size=2, rank=0)
    sampler.resume_at(0, 102)  # 103 examples: the final global batch was trimmed to end at 102
    assert (sampler.epoch, sampler.passes_done) == (1, 1)
    assert len(list(sampler)) == 7
