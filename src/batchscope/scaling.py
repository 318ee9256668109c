"""Learning-rate rules for a changed batch size, with warmup and warnings. No torch.

Rules (factor = new LR / base LR, S = B / B0):
- "linear": factor S (Goyal et al. 2017, "Accurate, Large Minibatch SGD"): for SGD, k times the
  batch averages k times as many gradients per step, so k times the step keeps the per-example
  update; valid while B is well below the noise scale, and needs gradual warmup for large S.
- "sqrt": factor sqrt(S), for the Adam family (Hoffer et al. 2017 proposed it from the gradient
  covariance; Malladi et al. 2022 derived it for adaptive methods from their SDE limit).
- "none": factor 1.
- "adascale": AdaScale's gain (Johnson et al. 2020) r = (sigma^2 + |G|^2) / (sigma^2/S + |G|^2),
  where sigma^2 = tr(Sigma)/B0 is the gradient variance of one B0-sized batch and |G|^2 the true
  gradient's squared norm: r = E|g_B0|^2 / E|g_B|^2. Dividing through by |G|^2 with
  B_noise = tr(Sigma)/|G|^2 gives r = (B_noise/B0 + 1) / (B_noise/B + 1) = S (B_noise + B0)/(B_noise + B):
  linear scaling times statistical efficiency. It equals McCandlish et al. 2018's optimal-LR
  ratio eps_opt(B)/eps_opt(B0) with eps_opt(B) = eps_max / (1 + B_noise/B), runs from S (pure
  noise) down to 1 (no noise), and needs the measured noise scale. Applied here once, at the
  measured B_noise; AdaScale proper re-estimates it every step and also stretches the schedule.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from batchscope.analysis._checks import finite_or_none, positive_int, positive_number
from batchscope.errors import UsageError

RULES = ("linear", "sqrt", "none", "adascale")
_FAMILY_RULES = {"sgd": "linear", "adam": "sqrt", "adamw": "sqrt"}

# Goyal et al. 2017 trained ResNet-50 with no warmup at small scale and needed 5 epochs of gradual
# warmup at 8k (32x the 256 base); a doubling of the LR is well inside the range their small-batch
# runs and common practice handle without warmup, so warmup starts above a factor of 2.
NO_WARMUP_MAX_FACTOR = 2.0
DEFAULT_WARMUP_EPOCHS = 5
# Goyal et al. 2017: linear scaling + warmup matched the baseline up to 8k (factor 32), and accuracy
# fell beyond it (Fig. 1); beyond 32x the rule is an extrapolation past its evidence.
LARGE_FACTOR = 32.0


@dataclass(frozen=True)
class LrPlan:
    """A learning rate for a new batch size; warmup_steps is None when steps_per_epoch is unknown."""

    learning_rate: float
    rule: str
    factor: float
    base_lr: float
    base_batch_size: int
    batch_size: int
    warmup_steps: int | None
    warnings: tuple[str, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict[str, Any]:
        return {
            "learning_rate": finite_or_none(self.learning_rate),
            "rule": self.rule,
            "factor": finite_or_none(self.factor),
            "base_lr": self.base_lr,
            "base_batch_size": self.base_batch_size,
            "batch_size": self.batch_size,
            "warmup_steps": self.warmup_steps,
            "warnings": list(self.warnings),
        }


def scale_learning_rate(
    base_lr: float,
    base_batch_size: int,
    batch_size: int,
    rule: str = "linear",
    *,
    noise_scale: float | None = None,
    steps_per_epoch: int | None = None,
    warmup_epochs: float = DEFAULT_WARMUP_EPOCHS,
    family: str | None = None,
    noise_is_lower_bound: bool = False,
) -> LrPlan:
    """The learning rate for `batch_size` given one that worked at `base_batch_size`.

    `noise_scale` (B_simple) is required by "adascale" and sharpens the warnings for the others
    (`noise_is_lower_bound`: it is only known to be at least that, and the warnings say so);
    `steps_per_epoch` (at the NEW batch size) turns the warmup length into steps.
    """
    base_lr = positive_number("base_lr", base_lr)
    base = positive_int("base_batch_size", base_batch_size)
    batch = positive_int("batch_size", batch_size)
    rule = rule_name(rule)
    noise = None if noise_scale is None else positive_number("noise_scale", noise_scale, allow_inf=True)
    factor = lr_factor(rule, batch, base, noise)
    warmup = None if steps_per_epoch is None else warmup_steps(factor, steps_per_epoch, warmup_epochs)
    warnings = lr_warnings(rule, factor, batch, base, noise_scale=noise, family=family,
                           noise_is_lower_bound=noise_is_lower_bound)
    if warmup is None and factor > NO_WARMUP_MAX_FACTOR:
        warnings.append(warmup_in_epochs_warning(factor, warmup_epochs))
    return LrPlan(base_lr * factor, rule, factor, base_lr, base, batch, warmup, tuple(warnings))


def warmup_in_epochs_warning(factor: float, warmup_epochs: float) -> str:
    """What `scale_learning_rate` says when the LR grows enough to need warmup but
    steps_per_epoch is unknown (callers that know why it is unknown replace it)."""
    return (f"the LR grows {factor:.3g}x: use gradual warmup over ~{warmup_epochs:g} epochs "
            "(pass steps_per_epoch to get it in steps)")


def lr_factor(rule: str, batch_size: int, base_batch_size: int, noise_scale: float | None = None) -> float:
    """New LR / base LR under `rule` (module docstring); "adascale" needs the noise scale."""
    rule = rule_name(rule)
    scale = positive_int("batch_size", batch_size) / positive_int("base_batch_size", base_batch_size)
    if rule == "linear":
        return scale
    if rule == "sqrt":
        return math.sqrt(scale)
    if rule == "none":
        return 1.0
    if noise_scale is None:
        raise UsageError("rule='adascale' needs noise_scale=B_simple (measure it with the noise probe) "
                         "or use rule='linear' / 'sqrt'")
    return adascale_gain(batch_size, base_batch_size, noise_scale)


def adascale_gain(batch_size: int, base_batch_size: int, noise_scale: float) -> float:
    """r = (sigma^2 + |G|^2)/(sigma^2/S + |G|^2) = S (B_noise + B0)/(B_noise + B) (module docstring)."""
    batch = positive_int("batch_size", batch_size)
    base = positive_int("base_batch_size", base_batch_size)
    if isinstance(noise_scale, bool) or not isinstance(noise_scale, (int, float)) or not noise_scale >= 0:
        raise UsageError(f"noise_scale={noise_scale!r} must be a number >= 0 (the measured B_simple)")
    if math.isinf(noise_scale):
        return batch / base
    return (noise_scale / base + 1.0) / (noise_scale / batch + 1.0)


def rule_for_family(family: str) -> str:
    """The default rule for an optimizer family: "sgd" -> "linear", "adam"/"adamw" -> "sqrt"."""
    key = str(family).strip().lower()
    if key not in _FAMILY_RULES:
        raise UsageError(f"optimizer family {family!r} is unknown; pass one of {sorted(_FAMILY_RULES)}")
    return _FAMILY_RULES[key]


def warmup_steps(scale_factor: float, steps_per_epoch: int, warmup_epochs: float = DEFAULT_WARMUP_EPOCHS) -> int:
    """Steps of gradual (linear ramp) warmup for an LR raised by `scale_factor` (Goyal et al. 2017):
    none up to a factor of 2, `warmup_epochs` epochs above it."""
    factor = positive_number("scale_factor", scale_factor)
    steps = positive_int("steps_per_epoch", steps_per_epoch)
    if isinstance(warmup_epochs, bool) or not isinstance(warmup_epochs, (int, float)) or not warmup_epochs >= 0:
        raise UsageError(f"warmup_epochs={warmup_epochs!r} must be a number >= 0, e.g. 5")
    if factor <= NO_WARMUP_MAX_FACTOR:
        return 0
    return int(math.ceil(warmup_epochs * steps))


def lr_warnings(
    rule: str,
    factor: float,
    batch_size: int,
    base_batch_size: int,
    *,
    noise_scale: float | None = None,
    family: str | None = None,
    noise_is_lower_bound: bool = False,
) -> list[str]:
    """Reasons to distrust a scaled LR, one sentence each (empty when none apply)."""
    rule = rule_name(rule)
    warnings = []
    scale = batch_size / base_batch_size
    if rule == "linear" and noise_scale is not None and math.isfinite(noise_scale) and batch_size > noise_scale:
        # McCandlish et al. 2018: the best LR is eps_max / (1 + B_noise/B), linear only for B << B_noise.
        if noise_is_lower_bound:
            warnings.append(f"batch {batch_size} exceeds the noise scale's lower bound ({noise_scale:.3g}): "
                            "if the noise scale is below the batch too, the best LR grows sublinearly "
                            "there and linear scaling overshoots; rule 'adascale' adapts to it")
        else:
            warnings.append(f"batch {batch_size} exceeds the noise scale (~{noise_scale:.3g}): the best LR "
                            "grows sublinearly there, so linear scaling overshoots; consider rule 'adascale'")
    if factor > LARGE_FACTOR:
        # Goyal et al. 2017, Fig. 1: linear scaling held to 32x the base batch, not beyond.
        warnings.append(f"the LR factor {factor:.3g} is above {LARGE_FACTOR:g}x, past the range where "
                        "linear scaling was shown to hold (Goyal et al. 2017); expect to retune")
    if family is not None and rule == "linear" and str(family).strip().lower() in ("adam", "adamw"):
        # Malladi et al. 2022: for Adam-family optimizers the SDE-matching rule is square root.
        warnings.append("linear LR scaling with an Adam-family optimizer overshoots; the square-root rule "
                        "fits adaptive methods (Malladi et al. 2022)")
    if rule == "none" and not 0.5 <= scale <= 2.0:
        warnings.append(f"the batch changed {scale:.3g}x but the LR was kept: each step averages {scale:.3g}x "
                        "the examples at the same step size, so progress per example changes; consider "
                        "'linear' (SGD) or 'sqrt' (Adam)")
    return warnings


def rule_name(rule: Any) -> str:
    """The rule's canonical name; an unknown rule is a UsageError naming the choices."""
    key = str(rule).strip().lower()
    if key not in RULES:
        raise UsageError(f"LR rule {rule!r} is unknown; pass one of {', '.join(RULES)}")
    return key
