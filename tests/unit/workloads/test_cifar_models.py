"""The built-in networks: the exact CIFAR ResNet-18 and the small CPU CNN."""

from __future__ import annotations

import torch
from torch import nn

from batchscope.workloads.models import resnet18_cifar, small_cnn


def _parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_resnet18_cifar_has_the_known_parameter_count():
    assert _parameters(resnet18_cifar()) == 11_173_962


def test_resnet18_cifar_shape():
    model = resnet18_cifar()
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    stem = convs[0]
    assert (stem.in_channels, stem.out_channels, stem.kernel_size, stem.stride) == (
        3,
        64,
        (3, 3),
        (1, 1),
    )
    assert not any(isinstance(m, nn.MaxPool2d) for m in model.modules())
    # 1 stem + 8 blocks x 2 convs + 3 projection shortcuts
    assert len(convs) == 20
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 20
    assert [stage[0].conv1.out_channels for stage in model.stages] == [64, 128, 256, 512]
    assert [len(stage) for stage in model.stages] == [2, 2, 2, 2]
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


def test_resnet18_downsamples_to_4x4_before_pooling():
    model = resnet18_cifar().eval()
    features = model.stages(model.stem(torch.zeros(1, 3, 32, 32)))
    assert features.shape == (1, 512, 4, 4)


def test_small_cnn_is_small():
    model = small_cnn()
    assert 30_000 <= _parameters(model) <= 100_000
    assert model(torch.zeros(3, 3, 32, 32)).shape == (3, 10)
