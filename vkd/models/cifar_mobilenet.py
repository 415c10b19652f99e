"""CIFAR MobileNetV2 (the CRD / mdistiller "mobile_half": expansion 6, width 0.5, 1280-d features)
and the CIFAR ResNet-50 (bottleneck blocks [3, 4, 6, 3], 3x3 stem, 2048-d features), registered with timm."""

from __future__ import annotations

import torch
from timm.models import register_model
from torch import nn

from .cifar_resnet import PooledClassifier, _build_checked


def _conv_bn(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1, relu: bool = True) -> list:
    layers = [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    return layers + [nn.ReLU(inplace=True)] if relu else layers


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        hidden = cin * expand
        self.use_residual = stride == 1 and cin == cout
        self.conv = nn.Sequential(*_conv_bn(cin, hidden, 1), *_conv_bn(hidden, hidden, 3, stride, groups=hidden),
                                  *_conv_bn(hidden, cout, 1, relu=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_residual else self.conv(x)


class CifarMobileNetV2(PooledClassifier):
    SETTINGS = ((1, 16, 1, 1), (None, 24, 2, 1), (None, 32, 3, 2), (None, 64, 4, 2), (None, 96, 3, 1),
                (None, 160, 3, 2), (None, 320, 1, 1))  # (expansion, channels, blocks, stride)

    def __init__(self, num_classes: int = 100, expansion: int = 6, width: float = 0.5, in_chans: int = 3):
        super().__init__()
        cin = int(32 * width)
        self.conv1 = nn.Sequential(*_conv_bn(in_chans, cin, 3, 2))
        blocks = []
        for t, c, n, s in self.SETTINGS:
            cout = int(c * width)
            for i in range(n):
                blocks.append(InvertedResidual(cin, cout, s if i == 0 else 1, t or expansion))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.num_features = self.head_hidden_size = 1280
        self.conv2 = nn.Sequential(*_conv_bn(cin, self.num_features, 1))
        self.reset_classifier(num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, 32, 32) -> (B, 1280, 2, 2)."""
        return self.conv2(self.blocks(self.conv1(x)))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int = 1):
        super().__init__()
        cout = planes * self.expansion
        self.conv1, self.bn1 = nn.Conv2d(cin, planes, 1, bias=False), nn.BatchNorm2d(planes)
        self.conv2, self.bn2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False), nn.BatchNorm2d(planes)
        self.conv3, self.bn3 = nn.Conv2d(planes, cout, 1, bias=False), nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + self.shortcut(x))


class CifarResNet50(PooledClassifier):
    def __init__(self, num_classes: int = 100, in_chans: int = 3):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(in_chans, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64)
        cin, stages = 64, []
        for planes, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
            layers = []
            for i in range(blocks):
                layers.append(Bottleneck(cin, planes, stride if i == 0 else 1))
                cin = planes * Bottleneck.expansion
            stages.append(nn.Sequential(*layers))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.num_features = self.head_hidden_size = cin
        self.reset_classifier(num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, 32, 32) -> (B, 2048, 4, 4)."""
        x = torch.relu(self.bn1(self.conv1(x)))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


@register_model
def mobilenetv2_cifar(pretrained: bool = False, **kwargs) -> CifarMobileNetV2:
    return _build_checked(CifarMobileNetV2, pretrained, **kwargs)


@register_model
def resnet50_cifar(pretrained: bool = False, **kwargs) -> CifarResNet50:
    return _build_checked(CifarResNet50, pretrained, **kwargs)
