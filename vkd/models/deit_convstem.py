"""DeiT students with a convolutional stem and a mean-of-patches distillation head (VkD's released student).

The released VkD DeiT replaces the 16 x 16 patchifying convolution by a stack of 3x3 stride-2
convolutions (BatchNorm, ReLU) and a 1x1 projection ("early convolutions", as in CivT / co-advise), and
instead of DeiT's learned distillation token it distils into a head on the mean of the patch tokens.
Both are built from timm's VisionTransformer: ``ConvStemPatchEmbed`` is a drop-in ``embed_layer``, and
``MeanPatchDistilledViT`` follows timm's distilled-DeiT interface (``set_distilled_training``; in
distilled training ``forward_head`` returns (class logits, distillation logits), otherwise their mean).
"""

from __future__ import annotations

import math

import torch
from timm.layers import PatchEmbed
from timm.models import register_model
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from .cifar_resnet import _build_checked


class ConvStemPatchEmbed(PatchEmbed):
    """(B, 3, H, W) -> (B, H/p · W/p, d): log2(p) 3x3 stride-2 convs with widths d/2^(k-1) ... d/2, d,
    each followed by BatchNorm and ReLU, then a 1x1 convolution (p = patch size, a power of two)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        patch, cin, dim = self.patch_size[0], self.proj.in_channels, self.proj.out_channels
        stages = int(math.log2(patch))
        if 2**stages != patch or self.patch_size[0] != self.patch_size[1]:
            raise ValueError(f"the conv stem needs a square power-of-two patch size, got {self.patch_size}")
        layers = []
        for k in range(stages):
            width = dim // 2 ** (stages - 1 - k)
            layers += [nn.Conv2d(cin, width, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
            cin = width
        self.proj = nn.Sequential(*layers, nn.Conv2d(cin, dim, 1))


class MeanPatchDistilledViT(VisionTransformer):
    """A ViT with a second head on the mean of its patch tokens, trained towards the teacher."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.head_dist = nn.Linear(self.embed_dim, self.num_classes) if self.num_classes > 0 else nn.Identity()
        self.distilled_training = False

    def set_distilled_training(self, enable: bool = True) -> None:
        self.distilled_training = enable

    def reset_classifier(self, num_classes: int, *args, **kwargs) -> None:
        super().reset_classifier(num_classes, *args, **kwargs)
        self.head_dist = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False):
        """x: tokens (B, 1 + N, d) -> pooled (B, d) with ``pre_logits``; else logits (B, classes), or the pair
        (class head on the class token, distillation head on the patch mean) in distilled training."""
        x = self.fc_norm(x)
        cls, patches = x[:, 0], x[:, self.num_prefix_tokens:].mean(1)
        if pre_logits:
            return (cls + patches) / 2
        logits, distill_logits = self.head(self.head_drop(cls)), self.head_dist(self.head_drop(patches))
        if self.distilled_training and self.training:
            return logits, distill_logits
        return (logits + distill_logits) / 2


def _convstem_deit(pretrained: bool, embed_dim: int, num_heads: int, **kwargs) -> MeanPatchDistilledViT:
    options = dict(img_size=224, patch_size=16, embed_dim=embed_dim, depth=12, num_heads=num_heads,
                   embed_layer=ConvStemPatchEmbed, global_pool="token", num_classes=1000)
    return _build_checked(MeanPatchDistilledViT, pretrained, **{**options, **kwargs})


@register_model
def deit_tiny_convstem_patch16_224(pretrained: bool = False, **kwargs) -> MeanPatchDistilledViT:
    """DeiT-Ti (192-d, 3 heads, 12 blocks) with a conv stem and a mean-of-patches distillation head."""
    return _convstem_deit(pretrained, 192, 3, **kwargs)


@register_model
def deit_small_convstem_patch16_224(pretrained: bool = False, **kwargs) -> MeanPatchDistilledViT:
    """DeiT-S (384-d, 6 heads, 12 blocks) with a conv stem and a mean-of-patches distillation head."""
    return _convstem_deit(pretrained, 384, 6, **kwargs)
