"""StateGuard restores user state bit for bit, in place, on success, error and Ctrl-C."""

from __future__ import annotations

import copy
import random

import numpy as np
import pytest
import torch
from torch import nn

from batchscope.errors import UsageError
from batchscope.guard import StateGuard, preserve_user_state


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(0.5), nn.Linear(4 * 6 * 6, 5))

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(inputs))


def make_model(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    return Net()


def train_steps(model: nn.Module, optimizer: torch.optim.Optimizer, steps: int, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        inputs = torch.randn(6, 3, 8, 8, generator=generator)
        targets = torch.randint(0, 5, (6,), generator=generator)
        optimizer.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(inputs), targets).backward()
        optimizer.step()


def capture(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict:
    """Everything the guard promises to keep, as plain values (clones) and object ids."""
    state = {
        "tensors": {k: (v.detach().clone(), v.dtype) for k, v in model.state_dict().items()},
        "grads": {k: None if p.grad is None else p.grad.clone()
                  for k, p in model.named_parameters()},
        "requires_grad": {k: p.requires_grad for k, p in model.named_parameters()},
        "training": {k: m.training for k, m in model.named_modules()},
        "objects": {k: id(v) for k, v in model.state_dict(keep_vars=True).items()},
        "members": [name for name, _ in model.named_children()],
    }
    if optimizer is not None:
        state["optimizer"] = copy.deepcopy(optimizer.state_dict())
        state["optimizer_objects"] = {
            (id(p), key): id(value)
            for p, entries in optimizer.state.items() for key, value in entries.items()
        }
    return state


def differences(before: object, after: object, path: str = "") -> list[str]:
    """Paths where `after` is not bit-identical to `before` (dtype included)."""
    if isinstance(before, torch.Tensor):
        same = (isinstance(after, torch.Tensor) and before.dtype == after.dtype
                and torch.equal(before, after))
        return [] if same else [path]
    if isinstance(before, dict):
        if not isinstance(after, dict) or list(before) != list(after):
            return [path]
        return [d for key in before for d in differences(before[key], after[key], f"{path}/{key}")]
    if isinstance(before, (list, tuple)):
        if type(before) is not type(after) or len(before) != len(after):
            return [path]
        return [d for i, (b, a) in enumerate(zip(before, after))
                for d in differences(b, a, f"{path}/{i}")]
    return [] if before == after else [path]


def mutate(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """What a probe might do to the user's objects."""
    train_steps(model, optimizer, steps=2, seed=99)  # params, BN stats, momentum, step counts
    optimizer.param_groups[0]["lr"] = 123.0
    model.features[0].weight.grad = torch.ones_like(model.features[0].weight)
    model.head[2].bias.grad = None
    model.head[2].weight.requires_grad_(False)
    model.eval()


@pytest.fixture
def trained():
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    train_steps(model, optimizer, steps=2, seed=1)
    # Grads present at entry (not zeroed after the last step) must come back too.
    nn.functional.cross_entropy(model(torch.randn(2, 3, 8, 8)), torch.tensor([0, 1])).backward()
    model.features[1].eval()  # mixed modes
    return model, optimizer


def test_success_path_restores_everything_and_the_mutation_was_real(trained):
    model, optimizer = trained
    before = capture(model, optimizer)
    tensors = [*model.state_dict().values(), *(p.grad for p in model.parameters()),
               *(v for entries in optimizer.state.values() for v in entries.values())]
    storage = [tensor.data_ptr() for tensor in tensors]
    with StateGuard(model, optimizer):
        mutate(model, optimizer)
        assert len(differences(before, capture(model, optimizer))) > 10
    assert differences(before, capture(model, optimizer)) == []
    # Written in place: views and raw pointers the user holds still see the values.
    assert [tensor.data_ptr() for tensor in tensors] == storage


def test_exception_propagates_unchanged_and_state_is_restored(trained):
    model, optimizer = trained
    before = capture(model, optimizer)
    error = RuntimeError("probe failed")
    with pytest.raises(RuntimeError) as info:
        with StateGuard(model, optimizer):
            mutate(model, optimizer)
            raise error
    assert info.value is error
    assert differences(before, capture(model, optimizer)) == []


def test_keyboard_interrupt_is_restored_from_and_propagates(trained):
    model, optimizer = trained
    before = capture(model, optimizer)
    with pytest.raises(KeyboardInterrupt):
        with preserve_user_state(model, optimizer):
            mutate(model, optimizer)
            raise KeyboardInterrupt
    assert differences(before, capture(model, optimizer)) == []


def test_batchnorm_running_stats_after_a_train_mode_forward():
    model = make_model()
    norm = model.features[1]
    mean, var, tracked = norm.running_mean, norm.running_var, norm.num_batches_tracked
    expected = [mean.clone(), var.clone(), tracked.clone()]
    with StateGuard(model):
        model.train()
        model(torch.randn(4, 3, 8, 8))
        assert int(tracked) == 1 and not torch.equal(mean, expected[0])
    assert norm.running_mean is mean and norm.running_var is var
    assert norm.num_batches_tracked is tracked and tracked.dtype == torch.long
    assert all(torch.equal(a, b) for a, b in zip((mean, var, tracked), expected))


@pytest.mark.parametrize(
    "make_optimizer",
    [
        lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=5e-4),
        lambda params: torch.optim.Adam(params, lr=1e-3, betas=(0.8, 0.95)),
    ],
    ids=["sgd-momentum", "adam"],
)
def test_optimizer_state_is_identical_and_training_continues_as_if_untouched(make_optimizer):
    model = make_model()
    optimizer = make_optimizer(model.parameters())
    train_steps(model, optimizer, steps=3, seed=1)
    control_model = copy.deepcopy(model)
    control_optimizer = make_optimizer(control_model.parameters())
    control_optimizer.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    before = capture(model, optimizer)

    with StateGuard(model, optimizer):
        mutate(model, optimizer)
        optimizer.add_param_group({"params": [nn.Parameter(torch.zeros(2))], "lr": 5.0})
        assert differences(before["optimizer"], optimizer.state_dict()) != []

    after = capture(model, optimizer)
    assert differences(before, after) == []
    assert after["optimizer_objects"] == before["optimizer_objects"]  # restored in place
    assert [g["lr"] for g in optimizer.param_groups] == [g["lr"] for g in
                                                         control_optimizer.param_groups]
    # The next steps are bit-identical to those of a run that never met the guard.
    for run_model, run_optimizer in ((model, optimizer), (control_model, control_optimizer)):
        torch.manual_seed(7)  # same dropout masks for both runs
        train_steps(run_model, run_optimizer, steps=2, seed=7)
    assert differences(capture(control_model)["tensors"], capture(model)["tensors"]) == []
    assert differences(control_optimizer.state_dict(), optimizer.state_dict()) == []


def test_state_first_created_inside_the_block_is_dropped():
    model = make_model()
    optimizer = torch.optim.Adam(model.parameters())
    with StateGuard(model, optimizer):
        train_steps(model, optimizer, steps=1, seed=3)
        assert len(optimizer.state) == len(list(model.parameters()))
    assert len(optimizer.state) == 0
    assert all(p.grad is None for p in model.parameters())


def test_nested_train_and_eval_flags_come_back_exactly():
    model = make_model()
    model.features.eval()
    model.features[1].train()
    model.head[1].eval()
    flags = {name: m.training for name, m in model.named_modules()}
    assert sorted(set(flags.values())) == [False, True]
    for switch in (model.train, model.eval):
        with StateGuard(model):
            switch()
        assert {name: m.training for name, m in model.named_modules()} == flags


def test_protect_after_entry_covers_an_object_built_inside_the_block():
    with StateGuard(rng=False) as guard:
        model = make_model(seed=5)
        assert guard.protect(model) is model
        weight, before = model.head[2].weight, capture(model)
        with torch.no_grad():
            weight.mul_(3)
        model.train(False)
        assert guard.protect(model) is model  # a second protect keeps the first snapshot
    assert model.head[2].weight is weight
    assert differences(before, capture(model)) == []


def test_added_removed_and_replaced_members_are_undone_and_dtype_changes_reverted():
    model = make_model()
    linear = model.head[2]
    weight, head, before = linear.weight, model.head, capture(model)
    with StateGuard(model):
        model.double()
        del linear.weight
        linear.weight = torch.zeros(3)  # a plain attribute under a parameter's name
        linear.extra = nn.Parameter(torch.ones(1))
        model.features[1].register_buffer("counter", torch.zeros(1))
        model.head = nn.Identity()
        model.added = nn.Linear(1, 1)
    assert model.head is head and linear.weight is weight
    assert not hasattr(linear, "extra") and not hasattr(model, "added")
    assert "counter" not in dict(model.features[1].named_buffers())
    assert differences(before, capture(model)) == []
    assert weight.dtype == torch.float32 and isinstance(weight, nn.Parameter)


def test_restore_can_run_again_inside_the_block_without_aliasing_the_snapshot(trained):
    model, optimizer = trained
    before = capture(model, optimizer)
    with StateGuard(model, optimizer) as guard:
        mutate(model, optimizer)
        for entries in optimizer.state.values():
            entries.clear()  # so restore has to create the momentum buffers anew
        for parameter in model.parameters():
            parameter.grad = None  # and the gradients
        guard.restore()
        # Values come back; the deleted buffers themselves cannot (holding them would have
        # kept their memory on the device during the probe).
        identities = before.pop("optimizer_objects")
        during = capture(model, optimizer)
        assert during.pop("optimizer_objects") != identities
        assert differences(before, during) == []
        # In-place writes to what restore created must not reach the snapshot.
        for parameter in model.parameters():
            parameter.grad.add_(1)
        mutate(model, optimizer)
    after = capture(model, optimizer)
    after.pop("optimizer_objects")
    assert differences(before, after) == []


def test_lr_scheduler_is_restored_through_its_state_dict():
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    with StateGuard(optimizer, scheduler):
        for _ in range(3):
            optimizer.step()
            scheduler.step()
        assert optimizer.param_groups[0]["lr"] == pytest.approx(0.0125)
    assert scheduler.last_epoch == 0 and scheduler.get_last_lr() == [0.1]
    assert optimizer.param_groups[0]["lr"] == 0.1


def draws() -> tuple:
    return (
        [random.random() for _ in range(3)],
        np.random.standard_normal(3).tolist(),
        torch.rand(3).tolist(),
        torch.randn(2).tolist(),
    )


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@pytest.mark.parametrize("failure", [None, ValueError, KeyboardInterrupt])
def test_rng_draws_after_the_block_are_those_that_would_have_happened(failure):
    seed_all(1234)
    np.random.standard_normal(1)  # leaves numpy's cached second Gaussian in its state
    expected = draws()

    seed_all(1234)
    np.random.standard_normal(1)
    try:
        with StateGuard():
            assert draws() == expected  # consume exactly what the user would have drawn
            seed_all(7)  # and reseed, as a probe making itself reproducible does
            if failure is not None:
                raise failure
    except (ValueError, KeyboardInterrupt):
        pass
    assert draws() == expected


def test_rng_false_leaves_the_rngs_alone():
    seed_all(3)
    with StateGuard(rng=False):
        first = draws()
    seed_all(3)
    assert draws() == first
    assert draws() != first


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_rng_and_model_on_cuda_snapshot_to_cpu():
    model = make_model().cuda()
    before = {k: v.cpu() for k, v in model.state_dict().items()}
    torch.cuda.manual_seed_all(11)
    expected = torch.rand(4, device="cuda").cpu()
    torch.cuda.manual_seed_all(11)
    allocated = torch.cuda.memory_allocated()
    with StateGuard(model):
        assert torch.cuda.memory_allocated() == allocated  # the snapshot holds no GPU memory
        torch.rand(1000, device="cuda")
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.add_(1)
    assert torch.equal(torch.rand(4, device="cuda").cpu(), expected)
    assert differences(before, {k: v.cpu() for k, v in model.state_dict().items()}) == []


def test_bad_objects_are_usage_errors():
    with pytest.raises(UsageError, match="cannot protect a str"):
        with StateGuard("model"):
            pass
    with pytest.raises(UsageError, match="lazy parameter"):
        with StateGuard(nn.LazyLinear(3)):
            pass
    guard = StateGuard()
    with guard:
        with pytest.raises(UsageError, match="already active"):
            guard.__enter__()


def test_an_optimizer_alone_also_covers_the_parameters_its_step_moves():
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    weights = [p.detach().clone() for p in model.parameters()]
    with StateGuard(optimizer, rng=False):
        train_steps(model, optimizer, steps=1, seed=2)
        assert not torch.equal(next(model.parameters()), weights[0])
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), weights))
    assert all(p.grad is None for p in model.parameters()) and len(optimizer.state) == 0
