"""Distillation losses of both papers and the usual baselines.

Feature losses take student features ``z_s`` and teacher features ``z_t`` as pooled (B, d) vectors,
token tensors (B, N, d; mean over the N tokens -- pass patch tokens only) or feature maps
(B, d, H, W; mean over H and W), and return a scalar.  Logit losses take (B, C) logits.
Every loss returns its unweighted value; weights live with the method (see ``vkd.distillers``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from .normalization import get_normalization
from .projectors import build_projector

DISTANCES = ("mse", "smooth_l1", "logsum")


def pool_features(z: torch.Tensor, expected_dim: int | None = None, name: str = "features") -> torch.Tensor:
    """(B, d) | (B, N, d) tokens | (B, d, H, W) maps -> (B, d); checks d against ``expected_dim``."""
    if z.dim() == 2:
        pooled = z
    elif z.dim() == 3:
        pooled = z.mean(1)
    elif z.dim() == 4:
        pooled = z.mean((2, 3))
    else:
        raise ValueError(
            f"{name}: expected (B, d), (B, N, d) or (B, d, H, W), got a {z.dim()}-d tensor of shape {tuple(z.shape)}"
        )
    if expected_dim is not None and pooled.shape[1] != expected_dim:
        layout = {2: "(B, d)", 3: "(B, N, d)", 4: "(B, d, H, W)"}[z.dim()]
        raise ValueError(
            f"{name}: expected feature width d={expected_dim}, got d={pooled.shape[1]} "
            f"(shape {tuple(z.shape)} read as {layout})"
        )
    return pooled


def mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean squared difference over all entries."""
    return F.mse_loss(a, b)


def smooth_l1(a: torch.Tensor, b: torch.Tensor, beta: float = 1.0) -> torch.Tensor:
    """Mean Huber/smooth-L1 over all entries (quadratic below ``beta``)."""
    return F.smooth_l1_loss(a, b, beta=beta)


def logsum(a: torch.Tensor, b: torch.Tensor, alpha: float = 4.0) -> torch.Tensor:
    """SRD's soft maximum: log Σ_i |a - b|_i^α over all entries (computed in float32)."""
    return (a.float() - b.float()).abs().pow(alpha).sum().log()


