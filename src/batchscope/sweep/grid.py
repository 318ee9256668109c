"""What a sweep runs: grid points (batch size x LR rule) and the search space for search mode.

A point has a stable text key (`b256-linear`): the key, not an Optuna trial number, is what
makes a point "done", so a resumed or shared study can tell a finished point from one still
to run however many trial records the storage holds for it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

from batchscope.errors import UsageError

LR_RULES = ("linear", "sqrt", "none")
RULE_CHOICES = (*LR_RULES, "all")
MODES = ("grid", "search")
SEARCH_RULE = "search"
"""The `lr_rule` recorded for search-mode trials, whose LR is sampled, not derived by a rule."""


@dataclass(frozen=True)
class GridPoint:
    """One trial's settings: the batch size and how its learning rate is obtained.

    `learning_rate` is set only in search mode (sampled); grid points derive it from the rule.
    """

    batch_size: int
    lr_rule: str
    learning_rate: float | None = None

    @property
    def key(self) -> str:
        if self.learning_rate is not None:
            return f"b{self.batch_size}-lr{self.learning_rate:.6g}"
        return f"b{self.batch_size}-{self.lr_rule}"

    def to_dict(self) -> dict[str, object]:
        return {
            "batch_size": self.batch_size,
            "lr_rule": self.lr_rule,
            "learning_rate": self.learning_rate,
        }

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> "GridPoint":
        lr = data.get("learning_rate")
        return cls(
            batch_size=int(data["batch_size"]),  # type: ignore[arg-type]
            lr_rule=str(data["lr_rule"]),
            learning_rate=None if lr is None else float(lr),  # type: ignore[arg-type]
        )


def expand_lr_rules(rule: str | Sequence[str]) -> list[str]:
    """`"all"` -> every rule; a single rule or a list of rules -> themselves, validated."""
    rules = [rule] if isinstance(rule, str) else list(rule)
    if not rules:
        raise UsageError("lr_rule is empty; pass one of linear, sqrt, none or all")
    expanded: list[str] = []
    for name in rules:
        if name not in RULE_CHOICES:
            raise UsageError(
                f"lr_rule={name!r} is not one of {', '.join(RULE_CHOICES)}; e.g. --lr-rule linear"
            )
        for single in LR_RULES if name == "all" else (name,):
            if single not in expanded:
                expanded.append(single)
    return expanded


def validate_batch_sizes(batch_sizes: Iterable[int], dataset_size: int | None = None) -> list[int]:
    """Sorted unique positive batch sizes; each must leave at least one step per epoch."""
    sizes: list[int] = []
    for size in batch_sizes:
        if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
            raise UsageError(f"batch size {size!r} must be a positive integer, e.g. 32,64,128")
        if dataset_size is not None and size > dataset_size:
            raise UsageError(
                f"batch size {size} exceeds the {dataset_size} training examples, so an epoch "
                f"would have zero steps; drop it or use a larger training set"
            )
        if size not in sizes:
            sizes.append(size)
    if not sizes:
        raise UsageError("no batch sizes given; pass e.g. --batch-sizes 32,64,128")
    return sorted(sizes)


def parse_batch_sizes(text: str) -> list[int]:
    """`"32,64,128"` -> [32, 64, 128] (spaces allowed); anything else is a usage error."""
    sizes: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            sizes.append(int(part))
        except ValueError:
            raise UsageError(
                f"batch size {part!r} in {text!r} is not an integer; write e.g. 32,64,128"
            ) from None
    return validate_batch_sizes(sizes)


def grid_points(
    batch_sizes: Sequence[int], lr_rules: Sequence[str], reference_batch_size: int | None = None
) -> list[GridPoint]:
    """Every batch size with every rule, smallest batch first (rules in the order given).

    At `reference_batch_size` every rule scales the LR by 1, so the rules would train the very
    same trial; one point stands for all of them there: the rule first in LR_RULES order, so
    workers that list the rules in another order still share it (`merged_reference_points`).
    """
    kept = reference_rule(lr_rules)
    return [
        GridPoint(size, rule)
        for size in batch_sizes
        for rule in lr_rules
        if size != reference_batch_size or rule == kept
    ]


def reference_rule(lr_rules: Sequence[str]) -> str:
    """The rule whose point is trained at the reference batch on behalf of all of `lr_rules`."""
    return min(lr_rules, key=lambda rule: LR_RULES.index(rule) if rule in LR_RULES else len(LR_RULES))


def merged_reference_points(
    batch_sizes: Sequence[int], lr_rules: Sequence[str], reference_batch_size: int
) -> list[str]:
    """Keys of the points `grid_points` leaves out at the reference batch (for the notes)."""
    if reference_batch_size not in batch_sizes:
        return []
    kept = reference_rule(lr_rules)
    return [GridPoint(reference_batch_size, rule).key for rule in lr_rules if rule != kept]


@dataclass(frozen=True)
class SearchSpace:
    """Search mode: batch size log-uniform over [min, max], LR log-uniform over [lo, hi]."""

    min_batch_size: int
    max_batch_size: int
    min_lr: float
    max_lr: float

    @classmethod
    def around(
        cls, batch_sizes: Sequence[int], reference_batch_size: int, reference_lr: float
    ) -> "SearchSpace":
        """Span the batch sizes given; the LR range covers what the linear rule gives at both
        ends, widened (x1/4 below, x2 above) so the search can find better than the rule."""
        smallest, largest = min(batch_sizes), max(batch_sizes)
        if smallest == largest:
            raise UsageError(
                f"search mode needs a range of batch sizes, got only {smallest}; pass at least "
                f"two, e.g. --batch-sizes 32,1024"
            )
        low = reference_lr * min(1.0, smallest / reference_batch_size) / 4
        high = reference_lr * max(1.0, largest / reference_batch_size) * 2
        return cls(smallest, largest, low, high)

    def to_dict(self) -> dict[str, float]:
        return {
            "min_batch_size": self.min_batch_size,
            "max_batch_size": self.max_batch_size,
            "min_lr": self.min_lr,
            "max_lr": self.max_lr,
        }
