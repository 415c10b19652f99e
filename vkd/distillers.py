"""Distillation methods as one module: student + frozen teacher + the loss terms of a method.

A :class:`Distiller` returns the student's logits and a dict of named, already weighted loss terms,
so the training loop sums them and logs each by name without knowing the method (mdistiller's
pattern).  The teacher stays in eval mode whatever ``train()`` is called with and is never optimised.

Methods (``METHODS``) and their terms, with the CRD / mdistiller CIFAR defaults:

=========  ==========================================================================
ce         cross-entropy only (the student alone)
kd         0.1·CE + 0.9·KD(T=4)
fitnet     CE + 100·FitNet hint on the last feature maps (1x1-conv regressor)
dkd        CE + warm-up(20 epochs)·DKD(α=1, β=8, T=4)
srd        CE + 1·SRD (MLP projector, hidden 1024, BatchNorm, LogSum α=4)
vkd        CE + 1·VkD (orthogonal projector, teacher layer norm, smooth-L1)
srd+dkd    CE + SRD + warm-up·DKD
=========  ==========================================================================
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .losses import DKDLoss, FitNetLoss, KDLoss, SRDLoss, VkDLoss, get_distance, pool_features
from .models import distillation_features
from .normalization import get_normalization
from .projectors import check_projector, retract_
from .settings import at_least, positive, wrong_settings

METHODS = ("ce", "kd", "fitnet", "dkd", "srd", "vkd", "srd+dkd")


@dataclass
class MethodConfig:
    """Weights and hyperparameters of the loss terms; ``for_method`` fills the method's defaults."""

    ce_weight: float = 1.0
    kd_weight: float = 0.0
    fitnet_weight: float = 0.0
    dkd_weight: float = 0.0
    srd_weight: float = 0.0
    vkd_weight: float = 0.0
    temperature: float = 4.0
    dkd_alpha: float = 1.0
    dkd_beta: float = 8.0
    dkd_warmup_epochs: int = 20
    srd_alpha: float = 4.0
    srd_projector: str = "mlp"
    srd_hidden: int = 1024
    srd_norm: str = "batchnorm"
    srd_distance: str = "logsum"
    vkd_norm: str = "layernorm"
    vkd_distance: str = "smooth_l1"
    vkd_method: str = "stiefel"
    vkd_projector: str = "orthogonal"  # or linear / mlp / ensemble, for VkD's projector ablation
    vkd_hidden: int = 1024  # hidden width of mlp / ensemble projectors

    def __post_init__(self):
        """Refuse, before anything trains, an option of the wrong type or outside its :meth:`limits` and an unknown
        normalisation, distance, projector or orthogonal method."""
        wrong = wrong_settings(self)
        if wrong:
            raise ValueError(f"method options: {'; '.join(wrong)}")
        for norm in (self.vkd_norm, self.srd_norm):
            get_normalization(norm)
        for distance in (self.vkd_distance, self.srd_distance):
            get_distance(distance)
        check_projector(self.srd_projector)
        check_projector(self.vkd_projector, self.vkd_method)

    def limits(self) -> list[tuple[str, bool, str]]:
        """``(option, whether its value is allowed, what it must be)`` for the options with a range."""
        return [*at_least(self, 0, "ce_weight", "kd_weight", "fitnet_weight", "dkd_weight", "srd_weight", "vkd_weight",
                          "dkd_alpha", "dkd_beta", "dkd_warmup_epochs", "srd_alpha"),
                *positive(self, "temperature"),
                *at_least(self, 1, "srd_hidden", "vkd_hidden")]

    @classmethod
    def for_method(cls, method: str, **overrides) -> MethodConfig:
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")
        defaults = {
            "ce": {},
            "kd": {"ce_weight": 0.1, "kd_weight": 0.9},
            "fitnet": {"fitnet_weight": 100.0},
            "dkd": {"dkd_weight": 1.0},
            "srd": {"srd_weight": 1.0},
            "vkd": {"vkd_weight": 1.0},
            "srd+dkd": {"srd_weight": 1.0, "dkd_weight": 1.0},
        }[method]
        unknown = sorted(set(overrides) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"unknown method option(s) {unknown}; expected some of {sorted(cls.__dataclass_fields__)}")
        return cls(**{**defaults, **overrides})

    @property
    def distils(self) -> bool:
        """Whether a loss term learns from a teacher (every method but the student alone)."""
        return any([self.kd_weight, self.fitnet_weight, self.dkd_weight, self.srd_weight, self.vkd_weight])


