"""Sweep trials on a CUDA device with the user's own model: restored bit for bit (the device RNG
too), trials independent, and a real out-of-memory mid-trial recorded as an outcome with its
memory released. Skipped without CUDA."""

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from batchscope.sweep.grid import GridPoint
from batchscope.sweep.trial import run_trial
from batchscope.sweep.trial_record import TrialSettings
from batchscope.workload import Workload

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

SIZE = 512


class CudaUserSetup:
    """A user's model on the GPU (BatchNorm, eval mode, grads set) and a stepped optimizer;
    the loss records the first weight it sees and, when armed, asks for far more memory than
    the device has at its `oom_at_call`-th call (a real CUDA OOM, mid-trial)."""

    def __init__(self) -> None:
        self.device = torch.device("cuda")
        torch.manual_seed(0)
        generator = torch.Generator().manual_seed(1)
        self.x = torch.randn(SIZE, 16, generator=generator).to(self.device)
        self.y = (self.x.sum(1) > 0).long()
        self.model = nn.Sequential(
            nn.Linear(16, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 2)
        ).to(self.device)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.1, momentum=0.9)
        F.cross_entropy(self.model(self.x[:64]), self.y[:64]).backward()
        self.optimizer.step()
        F.cross_entropy(self.model(self.x[:64]), self.y[:64]).backward()
        self.model.eval()
        self.calls = 0
        self.oom_at_call: int | None = None
        self.weights_seen: list[torch.Tensor] = []
        self.workload = Workload.from_objects(
            self.model, self.optimizer, self.loss, self.make_batch, reference_batch_size=32,
            epoch_batches=self.epoch_batches, evaluate=self.evaluate, dataset_size=SIZE,
        )

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        self.calls += 1
        # kept on the CPU: a copy on the GPU would change the memory the OOM test compares
        self.weights_seen.append(model[0].weight.detach().to("cpu", copy=True))
        if self.calls == self.oom_at_call:
            # Held by this frame, which the OOM's traceback pins: leaked unless released.
            ballast = torch.ones(256 << 20, dtype=torch.uint8, device=self.device)
            torch.empty(1 << 44, dtype=torch.uint8, device=self.device) + ballast[0]  # 16 TiB
        x, y = batch
        return F.cross_entropy(model(x), y)

    def make_batch(self, batch_size: int, device: torch.device, generator: torch.Generator):
        index = torch.randint(0, SIZE, (batch_size,), generator=generator).to(device)
        return self.x[index], self.y[index]

    def epoch_batches(self, batch_size: int, device: torch.device, seed: int):
        order = torch.randperm(SIZE, generator=torch.Generator().manual_seed(seed)).to(device)
        for start in range(0, SIZE - batch_size + 1, batch_size):
            index = order[start : start + batch_size]
            yield self.x[index], self.y[index]

    def evaluate(self, model: nn.Module, device: torch.device) -> float:
        model.eval()
        with torch.no_grad():
            return float((model(self.x).argmax(1) == self.y).float().mean())

    def state(self) -> dict:
        return {
            "params": [p.detach().clone() for p in self.model.parameters()],
            "grads": [p.grad.clone() for p in self.model.parameters()],
            "buffers": [b.clone() for b in self.model.buffers()],
            "training": [m.training for m in self.model.modules()],
            "momentum": [self.optimizer.state[p]["momentum_buffer"].clone()
                         for p in self.model.parameters()],
            "cuda_rng": torch.cuda.get_rng_state(),
            "cpu_rng": torch.get_rng_state(),
        }


def _assert_same(before: dict, after: dict) -> None:
    for section in ("params", "grads", "buffers", "momentum"):
        assert all(torch.equal(a, b) for a, b in zip(before[section], after[section])), section
    assert after["training"] == before["training"]
    assert torch.equal(after["cuda_rng"], before["cuda_rng"])
    assert torch.equal(after["cpu_rng"], before["cpu_rng"])


def test_cuda_trials_on_the_users_model_are_independent_and_leave_it_untouched():
    setup = CudaUserSetup()
    before = setup.state()
    settings = TrialSettings(epochs=1, evals_per_epoch=2, seed=3)
    first = run_trial(setup.workload, GridPoint(32, "none"), settings, setup.device)
    second = run_trial(setup.workload, GridPoint(32, "none"), settings, setup.device)
    assert first.outcome == second.outcome == "complete"
    steps = SIZE // 32
    # calls: burn-in, steps of trial 1, burn-in, steps of trial 2
    for call in (0, 1, steps + 1, steps + 2):
        assert torch.equal(setup.weights_seen[call], before["params"][0].cpu()), f"call {call}"
    assert [p.train_loss for p in first.curve] == [p.train_loss for p in second.curve]
    _assert_same(before, setup.state())


def test_a_real_cuda_oom_mid_trial_is_an_outcome_and_its_memory_is_released():
    setup = CudaUserSetup()
    before = setup.state()
    torch.cuda.synchronize()
    allocated = torch.cuda.memory_allocated()
    setup.oom_at_call = 5  # the burn-in, then the 4th training step: optimizer state exists
    record = run_trial(setup.workload, GridPoint(32, "none"), TrialSettings(epochs=1), setup.device)
    assert record.outcome == "oom" and "out of memory" in record.message.lower()
    assert not record.full_budget
    torch.cuda.synchronize()
    # Nothing of the failed trial stays (the 256 MiB ballast, the trial's optimizer state);
    # releasing may also hand back cuBLAS workspaces, so the count can end slightly lower.
    assert torch.cuda.memory_allocated() <= allocated
    _assert_same(before, setup.state())