def get_distance(name: str, **options) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``name`` in DISTANCES as a function (a, b) -> scalar; ``options``: beta (smooth_l1), alpha (logsum)."""
    functions = {"mse": mse, "smooth_l1": smooth_l1, "logsum": logsum}
    if name not in functions:
        raise ValueError(f"unknown distance {name!r}; expected one of {DISTANCES}")
    return partial(functions[name], **options)


class VkDLoss(nn.Module):
    """VkD: distance(Z_s Pᵀ, norm(Z_t)) with P orthonormal (d_t x d_s); only the teacher is normalised."""

    def __init__(
        self,
        student_dim: int,
        teacher_dim: int,
        norm: str = "layernorm",
        distance: str = "smooth_l1",
        method: str = "stiefel",
        projector: str = "orthogonal",
        norm_options: dict | None = None,
        distance_options: dict | None = None,
        projector_options: dict | None = None,
    ):
        super().__init__()
        self.student_dim, self.teacher_dim = student_dim, teacher_dim
        options = dict(projector_options or {})
        if projector == "orthogonal":
            options.setdefault("method", method)
        self.projector = build_projector(projector, student_dim, teacher_dim, **options)
        self.norm = get_normalization(norm, **(norm_options or {}))
        self.distance = get_distance(distance, **(distance_options or {}))

    def forward(self, z_s: torch.Tensor, z_t: torch.Tensor) -> torch.Tensor:
        s = pool_features(z_s, self.student_dim, "VkDLoss student")
        t = pool_features(z_t, self.teacher_dim, "VkDLoss teacher")
        _check_batches(s, t)
        return self.distance(self.projector(s), self.norm(t.float()).to(s.dtype))


class SRDLoss(nn.Module):
    """SRD ("linear + BN + LogSum"), paper B.

    ``variant="elementwise"``: log Σ_{b,k} |BN(Z_s W)_{bk} - BN(Z_t)_{bk}|^α.
    ``variant="correlation"`` (the released DeiT code): c_k = mean_b BN(Z_s W)_{bk} BN(Z_t)_{bk},
    loss log(Σ_k |c_k - 1|^α + 1e-5).  BN: batch statistics, no affine, eps 1e-4.
    ``norm`` and ``distance`` swap the normalisation of both sides and the distance of the
    element-wise variant, for paper B's ablations (e.g. norm="none", distance="mse").
    """

    def __init__(
        self,
        student_dim: int,
        teacher_dim: int,
        alpha: float = 4.0,
        projector: str = "linear",
        variant: str = "elementwise",
        eps: float = 1e-4,
        projector_options: dict | None = None,
        norm: str = "batchnorm",
        distance: str = "logsum",
    ):
        super().__init__()
        if variant not in ("elementwise", "correlation"):
            raise ValueError(f"unknown SRD variant {variant!r}; expected 'elementwise' or 'correlation'")
        if variant == "correlation" and (norm, distance) != ("batchnorm", "logsum"):
            raise ValueError(f"the correlation variant is defined with batchnorm and logsum, got {norm!r}, "
                             f"{distance!r}")
        self.student_dim, self.teacher_dim = student_dim, teacher_dim
        self.alpha, self.variant = alpha, variant
        self.projector = build_projector(projector, student_dim, teacher_dim, **(projector_options or {}))
        self.norm = get_normalization(norm, **({"eps": eps} if norm in ("batchnorm", "layernorm") else {}))
        self.distance = get_distance(distance, **({"alpha": alpha} if distance == "logsum" else {}))

    def forward(self, z_s: torch.Tensor, z_t: torch.Tensor) -> torch.Tensor:
        s = pool_features(z_s, self.student_dim, "SRDLoss student")
        t = pool_features(z_t, self.teacher_dim, "SRDLoss teacher")
        _check_batches(s, t)
        s, t = self.norm(self.projector(s).float()), self.norm(t.float())
        if self.variant == "elementwise":
            return self.distance(s, t)
        correlation = (s * t).mean(0)
        return ((correlation - 1).abs().pow(self.alpha).sum() + 1e-5).log()


class FitNetLoss(nn.Module):
    """FitNet hint: MSE between a regressed student feature and the teacher feature.

    Maps (B, d, H, W) keep their layout, equal H, W required; the regressor is mdistiller's ConvReg
    (1x1 conv, BatchNorm, ReLU -- without the BatchNorm a hint weight of 100 drives the student into
    dead units).  Vectors and tokens are pooled to (B, d) and regressed by the conv's weight alone."""

    def __init__(self, student_dim: int, teacher_dim: int):
        super().__init__()
        self.student_dim, self.teacher_dim = student_dim, teacher_dim
        self.conv = nn.Conv2d(student_dim, teacher_dim, kernel_size=1, bias=False)
        self.regressor = nn.Sequential(self.conv, nn.BatchNorm2d(teacher_dim), nn.ReLU())

    def forward(self, z_s: torch.Tensor, z_t: torch.Tensor) -> torch.Tensor:
        if z_s.dim() == 4 and z_t.dim() == 4:
            if z_s.shape[1] != self.student_dim or z_t.shape[1] != self.teacher_dim:
                raise ValueError(
                    f"FitNetLoss: expected maps (B, {self.student_dim}, H, W) and (B, {self.teacher_dim}, H, W), "
                    f"got {tuple(z_s.shape)} and {tuple(z_t.shape)}"
                )
            if z_s.shape[0] != z_t.shape[0] or z_s.shape[2:] != z_t.shape[2:]:
                raise ValueError(
                    f"FitNetLoss: student and teacher maps must share batch and spatial size, "
                    f"got {tuple(z_s.shape)} and {tuple(z_t.shape)}"
                )
            return mse(self.regressor(z_s), z_t)
        s = pool_features(z_s, self.student_dim, "FitNetLoss student")
        t = pool_features(z_t, self.teacher_dim, "FitNetLoss teacher")
        _check_batches(s, t)
        return mse(F.linear(s, self.conv.weight.flatten(1)), t)


