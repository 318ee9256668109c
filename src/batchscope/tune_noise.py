"""How `tune` spends its noise probe: how far to train before measuring, how many samples the
budget allows, and when the samples so far already settle the decision.

Two rules keep the recommendation from drifting with `--budget`:

- Training before the measurement is a fixed amount of the workload's own training (half an
  epoch at the reference batch), not a share of the budget. B_noise moves fastest early: on
  ResNet-18/CIFAR-10 (H200, bf16) it was 853 at initialisation, 261 after 0.36 epoch and 183
  after one epoch. A budget too small for the half epoch trains less, and the recommendation
  says so. (Without a dataset size: NOISE_TRAIN_STEPS_WITHOUT_DATASET steps.)
- The sample count is a ceiling, not a target: sampling stops once the plan picks the same batch
  at both ends of the noise scale's interval (`SettledDecision`). More samples would narrow the
  interval but not change the answer; a budget only buys them while the answer is still open.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

from batchscope.analysis.noise_stats import NoiseScaleEstimate
from batchscope.workload import Workload

# Training before measuring, in epochs at the reference batch, or steps when the workload
# declares no dataset size.
NOISE_TRAIN_EPOCHS = 0.5
NOISE_TRAIN_STEPS_WITHOUT_DATASET = 100
# Of the time the noise probe may use, at most this share goes to that training; the samples
# get NOISE_SHARE of the rest (the remainder is slack for everything after the probe).
NOISE_TRAIN_SHARE = 0.35
NOISE_SHARE = 0.60
NOISE_ACCUMULATION = 4  # micro-batches per noise sample: small batch b, big batch 4b
# Building the model, a fresh optimizer and first-use imports inside the noise probe.
NOISE_FIXED_S = 3.0
# Beyond ~200 samples the interval narrows slowly (1/sqrt(n)) while the cost grows linearly.
MAX_NOISE_SAMPLES = 200
# The recommendation without a noise scale can only follow throughput, so even an overrun
# budget buys this many samples (a few reference-sized steps' worth) rather than none; it is
# also the fewest samples an early stop trusts.
MIN_NOISE_SAMPLES = 16


@dataclass(frozen=True)
class NoisePlan:
    """What the noise probe will do.

    Attributes:
        train_steps: training steps at the reference batch before measuring.
        standard_train_steps: what the budget-independent rule asks for (half an epoch); more
            than `train_steps` when the budget could not afford it.
        samples: the most samples the probe may take (it stops earlier once settled).
        shortfall: why the plan could not buy even MIN_NOISE_SAMPLES (None when it could).
        priced: False when the throughput model gave no step time to plan with (then nothing
            is trained first, and the budget is not to blame).
    """

    train_steps: int
    standard_train_steps: int
    samples: int
    shortfall: str | None = None
    priced: bool = True

    @property
    def budget_limited(self) -> bool:
        """The budget, not a missing step time, cut the training short."""
        return self.priced and self.train_steps < self.standard_train_steps


def standard_train_steps(workload: Workload) -> int:
    """Half an epoch of reference-sized steps (at least one), or a fixed count without a
    dataset size."""
    if not workload.dataset_size:
        return NOISE_TRAIN_STEPS_WITHOUT_DATASET
    return max(1, round(NOISE_TRAIN_EPOCHS * workload.dataset_size / workload.reference_batch_size))


def plan_noise_probe(workload: Workload, step_seconds: Callable[[int], float], remaining_s: float,
                     limit: int, reserved_s: float = 0.0) -> NoisePlan:
    """The training steps and sample ceiling that fit `remaining_s` seconds, less `reserved_s`
    kept for later stages.

    A sample costs about one reference-sized step (NOISE_ACCUMULATION micro-batches of
    reference/NOISE_ACCUMULATION); when the reference batch does not fit (`limit`), its
    training steps are accumulated from micro-batches that do. `step_seconds(B)` is the
    throughput probe's step time at batch B.
    """
    reference = workload.reference_batch_size
    standard = standard_train_steps(workload)
    fitting = min(reference, limit)
    train_step_s = float(step_seconds(fitting)) * math.ceil(reference / fitting)
    # A noise sample: NOISE_ACCUMULATION backward passes at the micro-batch, each followed by
    # gradient-norm reductions (about half a step again on small models).
    micro = min(max(1, reference // NOISE_ACCUMULATION), limit)
    sample_s = float(step_seconds(micro)) * NOISE_ACCUMULATION * 1.5
    if not (math.isfinite(train_step_s) and math.isfinite(sample_s)) or sample_s <= 0:
        return NoisePlan(0, standard, MIN_NOISE_SAMPLES,
                         "the throughput model gave no step time to plan the noise probe with; it "
                         f"takes {MIN_NOISE_SAMPLES} samples at initialisation", priced=False)
    usable_s = remaining_s - NOISE_FIXED_S - reserved_s
    affordable = max(0.0, NOISE_TRAIN_SHARE * usable_s) / max(train_step_s, 1e-12)
    train_steps = int(min(standard, affordable))
    left_s = usable_s - train_steps * train_step_s
    samples = int(min(MAX_NOISE_SAMPLES, max(0.0, NOISE_SHARE * left_s) / sample_s))
    if samples >= MIN_NOISE_SAMPLES:
        return NoisePlan(train_steps, standard, samples)
    # The minimum is taken anyway; say so when it costs more than the budget has left.
    needed_s = NOISE_FIXED_S + train_steps * train_step_s + MIN_NOISE_SAMPLES * sample_s
    over_s = needed_s - (remaining_s - reserved_s)
    shortfall = None
    if over_s > 1.0 or remaining_s <= NOISE_FIXED_S:
        kept = (f", {reserved_s:.0f}s of it kept for the data-path check at the recommended "
                f"batch" if reserved_s >= 0.5 else "")
        shortfall = (f"the memory and throughput probes left {max(0.0, remaining_s):.0f}s of the "
                     f"budget{kept}; the noise probe takes {MIN_NOISE_SAMPLES} samples anyway "
                     f"(about {needed_s:.0f}s, {max(0.0, over_s):.0f}s over the budget; its "
                     f"interval is wide); raise --budget for a tighter one")
    return NoisePlan(train_steps, standard, MIN_NOISE_SAMPLES, shortfall)


# A noise scale this many times a lower bound stands for "unlimited": the goodput plan then
# minimises (B + B_noise) / X(B) ~ B_noise / X(B), i.e. picks the highest throughput, as the
# limit does (not the throughput-only plan's knee, which is a hedge for a missing estimate).
UNLIMITED_FACTOR = 1e6


def unlimited_noise_scale(lower_bound: float) -> float:
    """A noise scale standing for "anything above `lower_bound`" in a plan (UNLIMITED_FACTOR)."""
    return float(lower_bound) * UNLIMITED_FACTOR


class SettledDecision:
    """A `stop_when` for `estimate_noise_scale`: true once, after at least `min_samples`, the
    estimate is trusted, its interval bounded, and `decide` (noise scale -> the decision, e.g.
    the planned batch) gives the same answer at both ends of the interval. A one-sided interval
    (status "lower_bound") counts when the answer at its lower end is the answer for a
    practically unlimited noise scale (`unlimited_noise_scale`).

    Why the ends suffice for the goodput plan: a candidate batch B with step time t(B) reaches
    the target in time proportional to t(B) + B_noise * t(B)/B, a line in B_noise. The optimum
    is the lowest line, and as B_noise grows it can only pass to a line with a smaller slope
    (time per example) and a larger intercept (step time), that is, to a larger batch; the
    "examples" target only adds larger candidates as B_noise grows. So the planned batch never
    falls as B_noise grows, and the same batch at both ends means the same batch throughout.
    Stopping on what the data say makes the reported interval a little optimistic; it is still
    the interval of the samples taken.
    """

    def __init__(self, decide: Callable[[float], Any], min_samples: int = MIN_NOISE_SAMPLES,
                 what: str = "decision") -> None:
        self.decide = decide
        self.min_samples = min_samples
        self.reason = f"the {what} was the same anywhere in the noise scale's interval"

    def __call__(self, estimate: NoiseScaleEstimate) -> bool:
        if estimate.samples < self.min_samples or estimate.status not in ("ok", "lower_bound"):
            return False
        low, high = estimate.ci_low, estimate.ci_high
        if low is None or not math.isfinite(low) or low <= 0:
            return False
        if estimate.status == "lower_bound":
            # Only "at least low" is known; the decision is settled when a practically
            # unlimited noise scale gives the same answer (the plan does not fall as it grows).
            high = unlimited_noise_scale(low)
        elif high is None or not math.isfinite(high):
            return False
        return self.decide(float(low)) == self.decide(float(high))
