"""The workload registry: lookup, option checking, cheap listing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from batchscope.errors import UsageError
from batchscope.workload import Workload
from batchscope.workloads import (
    WorkloadRegistry,
    cifar_source,
    cifar_workload,
    get_workload,
    list_workloads,
)


def _toy(*, width: int = 4) -> Workload:
    return Workload(
        name="toy",
        build_model=lambda device: torch.nn.Linear(width, 1).to(device),
        build_optimizer=lambda params, lr: torch.optim.SGD(params, lr=lr),
        loss=lambda model, batch: model(batch).mean(),
        make_batch=lambda size, device, generator: torch.zeros(size, width, device=device),
        reference_batch_size=8,
        reference_lr=0.1,
    )


def test_unknown_name_lists_the_available_ones():
    with pytest.raises(UsageError) as caught:
        get_workload("resnet50-imagenet")
    message = str(caught.value)
    assert "'resnet50-imagenet'" in message
    assert "resnet18-cifar10" in message and "small-cnn-cifar10" in message


def test_unknown_option_names_the_accepted_ones():
    with pytest.raises(UsageError) as caught:
        get_workload("small-cnn-cifar10", batch=3, train_szie=10)
    message = str(caught.value)
    assert "'batch'" in message and "'train_szie'" in message
    for option in ("data_path", "download", "train_size", "test_size", "autocast", "channels_last"):
        assert option in message


def test_listing_is_static_and_reads_no_data(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("listing must not look for or decode data")

    monkeypatch.setattr(cifar_workload, "find_archive", forbidden)
    monkeypatch.setattr(cifar_source, "load_cifar10", forbidden)
    listing = {entry["name"]: entry for entry in list_workloads()}
    assert set(listing) >= {"resnet18-cifar10", "small-cnn-cifar10"}
    seed = listing["resnet18-cifar10"]
    assert (seed["reference_batch_size"], seed["reference_lr"], seed["schedule"]) == (
        128,
        0.1,
        "cosine",
    )
    assert seed["dataset_size"] == 50_000 and seed["metric"] == "accuracy"
    assert "train_size" in seed["options"]
    assert listing["small-cnn-cifar10"]["dataset_size"] == 5_000


def test_getting_a_workload_locates_data_but_decodes_nothing(monkeypatch, tmp_path):
    archive = tmp_path / "cifar10-jpg.tar.xz"
    archive.write_bytes(b"never decoded")

    def forbidden(*args, **kwargs):
        raise AssertionError("building a workload must not decode data")

    monkeypatch.setattr(cifar_source, "load_cifar10", forbidden)
    workload = get_workload("resnet18-cifar10", data_path=archive, autocast="bf16", train_size=1000)
    described = workload.describe()
    assert described["autocast_dtype"] == "bfloat16" and described["dataset_size"] == 1000
    assert described["settings"]["archive"] == str(archive)
    assert workload.optimizer_family == "sgd" and workload.loss_reduction == "mean"


def test_optimizer_is_the_reference_sgd(tmp_path):
    archive = tmp_path / "cifar10-jpg.tar.xz"
    archive.write_bytes(b"x")
    workload = get_workload("resnet18-cifar10", data_path=archive)
    optimizer = workload.build_optimizer([torch.nn.Parameter(torch.zeros(1))], 0.4)
    assert isinstance(optimizer, torch.optim.SGD)
    group = optimizer.param_groups[0]
    assert (group["lr"], group["momentum"], group["weight_decay"], group["nesterov"]) == (
        0.4,
        0.9,
        5e-4,
        False,
    )


@pytest.mark.parametrize(
    "options, fragment",
    [
        ({"autocast": "int8"}, "autocast='int8'"),
        ({"train_size": 0}, "train_size=0"),
        ({"train_size": 50_001}, "train_size=50001"),
        ({"test_size": 2.5}, "test_size=2.5"),
        ({"channels_last": "yes"}, "channels_last='yes'"),
        ({"loader_workers": -1}, "loader_workers=-1"),
        ({"download": "no"}, "download='no'"),
    ],
)
def test_bad_option_values(options, fragment, tmp_path):
    archive = tmp_path / "cifar10-jpg.tar.xz"
    archive.write_bytes(b"x")
    with pytest.raises(UsageError) as caught:
        get_workload("small-cnn-cifar10", data_path=archive, **options)
    assert fragment in str(caught.value)


def test_autocast_names(tmp_path):
    archive = tmp_path / "cifar10-jpg.tar.xz"
    archive.write_bytes(b"x")
    dtypes = {
        name: get_workload("small-cnn-cifar10", data_path=archive, autocast=name).autocast_dtype
        for name in ("bf16", "fp16", "BFloat16", None, "none")
    }
    assert dtypes == {
        "bf16": torch.bfloat16,
        "fp16": torch.float16,
        "BFloat16": torch.bfloat16,
        None: None,
        "none": None,
    }


def test_register_and_get_on_a_private_registry():
    registry = WorkloadRegistry()
    registry.register("toy", _toy, summary="a toy", reference={"reference_batch_size": 8})
    assert registry.get("toy", width=3).make_batch(
        2, torch.device("cpu"), torch.Generator()
    ).shape == (2, 3)
    assert registry.listing() == [
        {"name": "toy", "summary": "a toy", "options": ["width"], "reference_batch_size": 8}
    ]
    with pytest.raises(UsageError, match="already registered"):
        registry.register("toy", _toy)
    registry.register("toy", _toy, replace=True)
    with pytest.raises(UsageError, match="accepts: width"):
        registry.get("toy", depth=2)


@pytest.mark.parametrize("name", ["", "pkg.mod:fn", " padded"])
def test_bad_names_are_refused(name):
    with pytest.raises(UsageError, match="workload name"):
        WorkloadRegistry().register(name, _toy)


def test_factory_must_return_a_workload():
    registry = WorkloadRegistry()
    registry.register("broken", lambda: "not a workload")
    with pytest.raises(UsageError, match="returned str"):
        registry.get("broken")


@pytest.mark.parametrize(
    "options, message",
    [
        ({"train_size": 0}, "train_size=0 must be an integer from 1 to 50000"),
        ({"test_size": True}, "test_size=True must be an integer from 1 to 10000"),
        ({"loader_workers": -1},
         "loader_workers=-1 must be an integer >= 0 (0 loads in the main process)"),
    ],
)
def test_integer_options_are_refused_in_one_line(options, message, tmp_path):
    archive = tmp_path / "cifar10-jpg.tar.xz"
    archive.write_bytes(b"x")
    with pytest.raises(UsageError) as caught:
        get_workload("small-cnn-cifar10", data_path=archive, **options)
    assert str(caught.value) == message


def test_numpy_integer_sizes_are_stored_as_plain_ints(tmp_path):
    archive = tmp_path / "cifar10-jpg.tar.xz"
    archive.write_bytes(b"x")
    workload = get_workload("small-cnn-cifar10", data_path=archive, train_size=np.int64(300),
                            test_size=np.int32(200))
    assert workload.dataset_size == 300 and type(workload.dataset_size) is int
    assert type(workload.settings["test_size"]) is int
