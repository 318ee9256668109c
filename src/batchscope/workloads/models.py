"""The networks of the built-in workloads, written here so batchscope needs no torchvision.

- `resnet18_cifar`: ResNet-18 in its CIFAR form (He et al. 2016, as commonly adapted to 32x32
  inputs): a 3x3 stride-1 stem with 64 channels and no max-pool, four stages of two
  BasicBlocks with 64-128-256-512 channels (stride 2 from the second stage on), BatchNorm,
  global average pooling and one linear layer. 11,173,962 parameters for 10 classes.
- `small_cnn`: three conv-BN-ReLU-pool stages (about 34k parameters) that learn CIFAR-10
  well above chance in one short epoch on a laptop CPU.
"""

from __future__ import annotations

from torch import Tensor, nn
from torch.nn import functional as F


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection (projected when the shape changes)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNetCifar(nn.Module):
    """ResNet with a CIFAR stem (3x3 conv, no max-pool) built from BasicBlocks."""

    def __init__(
        self,
        blocks_per_stage: tuple[int, ...] = (2, 2, 2, 2),
        widths: tuple[int, ...] = (64, 128, 256, 512),
        num_classes: int = 10,
    ) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, widths[0], 3, stride=1, padding=1, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(inplace=True),
        )
        stages = []
        in_channels = widths[0]
        for stage, (blocks, width) in enumerate(zip(blocks_per_stage, widths)):
            stride = 1 if stage == 0 else 2
            layers = []
            for block in range(blocks):
                layers.append(BasicBlock(in_channels, width, stride if block == 0 else 1))
                in_channels = width
            stages.append(nn.Sequential(*layers))
        self.stages = nn.Sequential(*stages)
        self.classifier = nn.Linear(in_channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        features = self.stages(self.stem(x))
        pooled = F.adaptive_avg_pool2d(features, 1).flatten(1)
        return self.classifier(pooled)


def resnet18_cifar(num_classes: int = 10) -> ResNetCifar:
    return ResNetCifar((2, 2, 2, 2), (64, 128, 256, 512), num_classes)


class SmallCNN(nn.Module):
    """Three conv-BN-ReLU-maxpool stages (16-32-96 channels), global average pooling and one
    linear layer."""

    def __init__(self, widths: tuple[int, int, int] = (16, 32, 96), num_classes: int = 10) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        in_channels = 3
        for width in widths:
            layers += [
                nn.Conv2d(in_channels, width, 3, padding=1, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            ]
            in_channels = width
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(in_channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        pooled = F.adaptive_avg_pool2d(self.features(x), 1).flatten(1)
        return self.classifier(pooled)


def small_cnn(num_classes: int = 10) -> SmallCNN:
    return SmallCNN((16, 32, 96), num_classes)
