"""The LR schedule of a run whose batch changes: indexed by examples seen, not by steps. No torch.

A step count means different amounts of training at different batch sizes, so a cosine over
"total steps" cannot be planned before the batch sizes are known. Examples seen can: the run
still ends after `epochs * dataset size` examples, and the schedule's multiplier at any point is
the share of them already seen. (This is also what makes a growing batch a substitute for a
decaying LR, Smith et al. 2018: the schedule keeps running over examples while each step takes
more of them.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from batchscope.analysis._checks import positive_int
from batchscope.errors import UsageError

KINDS = ("cosine", "constant")


@dataclass(frozen=True)
class ExampleSchedule:
    """LR multiplier in [0, 1] by examples seen: a linear ramp over `warmup_examples`, then cosine
    from 1 to 0 over the rest of `total_examples` (or constant at 1).

    Like the step schedule of sweeps (`sweep.schedule.LrSchedule`), the ramp counts the step being
    taken, so the first step already moves the weights, and the decay counts the examples before
    it, so the last step of the run does not have a zero LR.
    """

    total_examples: int
    warmup_examples: int = 0
    kind: str = "cosine"

    def __post_init__(self) -> None:
        positive_int("total_examples", self.total_examples)
        if isinstance(self.warmup_examples, bool) or not isinstance(self.warmup_examples, int) \
                or self.warmup_examples < 0:
            raise UsageError(f"warmup_examples={self.warmup_examples!r} must be an int >= 0")
        if self.kind not in KINDS:
            raise UsageError(f"schedule kind={self.kind!r} is not one of {', '.join(KINDS)}")

    def multiplier(self, examples_before: int, batch_size: int) -> float:
        """The multiplier for a step of `batch_size` examples taken after `examples_before`."""
        if examples_before < self.warmup_examples:
            return min(1.0, (examples_before + batch_size) / self.warmup_examples)
        if self.kind == "constant":
            return 1.0
        decay = self.total_examples - self.warmup_examples
        if decay <= 0:
            return 1.0
        progress = min(1.0, (examples_before - self.warmup_examples) / decay)
        return 0.5 * (1.0 + math.cos(math.pi * progress))