def method_of(entry: str) -> str:
    """The method of a ``methods`` entry: the entry itself (``"srd"``), or for a labelled variant of a method
    (``"srd@mse"``, trained with its own ``method_options`` next to the plain method) the part before "@"."""
    return entry.partition("@")[0]


def check_methods(methods: list[str], options: dict[str, dict] | None = None) -> None:
    """Refuse (ValueError), before anything trains, a ``methods`` list that is empty, repeats an entry or names
    a method not in METHODS, a variant ``"method@label"`` without a label or options of its own, and ``options``
    (entry -> MethodConfig overrides) for an entry not in ``methods`` or naming a field MethodConfig does not
    have. ``options=None`` says the caller takes no per-entry options, so it refuses every variant."""
    if not methods or len(set(methods)) != len(methods):
        raise ValueError(f"methods must list one or more distinct methods of {METHODS} (or variants "
                         f"'method@label'); got {methods}")
    given = options or {}
    stray = sorted(set(given) - set(methods))
    if stray:
        raise ValueError(f"method_options names {stray}, not among methods {methods}")
    for entry in methods:
        method = method_of(entry)
        if entry != method:  # a variant "method@label"
            if options is None:
                raise ValueError(f"methods entry {entry!r}: this notebook takes no method_options, so it runs no "
                                 f"variants of a method; expected one of {METHODS}")
            if not (entry[len(method) + 1:] and given.get(entry)):  # no label after the "@", or no options
                raise ValueError(f"methods entry {entry!r}: a variant of a method needs a label after '@' and its "
                                 "own method_options, e.g. methods [srd, srd@mse] with method_options "
                                 "{srd@mse: {srd_distance: mse}}")
        MethodConfig.for_method(method, **given.get(entry, {}))


