"""CIFAR models and the conv-stem DeiT students (``deit_{tiny,small}_convstem_patch16_224``), registered
with timm (``import vkd``, then ``timm.create_model(name, num_classes=...)``).

Every model follows timm's interface: ``forward_features(x)`` gives the last feature map (B, C, H, W)
or, for transformers, the tokens (B, prefix + N, d); ``forward_head(features, pre_logits=True)`` the
pooled (B, C) feature; ``forward_head(features)`` the logits; ``num_features`` the feature width."""

import timm
import torch
from torch import nn

from . import cifar_mobilenet, cifar_resnet, cifar_vit, deit_convstem  # noqa: F401  (register them with timm)
from .cifar_resnet import CifarResNet

CIFAR_MODELS = ("resnet8", "resnet20", "resnet56", "resnet110", "resnet8x4", "resnet32x4", "wrn_16_2", "wrn_40_2",
                "mobilenetv2_cifar", "resnet50_cifar", "deit_tiny_patch4_32")


def check_model_names(*names: str | None) -> None:
    """Refuse (ValueError) a model name timm does not know (None: no model; ``hf-hub:`` names pass)."""
    for name in names:
        if name is not None and ":" not in name and not timm.is_model(name):
            raise ValueError(f"unknown model {name!r}: expected one of vkd's CIFAR models {', '.join(CIFAR_MODELS)}, "
                             "or another timm model name (timm.list_models())")


def distillation_features(model: nn.Module, features: torch.Tensor) -> torch.Tensor:
    """What feature losses see: a CNN's map as it is; a transformer's patch tokens (B, N, d), without
    its class / distillation tokens (the papers mean-pool the patch tokens)."""
    prefix = getattr(model, "num_prefix_tokens", 0)
    return features[:, prefix:] if features.dim() == 3 and prefix else features


__all__ = ["CIFAR_MODELS", "CifarResNet", "check_model_names", "distillation_features"]
