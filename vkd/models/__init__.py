"""CIFAR models registered with timm (import this package, then ``timm.create_model(name, num_classes=...)``)."""

from . import cifar_resnet  # noqa: F401  (registers the models with timm)
from .cifar_resnet import CifarResNet

CIFAR_MODELS = ("resnet8", "resnet20", "resnet56", "resnet110", "resnet8x4", "resnet32x4", "wrn_16_2", "wrn_40_2")

__all__ = ["CIFAR_MODELS", "CifarResNet"]
