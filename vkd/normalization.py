"""Feature normalisations for distillation targets, all on (B, d) batches.

``none``       identity
``l2``         each sample scaled to unit Euclidean norm
``layernorm``  each sample standardised over its d features, no affine (VkD, discriminative tasks)
``batchnorm``  each feature standardised over the batch, no affine, batch statistics (SRD)
``whiten``     batch whitening (VkD, generative tasks): centre over the batch, then multiply by the
               inverse square root (``method="zca"``) or inverse Cholesky factor (``"cholesky"``)
               of the shrunk covariance Σ + eps·σ̄²·I, σ̄² = tr(Σ)/d (so eps is scale free).  Σ uses
               the biased 1/B estimator, so a whitened batch has covariance Σ (Σ + eps·σ̄²·I)⁻¹ ≈ I;
               eps > 0 keeps it finite when B < d.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F

NORMALIZATIONS = ("none", "l2", "layernorm", "batchnorm", "whiten")


def _check_batch(z: torch.Tensor, name: str) -> None:
    if z.dim() != 2:
        raise ValueError(f"{name} normalisation expects a (B, d) batch, got shape {tuple(z.shape)}")


def l2_normalize(z: torch.Tensor) -> torch.Tensor:
    """(B, d) -> (B, d), every row of unit L2 norm."""
    return F.normalize(z, dim=-1)


def layer_normalize(z: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """(..., d) -> (..., d), each sample zero-mean, unit-variance over its features (no affine)."""
    return F.layer_norm(z, z.shape[-1:], eps=eps)


def batch_normalize(z: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """(B, d) -> (B, d), each feature zero-mean, unit-variance over the batch (biased variance)."""
    _check_batch(z, "batchnorm")
    return F.batch_norm(z, None, None, training=True, eps=eps)


def whiten(z: torch.Tensor, eps: float = 1e-3, method: str = "zca") -> torch.Tensor:
    """(B, d) -> (B, d) with covariance Σ(Σ + eps·σ̄²·I)⁻¹ ≈ I; computed in float64, returned in z's dtype."""
    _check_batch(z, "whiten")
    if method not in ("zca", "cholesky"):
        raise ValueError(f"unknown whitening method {method!r}; expected 'zca' or 'cholesky'")
    x = z.double()
    x = x - x.mean(0, keepdim=True)
    cov = x.mT @ x / x.shape[0]
    shrink = eps * torch.diagonal(cov).mean().clamp_min(torch.finfo(x.dtype).tiny)
    cov = cov + shrink * torch.eye(x.shape[1], dtype=x.dtype, device=x.device)
    if method == "zca":
        evals, evecs = torch.linalg.eigh(cov)
        out = x @ (evecs * evals.rsqrt()) @ evecs.mT
    else:  # x L⁻ᵀ with cov = L Lᵀ
        out = torch.linalg.solve_triangular(torch.linalg.cholesky(cov).mT, x, upper=True, left=False)
    return out.to(z.dtype)


def get_normalization(name: str, **options) -> Callable[[torch.Tensor], torch.Tensor]:
    """The normalisation ``name`` (one of NORMALIZATIONS) as a function (B, d) -> (B, d).

    ``options`` bind its keyword arguments (``eps``; ``method`` for whiten)."""
    functions = {
        "none": lambda z: z,
        "l2": l2_normalize,
        "layernorm": layer_normalize,
        "batchnorm": batch_normalize,
        "whiten": whiten,
    }
    if name not in functions:
        raise ValueError(f"unknown normalisation {name!r}; expected one of {NORMALIZATIONS}")
    if options and name in ("none", "l2"):
        raise ValueError(f"normalisation {name!r} takes no options, got {sorted(options)}")
    return partial(functions[name], **options) if options else functions[name]
