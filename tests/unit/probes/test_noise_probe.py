"""estimate_noise_scale against exact answers: linear regression on a finite dataset (sampled with
replacement), where |G|^2, tr(Sigma) and B_simple are computed from the per-example gradients in
closed form, and a small MLP whose per-example gradients are computed by a plain loop."""

from __future__ import annotations

import dataclasses

import math
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from batchscope.errors import UsageError
from batchscope.probes.noise import NoiseScaleResult, estimate_noise_scale
from batchscope.tune_noise import MIN_NOISE_SAMPLES, SettledDecision

sys.path.insert(0, str(Path(__file__).parent))  # the shared problems live beside this file
from test_noise_problems import (  # noqa: E402
    adam_preconditioner,
    analytic_noise,
    linear_model,
    linear_workload,
    linear_workload_at_the_optimum,
    mlp_exact_noise,
    mlp_workload,
)

CPU = torch.device("cpu")
SEEDS = range(10)
TRUTH = analytic_noise(linear_model())


def _probe(workload=None, **options) -> NoiseScaleResult:
    settings = {"steps": 40, "micro_batch_size": 4, "accumulation": 8}
    settings.update(options)
    return estimate_noise_scale(workload or linear_workload(), CPU, **settings)


@pytest.mark.parametrize("method", ["accumulation", "per_example"])
def test_intervals_cover_the_analytic_noise_scale_and_components_are_unbiased(method):
    results = [_probe(method=method, seed=seed, steps=100) for seed in SEEDS]
    covered = sum(r.ci_low <= TRUTH["b_simple"] <= r.ci_high for r in results)
    # 90% intervals over 10 independent seeds: fewer than 7 hits has probability ~1.3%.
    assert covered >= 7, [(r.ci_low, r.ci_high) for r in results]
    # |G|^2 and tr(Sigma) are unbiased one by one: their means over seeds sit within 4 standard
    # errors of the exact values (a swapped batch size or a missing 1/k would be far outside).
    for key in ("grad_sq_norm", "trace_sigma"):
        values = np.array([getattr(r, key) for r in results])
        standard_error = values.std(ddof=1) / math.sqrt(len(values))
        assert abs(values.mean() - TRUTH[key]) < 4 * standard_error + 1e-9, (key, values.mean(), TRUTH[key])
    first = results[0]
    assert first.samples == 100 and first.status == "ok" and first.method == method
    expected_small = 4 if method == "accumulation" else 1
    assert (first.micro_batch_size, first.big_batch_size) == (expected_small, 32)


def test_sum_reduction_gives_the_same_answer_as_mean():
    mean = _probe(seed=3)
    summed = _probe(linear_workload(reduction="sum"), seed=3)
    for key in ("b_simple", "grad_sq_norm", "trace_sigma", "ci_low", "ci_high"):
        assert getattr(summed, key) == pytest.approx(getattr(mean, key), rel=1e-5)


def test_accumulation_and_per_example_agree_with_the_exact_value_on_a_small_network():
    workload = mlp_workload()
    model = workload.build_model(CPU)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    generator = torch.Generator().manual_seed(0)
    for _ in range(10):  # off initialisation, where B_simple is still tiny
        optimizer.zero_grad()
        workload.loss(model, workload.make_batch(16, CPU, generator)).backward()
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    exact = mlp_exact_noise(model)["b_simple"]
    results = {
        method: estimate_noise_scale(
            workload, model=model, steps=60, micro_batch_size=4, accumulation=8, method=method, seed=1,
            confidence=0.99,
        )
        for method in ("accumulation", "per_example")
    }
    for result in results.values():
        assert result.ci_low <= exact <= result.ci_high, (exact, result.to_dict())
    accumulation, per_example = results["accumulation"], results["per_example"]
    assert accumulation.ci_low <= per_example.b_simple <= accumulation.ci_high


def test_adam_variant_measures_the_preconditioned_gradient():
    workload = linear_workload(optimizer="adam")
    model = linear_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        optimizer.zero_grad()
        workload.loss(model, workload.make_batch(16, CPU, generator)).backward()
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    conditioned = analytic_noise(model, adam_preconditioner(model, optimizer))["b_simple"]
    plain = analytic_noise(model)["b_simple"]
    result = estimate_noise_scale(
        workload, model=model, optimizer=optimizer, precondition="adam",
        steps=80, micro_batch_size=4, accumulation=8, seed=2, confidence=0.99,
    )
    assert result.precondition == "adam" and result.status == "ok"
    assert result.ci_low <= conditioned <= result.ci_high
    assert abs(math.log(result.b_simple / conditioned)) < abs(math.log(result.b_simple / plain))
    # The optimizer's moments are read, never written.
    assert adam_preconditioner(model, optimizer) == pytest.approx(adam_preconditioner(model, optimizer))


def test_adam_variant_after_training_steps_runs_and_sgd_is_refused():
    trained = _probe(linear_workload(optimizer="adam"), precondition="adam", train_steps=5, seed=0)
    assert trained.precondition == "adam" and trained.b_simple is not None
    assert any("5 training step" in note for note in trained.notes)
    with pytest.raises(UsageError, match="exp_avg_sq"):
        _probe(linear_workload(optimizer="sgd"), precondition="adam", train_steps=2)
    with pytest.raises(UsageError, match="exp_avg_sq"):
        _probe(linear_workload(optimizer="adam"), precondition="adam")


def test_token_workloads_also_report_tokens():
    result = _probe(linear_workload(unit="tokens"), seed=0)
    data = result.to_dict()
    # Examples carry 3..6 tokens with equal probability: 4.5 on average.
    assert 4.0 < data["tokens_per_example"] < 5.0
    assert data["b_simple_tokens"] == pytest.approx(data["b_simple"] * data["tokens_per_example"])
    assert data["ci_high_tokens"] == pytest.approx(data["ci_high"] * data["tokens_per_example"])
    assert "b_simple_tokens" not in _probe(seed=0).to_dict()


