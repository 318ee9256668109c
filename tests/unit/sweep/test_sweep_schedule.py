import math

import pytest

from batchscope.errors import UsageError
from batchscope.sweep.grid import GridPoint
from batchscope.sweep.schedule import LrSchedule, plan_schedule


def test_warmup_ramps_linearly_to_the_peak_then_cosine_decays_to_zero():
    schedule = LrSchedule(peak_lr=1.0, total_steps=10, warmup_steps=4, kind="cosine")
    assert [schedule.lr_at(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert schedule.lr_at(4) == 1.0
    assert schedule.lr_at(5) == pytest.approx(0.5 * (1 + math.cos(math.pi / 6)))
    assert schedule.lr_at(7) == pytest.approx(0.5)
    assert schedule.lr_at(10) == pytest.approx(0.0)


def test_constant_schedule_holds_the_peak_after_warmup():
    schedule = LrSchedule(peak_lr=0.3, total_steps=10, warmup_steps=2, kind="constant")
    assert [schedule.lr_at(s) for s in (0, 1, 2, 9)] == [0.15, 0.3, 0.3, 0.3]


def _plan(point, steps_per_epoch=10, epochs=10, own_warmup=0.0, rule_warmup=None):
    return plan_schedule(
        point,
        reference_batch_size=64,
        reference_lr=0.05,
        schedule="cosine",
        workload_warmup_epochs=own_warmup,
        steps_per_epoch=steps_per_epoch,
        epochs=epochs,
        rule_warmup_epochs=rule_warmup,
    )


def test_linear_rule_scales_the_peak_and_warms_up_when_the_lr_more_than_doubles():
    plan = _plan(GridPoint(256, "linear"))
    assert plan.peak_lr == pytest.approx(0.2)
    assert plan.total_steps == 100
    # factor 4 > 2: the rule's 5 warmup epochs, capped at 20% of a 10-epoch trial = 2 epochs
    assert plan.warmup_steps == 20


@pytest.mark.parametrize(
    ("point", "peak", "warmup"),
    [
        (GridPoint(256, "sqrt"), 0.1, 0),  # factor 2: no warmup
        (GridPoint(32, "linear"), 0.025, 0),  # a smaller LR needs none
        (GridPoint(512, "none"), 0.05, 0),
        (GridPoint(512, "search", 0.3), 0.3, 20),  # factor 6 from the sampled LR
    ],
)
def test_peak_and_warmup_per_rule(point, peak, warmup):
    plan = _plan(point)
    assert plan.peak_lr == pytest.approx(peak)
    assert plan.warmup_steps == warmup


def test_warmup_is_the_longer_of_the_workloads_and_the_rules():
    assert _plan(GridPoint(32, "linear"), own_warmup=1.5).warmup_steps == 15
    assert _plan(GridPoint(256, "linear"), own_warmup=1.5).warmup_steps == 20
    assert _plan(GridPoint(256, "linear"), rule_warmup=5).warmup_steps == 50


def test_warmup_never_exceeds_the_trial():
    plan = _plan(GridPoint(256, "linear"), steps_per_epoch=3, epochs=1, own_warmup=4.0)
    assert plan.warmup_steps == plan.total_steps == 3


def test_zero_steps_per_epoch_is_a_usage_error():
    with pytest.raises(UsageError, match="zero steps"):
        _plan(GridPoint(256, "linear"), steps_per_epoch=0)
