"""A sweep on `Workload.from_objects` trains the user's own model: it must put it back exactly,
and every trial must start from the user's initial weights (independent trials)."""

import random

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from batchscope.sweep import sweep
from batchscope.sweep.grid import GridPoint
from batchscope.sweep.trial import run_trial
from batchscope.sweep.trial_record import TrialSettings
from batchscope.workload import Workload

CPU = torch.device("cpu")
FEATURES = 8


class UserSetup:
    """A user's model (BatchNorm buffers, left in eval mode, with grads) and an optimizer that
    has already stepped (momentum buffers), wrapped by Workload.from_objects. The loss records
    the first layer's weight at every call, so a test can see what each trial started from."""

    def __init__(self) -> None:
        torch.manual_seed(7)
        generator = torch.Generator().manual_seed(1)
        self.x = torch.randn(256, FEATURES, generator=generator)
        self.y = (self.x @ torch.linspace(-1.0, 1.0, FEATURES) > 0).long()
        self.model = nn.Sequential(
            nn.Linear(FEATURES, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 2)
        )
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.1, momentum=0.9)
        F.cross_entropy(self.model(self.x[:32]), self.y[:32]).backward()
        self.optimizer.step()  # momentum state exists now
        F.cross_entropy(self.model(self.x[:32]), self.y[:32]).backward()  # and grads stay set
        self.model.eval()
        self.weights_seen: list[torch.Tensor] = []
        self.workload = Workload.from_objects(
            self.model, self.optimizer, self.loss, self.make_batch, reference_batch_size=16,
            epoch_batches=self.epoch_batches, evaluate=self.evaluate, dataset_size=256,
            name="user-model",
        )

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        self.weights_seen.append(model[0].weight.detach().clone())
        x, y = batch
        return F.cross_entropy(model(x), y)

    def make_batch(self, batch_size: int, device: torch.device, generator: torch.Generator):
        index = torch.randint(0, 256, (batch_size,), generator=generator)
        return self.x[index], self.y[index]

    def epoch_batches(self, batch_size: int, device: torch.device, seed: int):
        order = torch.randperm(256, generator=torch.Generator().manual_seed(seed))
        for start in range(0, 256 - batch_size + 1, batch_size):
            yield self.x[order[start : start + batch_size]], self.y[order[start : start + batch_size]]

    def evaluate(self, model: nn.Module, device: torch.device) -> float:
        model.eval()  # as a user's evaluate would; the trial switches back to train mode
        with torch.no_grad():
            return float((model(self.x).argmax(1) == self.y).float().mean())


def _state(setup: UserSetup) -> dict:
    model, optimizer = setup.model, setup.optimizer
    return {
        "params": {k: v.detach().clone() for k, v in model.named_parameters()},
        "grads": {k: v.grad.clone() for k, v in model.named_parameters()},
        "buffers": {k: v.clone() for k, v in model.named_buffers()},
        "training": [m.training for m in model.modules()],
        "momentum": [optimizer.state[p]["momentum_buffer"].clone() for p in model.parameters()],
        "lr": [g["lr"] for g in optimizer.param_groups],
    }


def _assert_same(before: dict, after: dict) -> None:
    for section in ("params", "grads", "buffers"):
        assert before[section].keys() == after[section].keys()
        for name, value in before[section].items():
            assert torch.equal(value, after[section][name]), f"{section} {name} changed"
    assert after["training"] == before["training"] == [False] * 5
    assert all(torch.equal(a, b) for a, b in zip(before["momentum"], after["momentum"]))
    assert after["lr"] == before["lr"] == [0.1]


def _rng_draws() -> tuple:
    return random.random(), float(np.random.rand()), float(torch.rand(1))


def test_a_sweep_leaves_the_users_model_optimizer_and_rng_bit_identical(tmp_path):
    setup = UserSetup()
    before = _state(setup)
    random.seed(5)
    np.random.seed(5)
    torch.manual_seed(5)
    expected_draws = _rng_draws()
    random.seed(5)
    np.random.seed(5)
    torch.manual_seed(5)

    result = sweep(setup.workload, [16, 32], lr_rule="none", epochs=1, out_dir=tmp_path,
                   pruning=False, report=False)

    assert _rng_draws() == expected_draws
    assert [t.outcome for t in result.trials] == ["complete", "complete"]
    _assert_same(before, _state(setup))
    # Each trial trained from the user's weights: the first step of every trial (after its
    # untimed burn-in step) saw them, not what the burn-in or the previous trial left.
    initial = before["params"]["0.weight"]
    steps = [256 // 16, 256 // 32]
    first_steps = [1, 1 + steps[0] + 1]  # call 0 is the first trial's burn-in, and so on
    assert len(setup.weights_seen) == sum(steps) + 2
    for call in (0, *first_steps):
        assert torch.equal(setup.weights_seen[call], initial), f"loss call {call}"


def test_two_trials_of_the_same_point_and_seed_are_identical():
    setup = UserSetup()
    settings = TrialSettings(epochs=1, evals_per_epoch=2, seed=3)
    first = run_trial(setup.workload, GridPoint(32, "none"), settings, CPU)
    second = run_trial(setup.workload, GridPoint(32, "none"), settings, CPU)
    assert [p.train_loss for p in first.curve] == [p.train_loss for p in second.curve]
    assert [p.metric for p in first.curve] == [p.metric for p in second.curve]
    assert torch.equal(setup.weights_seen[1], setup.weights_seen[1 + 8 + 1])


def test_the_model_is_restored_after_an_error_inside_a_trial():
    setup = UserSetup()
    before = _state(setup)
    calls = {"n": 0}
    own_loss = setup.workload.loss

    def failing_loss(model, batch):
        calls["n"] += 1
        if calls["n"] == 5:  # mid-trial, after the burn-in and a few real steps
            raise RuntimeError("user bug")
        return own_loss(model, batch)

    workload = setup.workload.with_settings(loss=failing_loss)
    with pytest.raises(RuntimeError, match="user bug"):
        run_trial(workload, GridPoint(16, "none"), TrialSettings(epochs=1), CPU)
    _assert_same(before, _state(setup))
