"""A DeiT-style vision transformer for 32 px images (patch 4 -> 64 tokens), built by timm."""

from __future__ import annotations

from timm.models import register_model
from timm.models.vision_transformer import VisionTransformer

from .cifar_resnet import _build_checked


@register_model
def deit_tiny_patch4_32(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """DeiT-Tiny widths (192-d, 3 heads) on 32x32 inputs; ``depth`` defaults to 12 and may be lowered."""
    options = dict(img_size=32, patch_size=4, embed_dim=192, depth=12, num_heads=3, num_classes=100)
    return _build_checked(VisionTransformer, pretrained, **{**options, **kwargs})