class Distiller(nn.Module):
    """Student + optional frozen teacher + the loss modules that ``config`` switches on.

    ``forward(images, labels, epoch)`` -> (student logits (B, C), {term: weighted scalar loss}).
    ``labels`` are class indices (B,) or class probabilities (B, C) (mixup / cutmix, label smoothing).
    Teacher outputs may be passed in (``teacher_outputs=(features, logits)``, e.g. pooled from a cache)."""

    def __init__(self, student: nn.Module, teacher: nn.Module | None, config: MethodConfig):
        super().__init__()
        self.student, self.teacher, self.config = student, teacher, config
        c = config
        if c.distils and teacher is None:
            raise ValueError("this method distils from a teacher, but no teacher was given")
        if teacher is not None:
            teacher.requires_grad_(False)
            teacher.eval()
        if hasattr(student, "set_distilled_training"):  # DeiT⚗: class head and distillation head apart
            student.set_distilled_training(True)
        d_s = getattr(student, "num_features", None)
        d_t = getattr(teacher, "num_features", None)
        self.losses = nn.ModuleDict()
        if c.kd_weight:
            self.losses["kd"] = KDLoss(c.temperature)
        if c.dkd_weight:
            self.losses["dkd"] = DKDLoss(c.dkd_alpha, c.dkd_beta, c.temperature)
        if c.fitnet_weight:
            self.losses["fitnet"] = FitNetLoss(d_s, d_t)
        if c.srd_weight:
            options = {"hidden": c.srd_hidden} if c.srd_projector in ("mlp", "ensemble") else {}
            self.losses["srd"] = SRDLoss(d_s, d_t, c.srd_alpha, c.srd_projector, projector_options=options,
                                         norm=c.srd_norm, distance=c.srd_distance)
        if c.vkd_weight:
            if c.vkd_projector == "orthogonal" and d_s > d_t:
                raise ValueError(f"VkD's orthogonal projector cannot reduce the width: the student has {d_s} features, "
                                 f"the teacher {d_t}; distil from a teacher at least as wide, or set the method option "
                                 f"vkd_projector to 'linear'")
            options = {"hidden": c.vkd_hidden} if c.vkd_projector in ("mlp", "ensemble") else {}
            self.losses["vkd"] = VkDLoss(d_s, d_t, c.vkd_norm, c.vkd_distance, c.vkd_method, c.vkd_projector,
                                         projector_options=options)

    def train(self, mode: bool = True) -> Distiller:
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The student's and the loss modules' (projectors, regressors) parameters."""
        return [*self.student.parameters(), *self.losses.parameters()]

    @torch.no_grad()
    def teacher_outputs(self, images: torch.Tensor, pooled: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(features, logits (B, C)) of the frozen teacher; features are its last map (B, d_t, H, W) or
        patch tokens (B, N, d_t), or with ``pooled`` their mean (B, d_t)."""
        features = self.teacher.forward_features(images)
        logits = self.teacher.forward_head(features)
        features = distillation_features(self.teacher, features)
        return (pool_features(features) if pooled else features), logits

    def projector_io(self, images: torch.Tensor, loss: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Pooled student features (B, d_s) and their projection (B, d_t) by the projector of ``loss``."""
        features = distillation_features(self.student, self.student.forward_features(images))
        pooled = pool_features(features)
        return pooled, self.losses[loss].projector(pooled)

    def after_optimizer_step(self) -> None:
        """Keep orthogonal projectors well conditioned (outputs unchanged; see ``retract_``)."""
        retract_(self.losses)

    def forward(self, images: torch.Tensor, labels: torch.Tensor, epoch: int | torch.Tensor = 0,
                teacher_outputs: tuple[torch.Tensor, torch.Tensor] | None = None):
        c = self.config
        features = self.student.forward_features(images)
        heads = self.student.forward_head(features)
        # a distilled DeiT returns (class logits, distillation logits) in training; the logit losses
        # distil into the distillation head, cross-entropy trains the class head
        logits, distill_logits = heads if isinstance(heads, tuple) else (heads, heads)
        features = distillation_features(self.student, features)
        ce = F.cross_entropy(logits, labels)
        if isinstance(heads, tuple) and not {"kd", "dkd"} & set(self.losses):  # no teacher logits: both heads
            ce = (ce + F.cross_entropy(distill_logits, labels)) / 2  # learn the labels (every parameter trains)
        terms = {"ce": c.ce_weight * ce} if c.ce_weight else {}
        if not self.losses:
            return logits, terms
        t_features, t_logits = teacher_outputs if teacher_outputs is not None else self.teacher_outputs(images)
        if "kd" in self.losses:
            terms["kd"] = c.kd_weight * self.losses["kd"](distill_logits, t_logits)
        if "dkd" in self.losses:
            # epoch (0-based) may be a tensor, so that a compiled forward serves every epoch with one graph
            warmup = ((torch.as_tensor(epoch) + 1) / c.dkd_warmup_epochs).clamp(max=1.0) if c.dkd_warmup_epochs else 1.0
            terms["dkd"] = c.dkd_weight * warmup * self.losses["dkd"](distill_logits, t_logits, labels)
        for name in ("fitnet", "srd", "vkd"):
            if name in self.losses:
                terms[name] = getattr(c, f"{name}_weight") * self.losses[name](features, t_features)
        return logits, terms
