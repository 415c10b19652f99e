"""Frozen image embeddings: the distillation teacher of the GAN's discriminator and the feature space of FID.

:class:`ImageEmbedding` wraps any frozen encoder as a map from generator-range images (B, 3, H, W) in
[-1, 1] to embeddings (B, d): it resizes (if the encoder wants another size) and normalises with the
encoder's mean / std.  Two sources:

``classifier_embedding``  a CIFAR classifier's pooled penultimate features (e.g. the committed
                          resnet32x4 teacher: 256-d), the offline default;
``clip_embedding``        CLIP ViT-B/32's image embedding (512-d; the paper's teacher) through open_clip,
                          from a local weights file.
"""

from __future__ import annotations

import timm
import torch
import torch.nn.functional as F
from torch import nn

from .. import data as vdata
from ..checkpoints import checked_file, load_weights
from ..models import check_model_names
from ..paths import resolve

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ImageEmbedding(nn.Module):
    """images (B, 3, H, W) in [-1, 1] (float) or [0, 255] (uint8) -> embeddings (B, num_features), frozen.

    ``size``: the encoder's input side in pixels (images are resized bilinearly when they differ)."""

    def __init__(self, encoder: nn.Module, num_features: int, mean, std, size: int | None = None, name: str = ""):
        super().__init__()
        self.encoder = encoder.eval().requires_grad_(False)
        self.num_features, self.size, self.name = num_features, size, name
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1))

    def train(self, mode: bool = True) -> ImageEmbedding:
        return super().train(False)  # frozen: batch norm keeps its running statistics

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"ImageEmbedding expects images (B, 3, H, W), got shape {tuple(images.shape)}")
        x = images.float() / 255 if images.dtype == torch.uint8 else (images.float() + 1) / 2
        if self.size is not None and x.shape[-1] != self.size:
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        return self.encoder((x - self.mean) / self.std).float()


def classifier_embedding(arch: str, checkpoint: str | None, sha256: str | None = None,
                         dataset: str = "cifar10-jpeg") -> ImageEmbedding:
    """The pooled penultimate features (B, num_features) of ``arch`` (timm name) with the weights of
    ``checkpoint`` (None: untrained, for benchmarks); ``dataset`` names the input normalisation it was
    trained with."""
    check_model_names(arch)
    model = timm.create_model(arch, num_classes=0)  # no classifier: forward ends at the pooled features
    if checkpoint is not None:
        load_weights(model, checkpoint, sha256, strict=False)  # the checkpoint's classifier is ignored
    mean, std = vdata.stats(dataset)
    weights = resolve(checkpoint).name if checkpoint is not None else "untrained"
    return ImageEmbedding(model, model.num_features, mean, std, name=f"{arch} ({weights}) pool")


def clip_embedding(weights: str, model_name: str = "ViT-B-32", sha256: str | None = None) -> ImageEmbedding:
    """CLIP's image embedding (ViT-B/32: 512-d, 224 px) from open_clip with a local weights file
    (its sha256 checked when given)."""
    try:
        import open_clip
    except ImportError:
        raise ImportError("the CLIP teacher needs open_clip: pip install open_clip_torch") from None
    path, _ = checked_file(weights, sha256, f"download open_clip's {model_name} weights (e.g. the 'openai' ones) on "
                                            f"a machine that is online and give their path", what="CLIP weights")
    model = open_clip.create_model(model_name, pretrained=str(path))
    visual = model.visual
    return ImageEmbedding(visual, visual.output_dim, CLIP_MEAN, CLIP_STD, size=visual.image_size[0],
                          name=f"CLIP {model_name} image embedding")
