import pytest

from batchscope.errors import UsageError
from batchscope.sweep.grid import (
    GridPoint,
    SearchSpace,
    expand_lr_rules,
    grid_points,
    merged_reference_points,
    parse_batch_sizes,
    validate_batch_sizes,
)


def test_all_expands_to_every_rule_once_in_a_fixed_order():
    assert expand_lr_rules("all") == ["linear", "sqrt", "none"]
    assert expand_lr_rules(["sqrt", "all"]) == ["sqrt", "linear", "none"]
    assert expand_lr_rules("none") == ["none"]


@pytest.mark.parametrize("bad", ["cubic", "", "LINEAR"])
def test_unknown_rule_is_a_usage_error_naming_it(bad):
    with pytest.raises(UsageError, match="lr_rule"):
        expand_lr_rules(bad)


def test_batch_sizes_are_parsed_sorted_and_deduplicated():
    assert parse_batch_sizes("128, 32,64,,32") == [32, 64, 128]


@pytest.mark.parametrize("text", ["32,abc", "32,-4", "0", ""])
def test_bad_batch_sizes_are_usage_errors(text):
    with pytest.raises(UsageError):
        parse_batch_sizes(text)


def test_a_batch_larger_than_the_dataset_is_refused():
    with pytest.raises(UsageError, match="exceeds the 100 training examples"):
        validate_batch_sizes([32, 128], dataset_size=100)


def test_grid_is_sizes_times_rules_with_stable_keys():
    points = grid_points([32, 64], ["linear", "sqrt"])
    assert [p.key for p in points] == ["b32-linear", "b32-sqrt", "b64-linear", "b64-sqrt"]
    assert GridPoint.from_dict(points[3].to_dict()) == points[3]
    searched = GridPoint(96, "search", 0.0123456789)
    assert searched.key == "b96-lr0.0123457"
    assert GridPoint.from_dict(searched.to_dict()) == searched


def test_the_reference_batch_is_one_point_whatever_the_rules():
    # The kept rule is the first in LR_RULES order (linear), whatever order the user gave, so
    # workers listing the rules differently still share the reference point.
    points = grid_points([64, 128, 256], ["sqrt", "linear"], reference_batch_size=128)
    assert [p.key for p in points] == [
        "b64-sqrt", "b64-linear", "b128-linear", "b256-sqrt", "b256-linear"]
    assert merged_reference_points([64, 128], ["sqrt", "linear", "none"], 128) == [
        "b128-sqrt", "b128-none"]
    assert [p.key for p in grid_points([128], ["none", "sqrt"], 128)] == ["b128-sqrt"]
    assert merged_reference_points([64, 256], ["sqrt", "linear"], 128) == []
    assert len(grid_points([64, 256], ["sqrt", "linear"], reference_batch_size=128)) == 4


def test_search_space_spans_the_sizes_and_widens_the_linear_rule():
    space = SearchSpace.around([32, 1024], reference_batch_size=128, reference_lr=0.1)
    assert (space.min_batch_size, space.max_batch_size) == (32, 1024)
    # linear rule gives 0.025 at 32 and 0.8 at 1024; the range is [0.025/4, 0.8*2]
    assert space.min_lr == pytest.approx(0.00625)
    assert space.max_lr == pytest.approx(1.6)
    with pytest.raises(UsageError, match="range of batch sizes"):
        SearchSpace.around([64], 128, 0.1)