def test_result_json_has_the_documented_keys():
    data = _probe(seed=0).to_dict()
    for key in ("b_simple", "ci_low", "ci_high", "grad_sq_norm", "trace_sigma", "samples", "seconds",
                "status", "method", "micro_batch_size", "big_batch_size", "unit", "notes"):
        assert key in data
    assert data["unit"] == "examples" and isinstance(data["notes"], list)


class _NetWithBatchNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 8)
        self.norm = nn.BatchNorm1d(8)
        self.drop = nn.Dropout(0.2)
        self.out = nn.Linear(8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.drop(torch.relu(self.norm(self.linear(x)))))


def _batchnorm_workload():
    base = linear_workload()
    return base.with_settings(build_model=lambda device: _NetWithBatchNorm().to(device))


def test_user_model_optimizer_and_rng_are_untouched():
    model = _NetWithBatchNorm().eval()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(8, 4)).sum().backward()
    optimizer.step()
    params = {k: v.clone() for k, v in model.state_dict().items()}
    grads = [p.grad.clone() for p in model.parameters()]
    momentum = [optimizer.state[p]["momentum_buffer"].clone() for p in model.parameters()]
    torch_rng, py_rng, np_rng = torch.get_rng_state(), random.getstate(), np.random.get_state()
    result = estimate_noise_scale(
        _batchnorm_workload(), model=model, optimizer=optimizer, train_steps=3,
        steps=4, micro_batch_size=4, accumulation=2,
    )
    assert result.samples == 4
    assert not model.training and not model.norm.training
    for key, value in model.state_dict().items():
        assert torch.equal(value, params[key]), key
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))
    assert all(torch.equal(optimizer.state[p]["momentum_buffer"], m) for p, m in zip(model.parameters(), momentum))
    assert all(not p._backward_hooks for p in model.parameters())
    assert torch.equal(torch.get_rng_state(), torch_rng)
    assert random.getstate() == py_rng
    assert np.array_equal(np.random.get_state()[1], np_rng[1])


def test_batchnorm_is_noted_for_accumulation_and_refused_per_example():
    result = _probe(_batchnorm_workload(), steps=4, accumulation=2)
    assert any("BatchNorm in train mode" in note for note in result.notes)
    with pytest.raises(UsageError, match="per_example.*BatchNorm"):
        _probe(_batchnorm_workload(), steps=4, method="per_example")


def test_per_example_with_batchnorm_is_refused_before_any_training():
    workload = _batchnorm_workload()
    calls = []
    counting = dataclasses.replace(workload, loss=lambda model, batch: (
        calls.append(1), workload.loss(model, batch))[1])
    with pytest.raises(UsageError, match="per_example.*BatchNorm"):
        _probe(counting, steps=4, method="per_example", train_steps=500)
    assert calls == []  # not one of the 500 training steps ran


def test_unresolved_noise_is_reported_not_clipped():
    # At the exact least-squares optimum G = 0: the mean |G|^2 estimate hovers around zero.
    result = _probe(linear_workload_at_the_optimum(), seed=0)
    # B_noise is infinite here: no interval may have an upper end, and a lower bound is all
    # the probe can honestly give (tr(Sigma) is resolved, |G|^2 is not).
    assert result.status == "lower_bound", result.detail
    assert 0 < result.ci_low < math.inf and result.ci_high is None


@pytest.mark.parametrize(
    "options, fragment",
    [
        ({"steps": 1}, "steps=1"),
        ({"accumulation": 1}, "accumulation=1"),
        ({"micro_batch_size": 0}, "micro_batch_size=0"),
        ({"method": "exact"}, "method='exact'"),
        ({"train_steps": -1}, "train_steps=-1"),
        ({"precondition": "sgd"}, "precondition='sgd'"),
    ],
)
def test_bad_arguments_are_usage_errors(options, fragment):
    with pytest.raises(UsageError, match=fragment):
        _probe(**options)


def test_stop_when_ends_sampling_early_and_says_so():
    seen = []

    def after_twelve(estimate):
        seen.append(estimate.samples)
        return estimate.samples >= 12

    after_twelve.reason = "twelve is plenty"
    result = _probe(steps=40, stop_when=after_twelve)
    assert result.samples == 12 and seen == list(range(2, 13))
    assert any("stopped after 12 of at most 40 samples: twelve is plenty" in n for n in result.notes)
    # The estimate is the one of the samples taken: the same seed without the rule, stopped at
    # 12 by `steps`, gives the same numbers.
    plain = _probe(steps=12)
    assert result.b_simple == pytest.approx(plain.b_simple) and result.ci_low == pytest.approx(plain.ci_low)


def test_stop_when_that_never_fires_takes_every_sample():
    result = _probe(steps=20, method="per_example", stop_when=lambda estimate: False)
    assert result.samples == 20 and not any("stopped after" in n for n in result.notes)


def test_a_settled_decision_stops_at_its_minimum_of_samples():
    # A decision that does not depend on the noise scale is settled as soon as it is trusted.
    result = _probe(steps=40, stop_when=SettledDecision(lambda noise: 1))
    assert result.samples == MIN_NOISE_SAMPLES
    assert any("stopped after 16 of at most 40 samples: the decision was the same" in n
               for n in result.notes)
    # One that flips inside any interval never stops early.
    flipping = _probe(steps=24, stop_when=SettledDecision(lambda noise: noise > TRUTH["b_simple"]))
    assert flipping.samples == 24
