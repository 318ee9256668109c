"""The seed workload: ResNet-18 (CIFAR form) on CIFAR-10 with the standard SGD recipe.

SGD lr 0.1, momentum 0.9, weight decay 5e-4, no Nesterov, cosine schedule, batch 128: the
recipe most CIFAR-10 ResNet-18 results start from (about 93% top-1 after 200 epochs on the
lossy JPEG copy batchscope ships with, 95% on the original).
"""

from __future__ import annotations

import os

import torch

from batchscope.workload import Workload
from batchscope.workloads.cifar_source import FULL_TRAIN_SIZE
from batchscope.workloads.cifar_workload import CifarOptions, Recipe, build_cifar_workload
from batchscope.workloads.models import resnet18_cifar

NAME = "resnet18-cifar10"
SUMMARY = "ResNet-18 (CIFAR form) on CIFAR-10; SGD lr 0.1 m0.9 wd 5e-4, cosine, batch 128"
RECIPE = Recipe(
    name=NAME,
    description=SUMMARY,
    build_network=resnet18_cifar,
    model_name="resnet18-cifar (11.2M parameters)",
    reference_batch_size=128,
    reference_lr=0.1,
    momentum=0.9,
    weight_decay=5e-4,
    nesterov=False,
)
REFERENCE = {
    "reference_batch_size": RECIPE.reference_batch_size,
    "reference_lr": RECIPE.reference_lr,
    "optimizer_family": "sgd",
    "schedule": "cosine",
    "unit": "examples",
    "dataset_size": FULL_TRAIN_SIZE,
    "metric": "accuracy",
}


def resnet18_cifar10(
    *,
    data_path: str | os.PathLike[str] | None = None,
    download: bool | None = None,
    train_size: int | None = None,
    test_size: int | None = None,
    autocast: str | torch.dtype | None = None,
    channels_last: bool = False,
    loader_workers: int = 0,
) -> Workload:
    """The seed workload.

    Args:
        data_path: the CIFAR-10 archive (see `batchscope.workloads.cifar10_data` for where it
            is looked for otherwise).
        download: allow downloading the official archive when none is found (default: only
            when `BATCHSCOPE_DOWNLOAD=1`).
        train_size / test_size: use a fixed class-balanced subset of that many examples.
        autocast: "bf16" or "fp16" to train under autocast; None for full precision.
        channels_last: run the model and batches in channels_last memory format.
        loader_workers: worker processes of the per-sample CPU pipeline (`data_loader`).
    """
    options = CifarOptions(
        data_path, download, train_size, test_size, autocast, channels_last, loader_workers
    )
    return build_cifar_workload(RECIPE, options)
