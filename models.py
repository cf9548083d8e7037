"""Teacher and student networks for 32x32 CIFAR-10 images, built by name.

    from models import build_model, count_parameters
    model = build_model("resnet20", num_classes=10)

Every model takes (N, 3, 32, 32) float images and returns (N, num_classes) logits.

| name        | parameters | what it is                                                          |
| ----------- | ---------- | ------------------------------------------------------------------- |
| resnet18    | 11.2 M     | torchvision's ResNet-18, 3x3 stride-1 stem, no max-pool (teacher)   |
| resnet56    | 0.86 M     | CIFAR ResNet of He et al. 2016, 3 stages of 9 blocks                |
| resnet20    | 0.27 M     | the same with 3 blocks per stage (default student)                  |
| mobilenetv2 | 2.2 M      | torchvision's MobileNetV2, first two strides removed for 32x32      |
| tinycnn     | 0.09 M     | three conv-BN-ReLU-pool stages; a quick student for CPU runs        |
"""
from typing import Callable, Dict

import torch.nn.functional as F
import torchvision
from torch import nn


class CifarBasicBlock(nn.Module):
    """Two 3x3 convolutions with an identity shortcut.

    Where the block halves the resolution and doubles the width, the shortcut subsamples and
    pads the new channels with zeros (option A of He et al. 2016), which adds no parameters and
    is what the paper's 0.27 M parameters for ResNet-20 count.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.stride = stride
        self.extra_channels = out_channels - in_channels

    def shortcut(self, x):
        if self.stride == 1 and self.extra_channels == 0:
            return x
        x = x[:, :, :: self.stride, :: self.stride]
        half = self.extra_channels // 2
        return F.pad(x, (0, 0, 0, 0, half, self.extra_channels - half))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """The 6n+2-layer CIFAR ResNet: a 3x3 stem, three stages of n blocks (16, 32, 64 channels at
    32x32, 16x16, 8x8), global average pooling and a linear classifier."""

    def __init__(self, blocks_per_stage: int, num_classes: int):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU(inplace=True)
        )
        layers, in_channels = [], 16
        for out_channels, stride in ((16, 1), (32, 2), (64, 2)):
            for index in range(blocks_per_stage):
                layers.append(
                    CifarBasicBlock(in_channels, out_channels, stride if index == 0 else 1)
                )
                in_channels = out_channels
        self.stages = nn.Sequential(*layers)
        self.classifier = nn.Linear(64, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        features = self.stages(self.stem(x))
        return self.classifier(features.mean(dim=(2, 3)))  # (N, 64, 8, 8) -> (N, 64)


def resnet20(num_classes: int) -> nn.Module:
    return CifarResNet(3, num_classes)


def resnet56(num_classes: int) -> nn.Module:
    return CifarResNet(9, num_classes)


def resnet18(num_classes: int) -> nn.Module:
    # ImageNet's 7x7 stride-2 stem and max-pool would shrink 32x32 inputs to 8x8 at once.
    model = torchvision.models.resnet18(num_classes=num_classes)
    model.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    model.maxpool = nn.Identity()
    return model


def mobilenetv2(num_classes: int) -> nn.Module:
    # torchvision's settings (expansion, channels, blocks, stride) with the second stage's
    # stride set to 1 and, below, a stride-1 stem: 32x32 ends at 4x4 instead of 1x1.
    settings = [
        [1, 16, 1, 1],
        [6, 24, 2, 1],
        [6, 32, 3, 2],
        [6, 64, 4, 2],
        [6, 96, 3, 1],
        [6, 160, 3, 2],
        [6, 320, 1, 1],
    ]
    model = torchvision.models.mobilenet_v2(
        num_classes=num_classes, inverted_residual_setting=settings
    )
    model.features[0][0].stride = (1, 1)
    return model


class TinyCNN(nn.Module):
    """Three conv-BN-ReLU-max-pool stages (32, 64, 128 channels) and a linear classifier:
    about 10 M multiply-adds per image, for students that train in minutes on a CPU."""

    def __init__(self, num_classes: int):
        super().__init__()
        layers, in_channels = [], 3
        for out_channels in (32, 64, 128):
            layers += [
                nn.Conv2d(in_channels, out_channels, 3, 1, 1, bias=False),
                nn.BatchNorm2d(out_channels),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            ]
            in_channels = out_channels
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(128, num_classes)

    def forward(self, x):
        return self.classifier(self.features(x).mean(dim=(2, 3)))  # (N, 128, 4, 4) -> (N, 128)


MODELS: Dict[str, Callable[[int], nn.Module]] = {
    "resnet18": resnet18,
    "resnet20": resnet20,
    "resnet56": resnet56,
    "mobilenetv2": mobilenetv2,
    "tinycnn": TinyCNN,
}


def build_model(name: str, num_classes: int) -> nn.Module:
    """A freshly initialised model from MODELS; an unknown `name` raises ValueError."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(sorted(MODELS))}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be at least 2, got {num_classes}")
    return MODELS[name](num_classes)


def count_parameters(model: nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters())
