"""Throughput points the rest of the curve contradicts are measured again.

A training step on more examples does not take less time than one on fewer (the same kernels
over more data). A point whose step took much longer than a larger batch's was most likely
slowed by something besides the workload: another process on the same cores or device, a
clock-frequency drop, a page-cache miss. One such point can move a whole plan. On the 2-core
CPU, with a test suite running beside `batchscope tune`, batches 32 and 64 of the small CNN took
419 and 473 ms a step against 37 ms at 128, and tune called the reference batch 64 17x slower
than 128.

A point whose own steps disagree is suspect in the same way, and it is the only sign when no
larger batch was measured: with another job on the 2-core box, a tune whose memory budget left
one batch size measured batch 32's steps with an inter-quartile range 3.2 times their median, at
567 samples/s, while the data-path check of the same run measured 3,263.

So such a point is measured once more, when the time budget allows, and the faster of its two
measurements is kept: interference only ever slows a step down. A point still contradicted or
unsteady after that is kept as measured, and the result says so.
"""

from __future__ import annotations

import logging
from typing import Callable, Sequence

from batchscope.probes.throughput_result import ThroughputPoint

logger = logging.getLogger(__name__)

# Small batches on an accelerator cost about the same per step (launch-bound), so neighbouring
# step times may come out in either order by a few percent; a quarter is far beyond that noise.
CONTRADICTION_SLACK = 0.25
# A steady step's inter-quartile range is a few percent of its median, on a GPU and on an idle
# CPU alike (1.2% in the small CNN's data-path check); half the median is far beyond that.
UNSTEADY_SPREAD = 0.5


def contradicted(points: Sequence[ThroughputPoint], slack: float = CONTRADICTION_SLACK) -> list[int]:
    """Indices (ascending batch size) of the points whose step took more than (1 + slack) times
    the step of some larger batch in `points`."""
    found = []
    fastest_after = float("inf")
    for index in range(len(points) - 1, -1, -1):
        if points[index].step_s > (1.0 + slack) * fastest_after:
            found.append(index)
        fastest_after = min(fastest_after, points[index].step_s)
    return sorted(found)


def unsteady(points: Sequence[ThroughputPoint], limit: float = UNSTEADY_SPREAD) -> list[int]:
    """Indices of the points whose step times' inter-quartile range exceeds `limit` times their
    median."""
    return [index for index, point in enumerate(points) if point.spread > limit]


def remeasure_contradicted(points: Sequence[ThroughputPoint],
                           measure: Callable[[ThroughputPoint], ThroughputPoint],
                           affordable: Callable[[ThroughputPoint], bool],
                           slack: float = CONTRADICTION_SLACK) -> tuple[list[ThroughputPoint], list[str]]:
    """`points` with each contradicted or unsteady one measured again by `measure(point)` when
    `affordable(point)` (the budget left allows another point like it), keeping the faster
    measurement; and notes saying what was measured again and what still disagrees."""
    points = list(points)
    notes = []
    for index in sorted(set(contradicted(points, slack)) | set(unsteady(points))):
        first = points[index]
        why = _why_suspect(points, index)
        if not affordable(first):
            notes.append(f"{why}; no time left to measure it again (the machine may have been "
                         f"busy)")
            continue
        again = measure(first)
        points[index] = again if again.step_s < first.step_s else first
        logger.info("throughput: batch %d measured again: %.4f s a step, then %.4f s",
                    first.batch_size, first.step_s, again.step_s)
        notes.append(f"{why}: measured again, {_ms(again.step_s)}; the faster kept")
    still = [points[index].batch_size for index in contradicted(points, slack)]
    if still:
        notes.append(f"batch{'es' if len(still) > 1 else ''} {', '.join(map(str, still))} still "
                     f"took longer a step than a larger batch: the machine may be busy; the "
                     f"throughput model takes the points as measured")
    shaky = [points[index].batch_size for index in unsteady(points)]
    if shaky:
        notes.append(f"batch{'es' if len(shaky) > 1 else ''} {', '.join(map(str, shaky))} still "
                     f"had unsteady step times: the machine may be busy; the throughput model "
                     f"takes the points as measured")
    return points, notes


def _why_suspect(points: Sequence[ThroughputPoint], index: int) -> str:
    point = points[index]
    larger = [other for other in points[index + 1:]
              if point.step_s > (1.0 + CONTRADICTION_SLACK) * other.step_s]
    if larger:
        fastest = min(larger, key=lambda other: other.step_s)
        return (f"batch {point.batch_size} took {_ms(point.step_s)} a step, more than batch "
                f"{fastest.batch_size}'s {_ms(fastest.step_s)}")
    return (f"batch {point.batch_size}'s step times varied by {point.spread:.0%} of their median "
            f"{_ms(point.step_s)}")


def _ms(seconds: float) -> str:
    return f"{seconds:.3g} s" if seconds >= 1.0 else f"{seconds * 1e3:.3g} ms"
