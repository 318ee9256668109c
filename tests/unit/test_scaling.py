"""LR rules with known answers (Goyal et al. 2017 linear, sqrt, AdaScale gain) and warnings."""

from __future__ import annotations

import json
import math

import pytest

from batchscope.errors import UsageError
from batchscope.scaling import (
    adascale_gain,
    lr_warnings,
    rule_for_family,
    scale_learning_rate,
    warmup_steps,
)


def test_linear_known_answer():
    plan = scale_learning_rate(0.1, 128, 1024, "linear")
    assert plan.learning_rate == pytest.approx(0.8)
    assert plan.factor == pytest.approx(8.0)
    assert (plan.rule, plan.base_lr, plan.base_batch_size, plan.batch_size) == ("linear", 0.1, 128, 1024)


def test_sqrt_known_answer():
    assert scale_learning_rate(0.1, 128, 1024, "sqrt").learning_rate == pytest.approx(0.1 * math.sqrt(8))
    assert scale_learning_rate(1e-3, 256, 64, "sqrt").learning_rate == pytest.approx(5e-4)


def test_none_keeps_lr_and_warns_on_big_change():
    plan = scale_learning_rate(0.1, 128, 1024, "none")
    assert plan.learning_rate == 0.1 and plan.factor == 1.0
    assert any("kept" in w for w in plan.warnings)
    assert scale_learning_rate(0.1, 128, 256, "none").warnings == ()


def test_adascale_gain_closed_form_and_limits():
    # r = (sigma^2 + |G|^2)/(sigma^2/S + |G|^2) with sigma^2 = tr/B0. Take |G|^2 = 2, tr = 1000,
    # B0 = 100, B = 400: sigma^2 = 10, S = 4 -> r = 12 / 4.5 = 2.666...
    grad_sq, trace, base, batch = 2.0, 1000.0, 100, 400
    sigma_sq, scale = trace / base, batch / base
    direct = (sigma_sq + grad_sq) / (sigma_sq / scale + grad_sq)
    assert direct == pytest.approx(12 / 4.5)
    assert adascale_gain(batch, base, trace / grad_sq) == pytest.approx(direct)
    assert adascale_gain(batch, base, 0.0) == pytest.approx(1.0)  # no noise: no gain
    assert adascale_gain(batch, base, math.inf) == pytest.approx(4.0)  # pure noise: linear
    assert adascale_gain(batch, base, 1e12) == pytest.approx(4.0, rel=1e-6)
    # Never beyond linear, never below 1 for a bigger batch.
    for noise in (1.0, 50.0, 500.0, 5000.0):
        assert 1.0 <= adascale_gain(batch, base, noise) <= 4.0


def test_adascale_plan_needs_noise_scale():
    plan = scale_learning_rate(0.1, 100, 400, "adascale", noise_scale=500.0)
    assert plan.learning_rate == pytest.approx(0.1 * (500 / 100 + 1) / (500 / 400 + 1))
    with pytest.raises(UsageError, match="noise_scale"):
        scale_learning_rate(0.1, 100, 400, "adascale")


def test_rule_for_family():
    assert rule_for_family("sgd") == "linear"
    assert rule_for_family("Adam") == "sqrt"
    assert rule_for_family("adamw") == "sqrt"
    with pytest.raises(UsageError, match="lion"):
        rule_for_family("lion")


def test_warmup_thresholds():
    assert warmup_steps(1.0, 390) == 0
    assert warmup_steps(2.0, 390) == 0  # doubling: no warmup
    assert warmup_steps(2.01, 390) == 5 * 390
    assert warmup_steps(32, 100, warmup_epochs=2.5) == 250
    assert warmup_steps(0.5, 390) == 0  # LR goes down: nothing to warm up


def test_plan_carries_warmup_or_asks_for_steps_per_epoch():
    plan = scale_learning_rate(0.1, 128, 1024, "linear", steps_per_epoch=49)
    assert plan.warmup_steps == 245
    unknown = scale_learning_rate(0.1, 128, 1024, "linear")
    assert unknown.warmup_steps is None
    assert any("steps_per_epoch" in w for w in unknown.warnings)
    assert scale_learning_rate(0.1, 128, 256, "linear", steps_per_epoch=49).warmup_steps == 0


def test_warnings():
    # Linear past the noise scale overshoots (McCandlish et al. 2018).
    assert any("noise scale" in w for w in lr_warnings("linear", 8.0, 1024, 128, noise_scale=300.0))
    assert not lr_warnings("linear", 8.0, 1024, 128, noise_scale=5000.0)
    # Factor beyond Goyal et al.'s 32x evidence.
    assert any("32x" in w for w in lr_warnings("linear", 64.0, 8192, 128))
    # Linear with Adam.
    assert any("Adam" in w for w in lr_warnings("linear", 4.0, 512, 128, family="adamw"))
    assert not lr_warnings("sqrt", 2.0, 512, 128, family="adam")


def test_to_dict_is_plain_json():
    plan = scale_learning_rate(0.1, 128, 8192, "linear", steps_per_epoch=6, noise_scale=1000.0)
    data = json.loads(json.dumps(plan.to_dict(), allow_nan=False))
    assert data["learning_rate"] == pytest.approx(6.4)
    assert data["warmup_steps"] == 30
    assert len(data["warnings"]) == 2
    assert set(data) >= {"learning_rate", "rule", "factor", "base_lr", "base_batch_size", "warmup_steps", "warnings"}


@pytest.mark.parametrize(
    "call",
    [
        lambda: scale_learning_rate(0.0, 128, 256),
        lambda: scale_learning_rate(-0.1, 128, 256),
        lambda: scale_learning_rate(0.1, 0, 256),
        lambda: scale_learning_rate(0.1, 128, 12.5),
        lambda: scale_learning_rate(0.1, 128, 256, "cubic"),
        lambda: scale_learning_rate(float("nan"), 128, 256),
        lambda: scale_learning_rate(0.1, True, 256),
        lambda: warmup_steps(4.0, 0),
        lambda: warmup_steps(4.0, 10, warmup_epochs=-1),
        lambda: adascale_gain(256, 128, -1.0),
    ],
)
def test_bad_input_is_a_one_line_usage_error(call):
    with pytest.raises(UsageError) as info:
        call()
    assert "\n" not in str(info.value)
