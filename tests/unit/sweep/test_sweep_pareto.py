import csv
import io
import math
import random

import pytest

from batchscope.sweep.results import CSV_COLUMNS, SweepResult, pareto_front, trials_csv
from batchscope.sweep.trial_record import EvalPoint, TrialRecord


def test_front_on_known_points_higher_is_better():
    points = [
        (1.0, 0.5),   # 0 A: on the front
        (2.0, 0.7),   # 1 B: on the front
        (3.0, 0.6),   # 2 C: dominated by B (slower and worse)
        (2.0, 0.7),   # 3 D: identical to B: both stay
        (None, 0.9),  # 4 E: never reached the target, but nobody ends better
        (0.5, 0.4),   # 5 F: fastest
        (1.0, 0.45),  # 6 G: as fast as A, worse: dominated
        (0.5, math.nan),  # 7: no metric, never on the front
    ]
    assert pareto_front(points) == [5, 0, 1, 3, 4]


def test_front_when_lower_is_better():
    points = [(1.0, 0.3), (2.0, 0.2), (3.0, 0.25), (1.0, 0.35)]
    assert pareto_front(points, higher_is_better=False) == [0, 1]


def test_never_reached_is_dominated_by_any_reached_point_at_least_as_good():
    assert pareto_front([(None, 0.8), (5.0, 0.8)]) == [1]
    assert pareto_front([]) == []


def test_front_is_exactly_the_non_dominated_set_on_random_points():
    rng = random.Random(7)
    points = [(rng.choice([None, rng.uniform(0, 10)]), rng.uniform(0, 1)) for _ in range(60)]
    front = set(pareto_front(points))
    as_time = [(math.inf if t is None else t, m) for t, m in points]

    def dominates(a, b):
        return a[0] <= b[0] and a[1] >= b[1] and a != b

    for i, p in enumerate(as_time):
        dominated = any(dominates(q, p) for q in as_time)
        assert (i in front) == (not dominated)


def _record(key, batch, final, time_to_target=None, train=10.0, full=True, outcome="complete"):
    # reaches `final` at `time_to_target` and holds it to the end (`train` seconds)
    curve = [EvalPoint(1, 0.5, 2, batch * 2, time_to_target if time_to_target else train, final, 1.0),
             EvalPoint(2, 1.0, 4, batch * 4, train, final, 1.0)]
    return TrialRecord(
        key=key, batch_size=batch, lr_rule="linear", learning_rate=0.1, warmup_steps=0,
        steps_per_epoch=4, total_steps=4, seed=0, outcome=outcome, final_metric=final,
        time_to_target=time_to_target, train_seconds=train, full_budget=full, curve=curve,
    )


def test_sweep_result_front_uses_full_budget_trials_and_time_to_target():
    trials = [
        _record("b32-linear", 32, 0.80, time_to_target=9.0, train=20.0),
        _record("b64-linear", 64, 0.78, time_to_target=5.0, train=12.0),
        _record("b128-linear", 128, 0.70, time_to_target=6.0, train=8.0),  # dominated by b64
        _record("b256-linear", 256, 0.95, time_to_target=1.0, full=False, outcome="pruned"),
    ]
    result = SweepResult.build(trials, higher_is_better=True, target_metric=0.7, metric_name="accuracy")
    assert result.front == ["b64-linear", "b32-linear"]
    assert result.best().key == "b64-linear"
    # without a target the time axis is the whole budget's training time: b128 is fastest
    no_target = SweepResult.build(trials, higher_is_better=True, target_metric=None, metric_name="accuracy")
    assert no_target.front == ["b128-linear", "b64-linear", "b32-linear"]


def test_csv_has_one_row_per_trial_and_marks_the_front():
    trials = [_record("b32-linear", 32, 0.8, 9.0), _record("b64-linear", 64, 0.7, 12.0)]
    result = SweepResult.build(trials, higher_is_better=True, target_metric=0.5, metric_name="accuracy")
    rows = list(csv.DictReader(io.StringIO(trials_csv(result))))
    assert [r["key"] for r in rows] == ["b32-linear", "b64-linear"]
    assert list(rows[0]) == list(CSV_COLUMNS)
    assert [r["on_front"] for r in rows] == ["True", "False"]
    assert rows[0]["time_to_target"] == "9.0"


def test_result_round_trips_through_its_dict():
    trials = [_record("b32-linear", 32, 0.8, 9.0)]
    result = SweepResult.build(trials, higher_is_better=True, target_metric=0.5, metric_name="accuracy",
                               predicted_batch_size=32)
    again = SweepResult.from_dict(result.to_dict())
    assert again.to_dict() == result.to_dict()
    assert again.trials[0].curve[1].samples_seen == 128


@pytest.mark.parametrize("higher", [True, False])
def test_front_respects_direction_in_build(higher):
    trials = [_record("a", 32, 0.2, 1.0), _record("b", 64, 0.9, 1.0)]
    result = SweepResult.build(trials, higher_is_better=higher, target_metric=0.1, metric_name="m")
    assert result.front == (["b"] if higher else ["a"])
