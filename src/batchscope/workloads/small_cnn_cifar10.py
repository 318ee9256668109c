"""A small CNN on a CIFAR-10 subset: the whole batchscope pipeline on a CPU in seconds.

Same data handling as the seed workload, a 34k-parameter network and 5,000 training images by
default, so an epoch takes a few seconds on two CPU cores and one epoch already lifts test
accuracy well above chance (10%).
"""

from __future__ import annotations

import os

import torch

from batchscope.workload import Workload
from batchscope.workloads.cifar_workload import CifarOptions, Recipe, build_cifar_workload
from batchscope.workloads.models import small_cnn

NAME = "small-cnn-cifar10"
DEFAULT_TRAIN_SIZE = 5_000
DEFAULT_TEST_SIZE = 1_000
SUMMARY = (
    f"small CNN (34k parameters) on a {DEFAULT_TRAIN_SIZE}-image CIFAR-10 subset; SGD, cosine, "
    f"batch 64; trains on a CPU in seconds"
)
RECIPE = Recipe(
    name=NAME,
    description=SUMMARY,
    build_network=small_cnn,
    model_name="small-cnn (34k parameters)",
    reference_batch_size=64,
    reference_lr=0.05,
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
    "dataset_size": DEFAULT_TRAIN_SIZE,
    "metric": "accuracy",
}


def small_cnn_cifar10(
    *,
    data_path: str | os.PathLike[str] | None = None,
    download: bool | None = None,
    train_size: int | None = DEFAULT_TRAIN_SIZE,
    test_size: int | None = DEFAULT_TEST_SIZE,
    autocast: str | torch.dtype | None = None,
    channels_last: bool = False,
    loader_workers: int = 0,
) -> Workload:
    """The small CPU workload; options as for `resnet18_cifar10` (None sizes = full splits)."""
    options = CifarOptions(
        data_path, download, train_size, test_size, autocast, channels_last, loader_workers
    )
    return build_cifar_workload(RECIPE, options)