class KDLoss(nn.Module):
    """Hinton KD: T² · KL(softmax(t/T) ‖ softmax(s/T)), summed over classes, mean over the batch."""

    def __init__(self, temperature: float = 4.0):
        super().__init__()
        self.temperature = _checked_temperature(self, temperature)

    def forward(self, logits_s: torch.Tensor, logits_t: torch.Tensor) -> torch.Tensor:
        _check_logits(logits_s, logits_t)
        T = self.temperature
        log_p_s = F.log_softmax(logits_s.float() / T, dim=1)
        log_p_t = F.log_softmax(logits_t.float() / T, dim=1)
        return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * T * T


class DKDLoss(nn.Module):
    """Decoupled KD (Zhao et al., CVPR 2022): α·TCKD + β·NCKD, both scaled by T², mean over the batch.

    TCKD is the KL between the binary (target, non-target) distributions; NCKD the KL between the
    distributions over the non-target classes.  The warm-up of the original recipe is a weight
    schedule applied by the method, not part of the loss."""

    def __init__(self, alpha: float = 1.0, beta: float = 8.0, temperature: float = 4.0):
        super().__init__()
        self.alpha, self.beta, self.temperature = alpha, beta, _checked_temperature(self, temperature)

    def forward(self, logits_s: torch.Tensor, logits_t: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        _check_logits(logits_s, logits_t)
        if target.shape != logits_s.shape[:1]:
            raise ValueError(f"DKDLoss: expected targets of shape ({logits_s.shape[0]},), got {tuple(target.shape)}")
        T = self.temperature
        s, t = logits_s.float() / T, logits_t.float() / T
        # gather / scatter rather than boolean indexing, which would wait for the GPU at every step
        gt = torch.zeros_like(s, dtype=torch.bool).scatter_(1, target[:, None], True)
        p_s, p_t = s.softmax(1), t.softmax(1)
        binary_s = torch.stack([p_s.gather(1, target[:, None]).squeeze(1), p_s.masked_fill(gt, 0).sum(1)], 1)
        binary_t = torch.stack([p_t.gather(1, target[:, None]).squeeze(1), p_t.masked_fill(gt, 0).sum(1)], 1)
        tckd = F.kl_div(binary_s.clamp_min(1e-12).log(), binary_t, reduction="batchmean")
        masked_s = F.log_softmax(s.masked_fill(gt, -math.inf), 1).masked_fill(gt, 0)
        masked_t = F.log_softmax(t.masked_fill(gt, -math.inf), 1).masked_fill(gt, 0)
        nckd = F.kl_div(masked_s, masked_t, reduction="batchmean", log_target=True)
        return (self.alpha * tckd + self.beta * nckd) * T * T


def _check_batches(s: torch.Tensor, t: torch.Tensor) -> None:
    if s.shape[0] != t.shape[0]:
        raise ValueError(f"student and teacher batch sizes differ: {s.shape[0]} vs {t.shape[0]}")


def _checked_temperature(loss: nn.Module, temperature: float) -> float:
    if not temperature > 0:
        raise ValueError(f"{type(loss).__name__}: the softmax temperature must be positive, got {temperature}")
    return temperature


def _check_logits(logits_s: torch.Tensor, logits_t: torch.Tensor) -> None:
    if logits_s.dim() != 2 or logits_s.shape != logits_t.shape:
        raise ValueError(
            f"expected student and teacher logits of the same shape (B, C), got {tuple(logits_s.shape)} "
            f"and {tuple(logits_t.shape)}"
        )

