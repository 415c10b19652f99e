"""Evaluation of generated images: Fréchet distance to real images (torchmetrics' FrechetInceptionDistance)
and within-class spread (diversity).

``FID("inception", inception_weights=PATH)``: the standard Inception-v3 pool features (2048-d) with
TensorFlow-compatible resizing to 299 px, as KD-DLGAN and the paper report -- the only numbers comparable
to the paper's.  ``FID(embedding)``: the same distance in another feature space (an
:class:`~vkd.gan.features.ImageEmbedding`, e.g. a CIFAR classifier's pooled features) for machines
without the Inception weights; its values are on another scale and are labelled with the space's name.

The real statistics are accumulated once (:meth:`FID.add_real`); each call then scores a new set of
generated images against them.

FID mixes fidelity and diversity; :func:`class_spread` isolates the second -- the mean, over classes,
of the total variance of a class's embeddings -- so that a generator repeating one image per class
(spread ≈ 0) is told apart from a varied one; compare it with the real images' spread.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from ..checkpoints import existing_file
from ..extras import optional_import
from .features import ImageEmbedding

INCEPTION_WEIGHTS_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                         "weights-inception-2015-12-05-6726825d.pth")


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Generator images (B, 3, H, W) in [-1, 1] -> uint8 [0, 255], quantised as if saved to PNG."""
    return ((images.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


class FID:
    """Fréchet distance to a fixed real set in the feature space ``features``:
    "inception" (needs ``inception_weights``, a local file; empty: torch-fidelity downloads it) or an
    :class:`ImageEmbedding`."""

    def __init__(self, features: str | ImageEmbedding = "inception", inception_weights: str = "",
                 device: str | torch.device = "cpu"):
        FrechetInceptionDistance = optional_import("torchmetrics.image.fid", "gan").FrechetInceptionDistance
        if isinstance(features, ImageEmbedding):
            # torchmetrics hands a custom extractor its uint8 images as they are; ImageEmbedding takes uint8
            metric = FrechetInceptionDistance(feature=features, reset_real_features=False)
            self.feature_space = f"{features.name} ({features.num_features}-d), not comparable to Inception FID"
        elif features == "inception":
            optional_import("torch_fidelity", "gan")  # torchmetrics' Inception-v3 comes from it
            weights = None
            if inception_weights:
                weights = existing_file(inception_weights, what="Inception weights",
                                        missing_hint=f"download {INCEPTION_WEIGHTS_URL} and give its path")
            try:
                metric = FrechetInceptionDistance(
                    feature=2048, reset_real_features=False, antialias=False,
                    feature_extractor_weights_path=str(weights) if weights else None)
            except Exception as error:
                reason = f"({type(error).__name__}: {error})"
                if weights:  # the file is there but is not the weights
                    raise RuntimeError(f"could not load the Inception weights {weights} {reason}") from None
                raise FileNotFoundError(  # offline, torch-fidelity's download fails
                    f"no Inception weights: torch-fidelity could not download them {reason}; download "
                    f"{INCEPTION_WEIGHTS_URL} and pass it as inception_weights") from None
            self.feature_space = "Inception-v3 pool3 (2048-d)"
        else:
            raise ValueError(f"FID features must be 'inception' or an ImageEmbedding, got {features!r}")
        self.metric = metric.to(device)
        self.device = torch.device(device)

    def add_real(self, images: Iterable[torch.Tensor]) -> None:
        """Accumulate batches of real uint8 images (B, 3, H, W)."""
        for batch in images:
            self.metric.update(batch.to(self.device), real=True)

    def __call__(self, images: Iterable[torch.Tensor]) -> float:
        """The distance of these generated uint8 batches (B, 3, H, W) to the real set."""
        self.metric.reset()  # generated statistics only; the real ones are kept
        for batch in images:
            self.metric.update(batch.to(self.device), real=False)
        return float(self.metric.compute())


@torch.no_grad()
def class_spread(embedding: ImageEmbedding, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean over classes of tr(Cov(embedding(x) | class)): images (N, 3, H, W) uint8, labels (N,)."""
    features = torch.cat([embedding(batch) for batch in images.split(500)]).double()
    spreads = [torch.cov(features[labels == c].T).trace() for c in labels.unique() if (labels == c).sum() > 1]
    if not spreads:
        raise ValueError("class_spread needs at least two images of some class")
    return float(torch.stack(spreads).mean())
