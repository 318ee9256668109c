"""Tiny, fast, fully deterministic workloads for the sweep's unit tests.

A linear model on synthetic data: "classify" separates two Gaussian blobs (accuracy, higher is
better), "regress" fits y = X w (mean squared error, lower is better; a large LR makes it
diverge to inf/NaN, which is what the divergence tests need). Also importable as a
`module:function` entry point (`sweep_fixtures:tiny_workload`) for the CLI tests.
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch import nn
from torch.nn import functional as F

from batchscope.workload import Workload

FEATURES = 8


def _data(task: str, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(size, FEATURES, generator=generator)
    true_w = torch.linspace(-1.0, 1.0, FEATURES)
    if task == "classify":
        y = (x @ true_w > 0).long()
        return x, y
    return x, (x @ true_w).unsqueeze(1)


def tiny_workload(
    task: str = "classify",
    reference_lr: float = 0.5,
    dataset_size: int = 256,
    test_size: int = 256,
    oom_above: int | None = None,
    error_above: int | None = None,
    schedule: str = "cosine",
    warmup_epochs: float = 0.0,
    calls: list | None = None,
) -> Workload:
    """`oom_above`: batches larger than this raise torch.OutOfMemoryError in the loss (a fake
    OOM with the real type); `error_above`: they raise a RuntimeError (a user bug); `calls`,
    when given, collects (batch_size, seed) per epoch."""
    train_x, train_y = _data(task, dataset_size, 1)
    test_x, test_y = _data(task, test_size, 2)
    outputs = 2 if task == "classify" else 1

    def build_model(device: torch.device) -> nn.Module:
        return nn.Linear(FEATURES, outputs).to(device)

    def build_optimizer(params, lr: float) -> torch.optim.Optimizer:  # noqa: ANN001
        return torch.optim.SGD(params, lr=lr)

    def loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        if oom_above is not None and x.shape[0] > oom_above:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (fake)")
        if error_above is not None and x.shape[0] > error_above:
            raise RuntimeError(f"batch {x.shape[0]} is too large for this test")
        if task == "classify":
            return F.cross_entropy(model(x), y)
        return F.mse_loss(model(x), y)

    def make_batch(batch_size: int, device: torch.device, generator: torch.Generator):  # noqa: ANN202
        index = torch.randint(0, dataset_size, (batch_size,), generator=generator)
        return train_x[index].to(device), train_y[index].to(device)

    def epoch_batches(batch_size: int, device: torch.device, seed: int) -> Iterator:
        if calls is not None:
            calls.append((batch_size, seed))
        order = torch.randperm(dataset_size, generator=torch.Generator().manual_seed(seed))
        for start in range(0, dataset_size - batch_size + 1, batch_size):
            index = order[start : start + batch_size]
            yield train_x[index].to(device), train_y[index].to(device)

    def evaluate(model: nn.Module, device: torch.device) -> float:
        with torch.no_grad():
            prediction = model(test_x.to(device))
            if task == "classify":
                return float((prediction.argmax(1) == test_y.to(device)).float().mean())
            return float(F.mse_loss(prediction, test_y.to(device)))

    return Workload(
        name=f"tiny-{task}",
        build_model=build_model,
        build_optimizer=build_optimizer,
        loss=loss,
        make_batch=make_batch,
        reference_batch_size=16,
        reference_lr=reference_lr,
        epoch_batches=epoch_batches,
        evaluate=evaluate,
        metric_name="accuracy" if task == "classify" else "mse",
        higher_is_better=task == "classify",
        dataset_size=dataset_size,
        schedule=schedule,
        warmup_epochs=warmup_epochs,
    )


def tiny_failing_above_16() -> Workload:
    """Entry point: the classifier whose loss raises for batches over 16 (Ray workers resolve
    a workload by name, so the failure must be in what the name builds)."""
    return tiny_workload(error_above=16)
