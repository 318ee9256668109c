"""The parts every built-in CIFAR-10 workload shares: options, batches, evaluation, loss.

A workload module (one per built-in) picks the model and the optimizer's hyper-parameters and
calls `build_cifar_workload`; the data handling here is the same for all of them:

- `make_batch` draws a batch without replacement from the device-resident uint8 training set
  and augments it on the device. A batch larger than the training set cannot occur in real
  training; it is still served (examples repeated, see `cifar_source.sample_indices`) so that
  memory and throughput probes can try sizes beyond a small subset.
- `epoch_batches` is one shuffled epoch with the last partial batch dropped; it refuses a batch
  larger than the training set, which would hold no step at all.
- `data_loader` is the per-sample CPU pipeline (`cpu_pipeline`): endless, take what you need.
- `batch_at` is the examples at given indices, augmented as `make_batch` does (adaptive runs).
- `evaluate` is top-1 accuracy on the (subset of the) test set.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from batchscope.checks import require_int
from batchscope.errors import UsageError
from batchscope.workload import Workload
from batchscope.workloads.augment import Normaliser, augmented_batch
from batchscope.workloads.cifar10_data import find_archive
from batchscope.workloads.cifar_source import (
    FULL_TEST_SIZE,
    FULL_TRAIN_SIZE,
    CifarSource,
    sample_indices,
)
from batchscope.workloads.cpu_pipeline import per_sample_loader

# Large enough to keep an accelerator busy, small enough for a CPU's memory.
EVAL_BATCH_SIZE = 500
_AUTOCAST_NAMES = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
    "fp32": None,
    "float32": None,
    "none": None,
}

CifarBatch = tuple[Tensor, Tensor]


@dataclass(frozen=True)
class CifarOptions:
    """User options every CIFAR-10 workload accepts (validated on construction)."""

    data_path: str | os.PathLike[str] | None = None
    download: bool | None = None
    train_size: int | None = None
    test_size: int | None = None
    autocast: str | torch.dtype | None = None
    channels_last: bool = False
    loader_workers: int = 0

    def __post_init__(self) -> None:
        # Stored back as plain ints (a numpy integer is accepted; the dataclass is frozen).
        object.__setattr__(self, "train_size",
                           _check_size("train_size", self.train_size, FULL_TRAIN_SIZE))
        object.__setattr__(self, "test_size",
                           _check_size("test_size", self.test_size, FULL_TEST_SIZE))
        if not isinstance(self.channels_last, bool):
            raise UsageError(f"channels_last={self.channels_last!r} must be True or False")
        if self.download is not None and not isinstance(self.download, bool):
            raise UsageError(f"download={self.download!r} must be True or False")
        object.__setattr__(self, "loader_workers", require_int(
            "loader_workers", self.loader_workers, minimum=0, hint="0 loads in the main process"
        ))
        autocast_dtype(self.autocast)  # raises on a bad name

    @property
    def dtype(self) -> torch.dtype | None:
        return autocast_dtype(self.autocast)


@dataclass(frozen=True)
class Recipe:
    """What distinguishes one CIFAR-10 workload from another."""

    name: str
    description: str
    build_network: Callable[[], nn.Module]
    model_name: str
    reference_batch_size: int
    reference_lr: float
    momentum: float
    weight_decay: float
    nesterov: bool = False


def autocast_dtype(value: str | torch.dtype | None) -> torch.dtype | None:
    """ "bf16"/"fp16" (and their long names) -> that dtype; None/"fp32"/"none" -> None."""
    if value is None or value is torch.float32:
        return None
    if value in (torch.bfloat16, torch.float16):
        return value
    if isinstance(value, str) and value.lower() in _AUTOCAST_NAMES:
        return _AUTOCAST_NAMES[value.lower()]
    raise UsageError(f"autocast={value!r} is not one of bf16, fp16 or none")


def build_cifar_workload(recipe: Recipe, options: CifarOptions) -> Workload:
    """A `Workload` training `recipe` on CIFAR-10 (data located now, decoded on first use)."""
    archive = find_archive(options.data_path, options.download)
    source = CifarSource(archive, options.train_size, options.test_size)
    normalise = Normaliser(channels_last=options.channels_last)
    dtype = options.dtype

    def build_model(device: torch.device) -> nn.Module:
        return recipe.build_network().to(device)

    def build_optimizer(params: Any, lr: float) -> torch.optim.Optimizer:
        return torch.optim.SGD(
            params,
            lr=lr,
            momentum=recipe.momentum,
            weight_decay=recipe.weight_decay,
            nesterov=recipe.nesterov,
        )

    def make_batch(batch_size: int, device: torch.device, generator: torch.Generator) -> CifarBatch:
        images, labels = source.on("train", device)
        indices = sample_indices(len(labels), batch_size, generator)
        return augmented_batch(images, labels, indices, generator, normalise)

    def epoch_batches(batch_size: int, device: torch.device, seed: int) -> Iterator[CifarBatch]:
        batch_size = require_int("batch_size", batch_size)
        if batch_size > source.train_size:
            raise UsageError(
                f"batch_size={batch_size} exceeds the {source.train_size} training examples, so "
                f"an epoch holds no full batch; use at most {source.train_size}"
            )
        return _epoch(source, normalise, batch_size, torch.device(device), seed)

    def batch_at(indices: Tensor, device: torch.device, generator: torch.Generator) -> CifarBatch:
        images, labels = source.on("train", torch.device(device))
        return augmented_batch(images, labels, indices, generator, normalise)

    def data_loader(batch_size: int, device: torch.device) -> Iterator[CifarBatch]:
        images, labels = source.host("train")
        return per_sample_loader(
            images,
            labels,
            batch_size,
            torch.device(device),
            options.loader_workers,
            options.channels_last,
        )

    def evaluate(model: nn.Module, device: torch.device) -> float:
        return top1_accuracy(model, source, normalise, torch.device(device), dtype)

    return Workload(
        name=recipe.name,
        build_model=build_model,
        build_optimizer=build_optimizer,
        loss=cross_entropy_loss,
        make_batch=make_batch,
        reference_batch_size=recipe.reference_batch_size,
        reference_lr=recipe.reference_lr,
        epoch_batches=epoch_batches,
        data_loader=data_loader,
        evaluate=evaluate,
        batch_at=batch_at,
        metric_name="accuracy",
        higher_is_better=True,
        count=count_examples,
        unit="examples",
        dataset_size=source.train_size,
        optimizer_family="sgd",
        schedule="cosine",
        loss_reduction="mean",
        autocast_dtype=dtype,
        channels_last=options.channels_last,
        description=recipe.description,
        settings={
            "model": recipe.model_name,
            "momentum": recipe.momentum,
            "weight_decay": recipe.weight_decay,
            "nesterov": recipe.nesterov,
            "augmentation": "zero-pad 4 + random crop 32, horizontal flip, normalise (on device)",
            "train_size": source.train_size,
            "test_size": source.test_size,
            "archive": str(archive),
        },
    )


def cross_entropy_loss(model: nn.Module, batch: CifarBatch) -> Tensor:
    images, labels = batch
    return F.cross_entropy(model(images), labels)


def count_examples(batch: CifarBatch) -> int:
    return int(batch[1].shape[0])


def top1_accuracy(
    model: nn.Module,
    source: CifarSource,
    normalise: Normaliser,
    device: torch.device,
    dtype: torch.dtype | None,
) -> float:
    """Top-1 accuracy on the test split, in eval mode; every module's train/eval flag is
    restored afterwards, whatever it was (a model may mix modes, e.g. frozen BatchNorm)."""
    images, labels = source.on("test", device)
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    precision = (
        torch.autocast(device_type=device.type, dtype=dtype)
        if dtype is not None
        else contextlib.nullcontext()
    )
    correct = torch.zeros((), dtype=torch.int64, device=device)
    try:
        with torch.no_grad(), precision:
            for start in range(0, len(labels), EVAL_BATCH_SIZE):
                batch = normalise(images[start : start + EVAL_BATCH_SIZE])
                predictions = model(batch).argmax(dim=1)
                correct += (predictions == labels[start : start + EVAL_BATCH_SIZE]).sum()
    finally:
        for module, training in modes:
            module.training = training
    # One device-to-host read at the end instead of one per batch.
    return int(correct.item()) / len(labels)


def _epoch(
    source: CifarSource, normalise: Normaliser, batch_size: int, device: torch.device, seed: int
) -> Iterator[CifarBatch]:
    images, labels = source.on("train", device)
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(labels), generator=generator)
    for start in range(0, len(labels) - batch_size + 1, batch_size):
        yield augmented_batch(
            images, labels, order[start : start + batch_size], generator, normalise
        )


def _check_size(name: str, value: Any, maximum: int) -> int | None:
    return None if value is None else require_int(name, value, maximum=maximum)
