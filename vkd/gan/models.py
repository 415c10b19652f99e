"""BigGAN-style class-conditional generator and projection discriminator for 32 x 32 images.

The layout of BigGAN's CIFAR architecture as DiffAugment trains it (``channels=256``: the paper-scale
networks; narrower for CPU runs): spectral normalisation on every layer of both networks, a shared
class embedding feeding conditional batch norm in the generator, residual up / down blocks, and a
projection discriminator  D(x, y) = wᵀh(x) + embed(y)ᵀh(x)  on the sum-pooled features h (B, C).

The discriminator also returns an embedding for distillation: h itself, or with ``head_dim`` > 0 a
linear regression head's (B, head_dim) map of it; VkD's orthogonal projector maps it to the teacher's width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm


def _conv(cin: int, cout: int, kernel: int = 3) -> nn.Module:
    return spectral_norm(nn.Conv2d(cin, cout, kernel, padding=kernel // 2))


def _linear(cin: int, cout: int, bias: bool = True) -> nn.Module:
    return spectral_norm(nn.Linear(cin, cout, bias=bias))


class ConditionalBatchNorm2d(nn.Module):
    """Batch norm without affine, then a gain (1 + γ(e)) and bias β(e) from a condition vector e (B, E)."""

    def __init__(self, channels: int, condition_dim: int):
        super().__init__()
        self.norm = nn.BatchNorm2d(channels, affine=False)
        self.gain = _linear(condition_dim, channels, bias=False)
        self.bias = _linear(condition_dim, channels, bias=False)

    def forward(self, x: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        gain = 1 + self.gain(condition)[:, :, None, None]
        return self.norm(x) * gain + self.bias(condition)[:, :, None, None]


class GeneratorBlock(nn.Module):
    """(B, cin, H, W) -> (B, cout, 2H, 2W): CBN-ReLU-up-conv-CBN-ReLU-conv plus an upsampled 1x1 shortcut."""

    def __init__(self, cin: int, cout: int, condition_dim: int):
        super().__init__()
        self.norm1, self.norm2 = ConditionalBatchNorm2d(cin, condition_dim), ConditionalBatchNorm2d(cout, condition_dim)
        self.conv1, self.conv2, self.shortcut = _conv(cin, cout), _conv(cout, cout), _conv(cin, cout, 1)

    def forward(self, x: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        h = F.interpolate(F.relu(self.norm1(x, condition)), scale_factor=2)
        h = self.conv2(F.relu(self.norm2(self.conv1(h), condition)))
        return h + self.shortcut(F.interpolate(x, scale_factor=2))


class Generator(nn.Module):
    """(z (B, z_dim), labels (B,)) -> images (B, 3, 32, 32) in [-1, 1].

    z is mapped to a 4 x 4 x ``channels`` grid, three residual blocks upsample it to 32 x 32; the
    condition of every block's batch norm is [shared class embedding, z]."""

    def __init__(self, num_classes: int, channels: int = 256, z_dim: int = 128, embed_dim: int = 128):
        super().__init__()
        self.z_dim, self.num_classes = z_dim, num_classes
        self.embed = nn.Embedding(num_classes, embed_dim)
        self.input = _linear(z_dim, channels * 4 * 4)
        self.blocks = nn.ModuleList(GeneratorBlock(channels, channels, embed_dim + z_dim) for _ in range(3))
        self.output = nn.Sequential(nn.BatchNorm2d(channels), nn.ReLU(), _conv(channels, 3), nn.Tanh())

    def forward(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if z.dim() != 2 or z.shape[1] != self.z_dim:
            raise ValueError(f"Generator expects z of shape (B, {self.z_dim}), got {tuple(z.shape)}")
        condition = torch.cat([self.embed(labels), z], dim=1)
        h = self.input(z).view(z.shape[0], -1, 4, 4)
        for block in self.blocks:
            h = block(h, condition)
        return self.output(h)


class DiscriminatorBlock(nn.Module):
    """(B, cin, H, W) -> (B, cout, H/2 or H, ...): [ReLU]-conv-ReLU-conv-[pool] plus a 1x1 shortcut.

    The first block of the network takes raw images, so it has no leading ReLU (``preactivation=False``)."""

    def __init__(self, cin: int, cout: int, downsample: bool, preactivation: bool = True):
        super().__init__()
        self.conv1, self.conv2 = _conv(cin, cout), _conv(cout, cout)
        self.shortcut = _conv(cin, cout, 1) if (cin != cout or downsample) else None
        self.downsample, self.preactivation = downsample, preactivation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv2(F.relu(self.conv1(F.relu(x) if self.preactivation else x)))
        if self.downsample:
            h = F.avg_pool2d(h, 2)
        skip = x
        if self.shortcut is not None:
            if self.preactivation:  # conv, then pool (BigGAN's order for inner blocks)
                skip = self.shortcut(x)
                skip = F.avg_pool2d(skip, 2) if self.downsample else skip
            else:
                skip = self.shortcut(F.avg_pool2d(x, 2) if self.downsample else x)
        return h + skip


class Discriminator(nn.Module):
    """(images (B, 3, 32, 32), labels (B,)) -> (logits (B,), embedding (B, head_dim or channels)).

    Blocks 32 -> 16 -> 8 -> 8 -> 8, ReLU and a sum over positions give h (B, ``channels``); the logit
    is the projection discriminator's; the embedding is h, or the regression head's map of it."""

    def __init__(self, num_classes: int, channels: int = 256, head_dim: int = 0):
        super().__init__()
        self.blocks = nn.Sequential(
            DiscriminatorBlock(3, channels, downsample=True, preactivation=False),
            DiscriminatorBlock(channels, channels, downsample=True),
            DiscriminatorBlock(channels, channels, downsample=False),
            DiscriminatorBlock(channels, channels, downsample=False),
        )
        self.linear = _linear(channels, 1)
        self.embed = spectral_norm(nn.Embedding(num_classes, channels))
        self.head = _linear(channels, head_dim) if head_dim else None

        self.embedding_dim = head_dim or channels

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = F.relu(self.blocks(images)).sum(dim=(2, 3))
        logits = self.linear(h).squeeze(1) + (self.embed(labels) * h).sum(1)
        return logits, (self.head(h) if self.head is not None else h)
