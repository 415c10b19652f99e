"""DiffAugment (Zhao et al., 2020): differentiable augmentations applied to every image the
discriminator sees, real and generated, so it cannot memorise a small training set.

All functions take and return (B, 3, H, W) float images in [-1, 1] and draw from torch's global random
stream on the images' device (saved in the GAN checkpoints, so a resumed run draws the same).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

DIFFAUGMENT_POLICY = "color,translation,cutout"


def _uniform(x: torch.Tensor) -> torch.Tensor:
    return torch.rand(x.shape[0], 1, 1, 1, dtype=x.dtype, device=x.device)


def color(x: torch.Tensor) -> torch.Tensor:
    """Random brightness (±0.5), saturation (×[0, 2]) and contrast (×[0.5, 1.5]) per image."""
    x = x + (_uniform(x) - 0.5)
    mean = x.mean(dim=1, keepdim=True)
    x = (x - mean) * (_uniform(x) * 2) + mean
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * (_uniform(x) + 0.5) + mean


def translation(x: torch.Tensor, ratio: float = 0.125) -> torch.Tensor:
    """Shift each image by up to ``ratio`` of its size in each direction, filling with zeros."""
    b, _, h, w = x.shape
    sy, sx = int(h * ratio + 0.5), int(w * ratio + 0.5)
    dy = torch.randint(-sy, sy + 1, (b, 1, 1), device=x.device)
    dx = torch.randint(-sx, sx + 1, (b, 1, 1), device=x.device)
    rows = (torch.arange(h, device=x.device).view(1, h, 1) + dy + 1).clamp(0, h + 1)
    cols = (torch.arange(w, device=x.device).view(1, 1, w) + dx + 1).clamp(0, w + 1)
    padded = F.pad(x, (1, 1, 1, 1))  # the border of zeros that clamped indices read
    batch = torch.arange(b, device=x.device).view(b, 1, 1)
    return padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2)


def cutout(x: torch.Tensor, ratio: float = 0.5) -> torch.Tensor:
    """Zero a square of side ``ratio`` × size at a random centre of each image (clipped at the border)."""
    b, _, h, w = x.shape
    size_y, size_x = int(h * ratio + 0.5), int(w * ratio + 0.5)
    cy = torch.randint(0, h + (1 - size_y % 2), (b, 1, 1), device=x.device)
    cx = torch.randint(0, w + (1 - size_x % 2), (b, 1, 1), device=x.device)
    rows = torch.arange(h, device=x.device).view(1, h, 1) - cy + size_y // 2
    cols = torch.arange(w, device=x.device).view(1, 1, w) - cx + size_x // 2
    inside = (rows >= 0) & (rows < size_y) & (cols >= 0) & (cols < size_x)
    return x * (~inside).unsqueeze(1).to(x.dtype)


AUGMENTATIONS = {"color": color, "translation": translation, "cutout": cutout}


def diff_augment(x: torch.Tensor, policy: str = DIFFAUGMENT_POLICY) -> torch.Tensor:
    """Apply the comma-separated augmentations of ``policy`` in order ("" applies none)."""
    for name in filter(None, (part.strip() for part in policy.split(","))):
        if name not in AUGMENTATIONS:
            raise ValueError(f"unknown DiffAugment policy {name!r}; expected a comma-separated subset of "
                             f"{sorted(AUGMENTATIONS)}")
        x = AUGMENTATIONS[name](x)
    return x
