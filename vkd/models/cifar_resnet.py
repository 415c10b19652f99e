"""CIFAR ResNets of the CRD / mdistiller benchmark (resnet8 ... resnet110, resnet8x4, resnet32x4) and
wide ResNets (wrn_16_2, wrn_40_2), registered with timm: ``timm.create_model("resnet8x4", num_classes=100)``.

All models follow timm's interface: ``forward_features(x)`` -> last map (B, C, H, W),
``forward_head(map, pre_logits=True)`` -> pooled (B, C), ``num_features``, ``get_classifier()``."""

from __future__ import annotations

import torch
from timm.models import register_model
from torch import nn


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """conv-BN-ReLU-conv-BN plus a (1x1 conv + BN when the shape changes) shortcut, then ReLU."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1, self.bn1 = _conv3x3(cin, cout, stride), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = _conv3x3(cout, cout), nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + shortcut)


class WideBlock(nn.Module):
    """Pre-activation wide-ResNet block: BN-ReLU-conv-BN-ReLU-conv plus a 1x1-conv shortcut."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(cin), _conv3x3(cin, cout, stride)
        self.bn2, self.conv2 = nn.BatchNorm2d(cout), _conv3x3(cout, cout)
        self.relu = nn.ReLU(inplace=True)
        self.convShortcut = None if (stride == 1 and cin == cout) else nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.relu(self.bn1(x))
        shortcut = x if self.convShortcut is None else self.convShortcut(pre)
        out = self.conv1(pre)
        return self.conv2(self.relu(self.bn2(out))) + shortcut


class _Stage(nn.Module):
    def __init__(self, layers: list[nn.Module]):
        super().__init__()
        self.layer = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class PooledClassifier(nn.Module):
    """timm's head interface for a CNN whose ``forward_features`` gives a (B, num_features, H, W) map:
    global average pooling, then the linear classifier ``fc`` (the subclass sets ``num_features`` and ``fc``)."""

    num_features: int

    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Last map -> pooled features (B, num_features) if ``pre_logits`` else logits (B, num_classes)."""
        pooled = x.mean((2, 3))
        return pooled if pre_logits else self.fc(pooled)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


class CifarResNet(PooledClassifier):
    """Stem conv (3 -> widths[0]) then three stages of ``blocks`` blocks (widths[1:], strides 1, 2, 2).

    ``preact=True`` gives the wide ResNet (pre-activation blocks, BN-ReLU after the last stage).
    Parameter names follow mdistiller's CIFAR models (conv1, bn1, layer1-3 or block1-3, fc), so their
    released teacher checkpoints load as they are."""

    def __init__(self, blocks: int, widths: tuple[int, int, int, int], num_classes: int = 100,
                 preact: bool = False, in_chans: int = 3):
        super().__init__()
        block = WideBlock if preact else BasicBlock
        self.preact = preact
        self.conv1 = _conv3x3(in_chans, widths[0])
        cin = widths[0]
        for i, cout in enumerate(widths[1:]):
            layers = [block(cin if j == 0 else cout, cout, 2 if (i > 0 and j == 0) else 1) for j in range(blocks)]
            if preact:
                setattr(self, f"block{i + 1}", _Stage(layers))
            else:
                setattr(self, f"layer{i + 1}", nn.Sequential(*layers))
            cin = cout
        self.bn1 = nn.BatchNorm2d(cin if preact else widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.num_features = self.head_hidden_size = cin
        self.num_classes = num_classes
        self.fc = nn.Linear(cin, num_classes) if num_classes > 0 else nn.Identity()
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) images -> (B, num_features, H/4, W/4) last feature map."""
        x = self.conv1(x)
        if self.preact:
            return self.relu(self.bn1(self.block3(self.block2(self.block1(x)))))
        return self.layer3(self.layer2(self.layer1(self.relu(self.bn1(x)))))


def _build_checked(cls, pretrained: bool = False, **kwargs):
    """Instantiate one of vkd's models from timm's factory (whose pretrained-config options it drops)."""
    if pretrained:
        raise ValueError(
            f"no published weights are bundled for vkd's {cls.__name__} models; train one (e.g. a teacher with "
            "notebook 01) or load a checkpoint with vkd.checkpoints.load_weights(model, path)"
        )
    for timm_option in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
        kwargs.pop(timm_option, None)
    return cls(**kwargs)


def _build(blocks: int, widths: tuple, preact: bool = False, pretrained: bool = False, **kwargs) -> CifarResNet:
    return _build_checked(CifarResNet, pretrained, blocks=blocks, widths=widths, preact=preact, **kwargs)


# depth = 6 * blocks + 2
@register_model
def resnet8(pretrained: bool = False, **kwargs) -> CifarResNet:
    return _build(1, (16, 16, 32, 64), pretrained=pretrained, **kwargs)


@register_model
def resnet20(pretrained: bool = False, **kwargs) -> CifarResNet:
    return _build(3, (16, 16, 32, 64), pretrained=pretrained, **kwargs)


@register_model
def resnet56(pretrained: bool = False, **kwargs) -> CifarResNet:
    return _build(9, (16, 16, 32, 64), pretrained=pretrained, **kwargs)


@register_model
def resnet110(pretrained: bool = False, **kwargs) -> CifarResNet:
    return _build(18, (16, 16, 32, 64), pretrained=pretrained, **kwargs)


@register_model
def resnet8x4(pretrained: bool = False, **kwargs) -> CifarResNet:
    return _build(1, (32, 64, 128, 256), pretrained=pretrained, **kwargs)


@register_model
def resnet32x4(pretrained: bool = False, **kwargs) -> CifarResNet:
    return _build(5, (32, 64, 128, 256), pretrained=pretrained, **kwargs)


# wrn_{depth}_{k}: blocks = (depth - 4) / 6, widths 16, 16k, 32k, 64k
@register_model
def wrn_16_2(pretrained: bool = False, **kwargs) -> CifarResNet:
    return _build(2, (16, 32, 64, 128), preact=True, pretrained=pretrained, **kwargs)


@register_model
def wrn_40_2(pretrained: bool = False, **kwargs) -> CifarResNet:
    return _build(6, (16, 32, 64, 128), preact=True, pretrained=pretrained, **kwargs)
