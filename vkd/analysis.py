"""Analyses of the projector and of the student: singular-value spectra, how far a gradient step moves an
orthogonal projector, input-output correlation,
linear CKA, nearest-neighbour class separation and t-SNE of feature spaces, loss surfaces along random
filter-normalised directions, attention maps and rollout, translational equivariance.

Measures the papers leave undefined are defined here and named in each function's docstring.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from .extras import optional_import
from .projectors import OrthogonalProjector, retract_


def singular_values(weight: torch.Tensor) -> torch.Tensor:
    """Singular values of a (out x in) matrix, descending (float64 on CPU)."""
    return torch.linalg.svdvals(weight.detach().double().cpu())


def effective_rank(values: torch.Tensor) -> float:
    """exp(entropy of the normalised singular values) (Roy & Vetterli, 2007): d for a flat spectrum, 1 for rank one."""
    p = values / values.sum()
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def projector_step(projector: OrthogonalProjector, gradient: torch.Tensor, lr: float = 1e-7) -> dict[str, float]:
    """How far one plain gradient step (no momentum, no weight decay) on the free parameters moves P.

    ``gradient`` (d_t x d_s) is dL/dP of the loss L = <P, gradient>.  The step is taken in float64 on a copy,
    from the state ``retract_`` leaves between the engine's steps.  Returns ``gain`` = ‖ΔP‖ / (lr·‖R‖) and
    ``alignment`` = cos(ΔP, -R), with R = G - P·sym(PᵀG) the gradient on the Stiefel manifold (embedded metric).
    The parametrisations give the same set of P but not the same steps: for a square P, "stiefel" (QR) moves
    P by exactly 2·lr·R and "cayley" by 4·lr·R, so at one learning rate they train P at different speeds."""
    if not isinstance(projector, OrthogonalProjector):
        raise TypeError(f"projector_step measures an OrthogonalProjector's step on the Stiefel manifold, got "
                        f"{type(projector).__name__}")
    if gradient.shape != (projector.out_dim, projector.in_dim):
        raise ValueError(f"projector_step: expected a gradient of P's shape ({projector.out_dim}, {projector.in_dim}), "
                         f"got {tuple(gradient.shape)}")
    model = copy.deepcopy(projector).double()
    retract_(model)
    start = model.weight.detach()
    g = gradient.detach().to(start)
    parameters = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad((model.weight * g).sum(), parameters)
    with torch.no_grad():
        for parameter, grad in zip(parameters, grads, strict=True):
            parameter.sub_(lr * grad)
        step = (model.weight - start) / lr
    inner = start.mT @ g
    riemannian = g - start @ ((inner + inner.mT) / 2)
    return {"gain": float(step.norm() / riemannian.norm()),
            "alignment": float(-(step * riemannian).sum() / (step.norm() * riemannian.norm()))}


def _standardise(x: torch.Tensor) -> torch.Tensor:
    x = x.detach().double()
    x = x - x.mean(0)
    return x / x.std(0, unbiased=False).clamp_min(1e-12)


def matched_correlation(inputs: torch.Tensor, outputs: torch.Tensor) -> float:
    """Mean |Pearson correlation| between input dimension i and output dimension i, i < min(d_in, d_out).

    (B, d_in), (B, d_out) -> a number in [0, 1]: 1 for an identity projector, ≈ sqrt(2/(πB)) for
    independent noise.  Paper B's figure 3 does not define its measure; this is our reading of
    "input-output correlation" of a projector (see also ``linear_cka``)."""
    d = min(inputs.shape[1], outputs.shape[1])
    a, b = _standardise(inputs[:, :d]), _standardise(outputs[:, :d])
    return float((a * b).mean(0).abs().mean())


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear centred kernel alignment (Kornblith et al., 2019) of (B, d_x) and (B, d_y) features.

    ‖Yᵀ X‖_F² / (‖Xᵀ X‖_F ‖Yᵀ Y‖_F) on batch-centred features: 1 for identical or orthogonally
    transformed / isotropically scaled features, near 0 for independent ones."""
    x = x.detach().double()
    y = y.detach().double()
    x, y = x - x.mean(0), y - y.mean(0)
    cross = (y.T @ x).square().sum()
    return float(cross / ((x.T @ x).square().sum().sqrt() * (y.T @ y).square().sum().sqrt()))


CORRELATIONS = {"matched": matched_correlation, "cka": linear_cka}


def knn_accuracy(features: torch.Tensor, labels: torch.Tensor, k: int = 5) -> float:
    """Leave-one-out k-nearest-neighbour accuracy (%) of (B, d) features with (B,) class labels:
    each sample takes the majority class of its k nearest others (Euclidean; a tie goes to the lowest
    class index).  How well the classes separate in a feature space; unchanged by an orthogonal
    projection or an isotropic scaling of the features."""
    if not 0 < k < len(labels):
        raise ValueError(f"k must be in [1, {len(labels) - 1}] for {len(labels)} samples, got {k}")
    x = features.detach().double().cpu()
    labels = labels.cpu()
    distances = torch.cdist(x, x).fill_diagonal_(float("inf"))
    neighbours = labels[distances.topk(k, largest=False).indices]
    votes = torch.nn.functional.one_hot(neighbours, int(labels.max()) + 1).sum(1)
    return float((votes.argmax(1) == labels).double().mean() * 100)


def tsne(features: torch.Tensor, seed: int = 0, perplexity: float = 30.0) -> torch.Tensor:
    """2-d t-SNE embedding (scikit-learn, PCA initialisation) of (B, d) features -> (B, 2); the same
    ``seed`` gives the same embedding.  The perplexity is capped at (B - 1) / 3 for small batches."""
    TSNE = optional_import("sklearn.manifold", "notebooks").TSNE
    x = features.detach().double().cpu().numpy()
    embedding = TSNE(2, perplexity=min(perplexity, (len(x) - 1) / 3), init="pca", random_state=seed).fit_transform(x)
    return torch.from_numpy(embedding)


def filter_normalised_direction(module: nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    """A random direction in the weight space of ``module``'s trainable parameters, filter-normalised
    (Li et al., 2018): a Gaussian tensor per weight of 2 or more dimensions whose every slice along
    dim 0 (a filter, an output unit) has the norm of that slice of the weight; zeros for 1-d parameters
    (biases, normalisation scales).  {parameter name: tensor of its shape}; the same seed, the same draw."""
    generator = torch.Generator().manual_seed(seed)
    direction = {}
    for name, weight in module.named_parameters():
        if not weight.requires_grad:
            continue
        if weight.dim() < 2:
            direction[name] = torch.zeros_like(weight)
            continue
        draw = torch.randn(weight.shape, generator=generator, dtype=weight.dtype).to(weight.device)
        scale = weight.detach().flatten(1).norm(dim=1) / draw.flatten(1).norm(dim=1).clamp_min(1e-12)
        direction[name] = draw * scale.view(-1, *[1] * (weight.dim() - 1))
    return direction


@torch.no_grad()
def loss_surface(module: nn.Module, loss, directions: tuple[dict, dict], radius: float = 1.0,
                 steps: int = 21) -> dict[str, torch.Tensor]:
    """Losses around ``module``'s weights θ: ``loss(module)`` -> {term: scalar} evaluated at
    θ + a·d₁ + b·d₂ for a, b on ``steps`` points of [-radius, radius] -> {term: (steps, steps) grid,
    rows a, columns b} (float64).  The weights are restored afterwards, also on error."""
    parameters = dict(module.named_parameters())
    origin = {name: parameters[name].detach().clone() for name in directions[0]}
    offsets = torch.linspace(-radius, radius, steps)
    grids: dict[str, torch.Tensor] = {}
    try:
        for i, a in enumerate(offsets):
            for j, b in enumerate(offsets):
                for name, weight in origin.items():
                    parameters[name].copy_(weight + a * directions[0][name] + b * directions[1][name])
                for term, value in loss(module).items():
                    grids.setdefault(term, torch.zeros(steps, steps, dtype=torch.float64))[i, j] = float(value)
    finally:
        for name, weight in origin.items():
            parameters[name].copy_(weight)
    return grids


def relative_rise(grid: torch.Tensor) -> float:
    """How steeply a loss surface (from :func:`loss_surface`) rises away from its centre: the mean loss
    on the grid's border minus the loss at the centre, over the loss at the centre (0 for a flat surface)."""
    centre = grid[grid.shape[0] // 2, grid.shape[1] // 2]
    border = torch.cat([grid[0], grid[-1], grid[1:-1, 0], grid[1:-1, -1]])
    return float((border.mean() - centre) / centre.abs())


def attention_maps(model: nn.Module, images: torch.Tensor) -> list[torch.Tensor]:
    """Attention probabilities of every block of a timm ViT: a list of (B, heads, T, T), T = prefix + patches.

    timm's fused attention never forms the matrix, so this runs an evaluation copy of ``model`` with
    fused attention switched off and reads the probabilities at each block's ``attn_drop``."""
    probe = copy.deepcopy(model).eval()
    maps: list[torch.Tensor] = []
    hooks = []
    for block in probe.blocks:
        block.attn.fused_attn = False
        hooks.append(block.attn.attn_drop.register_forward_hook(lambda _m, args, _out: maps.append(args[0].detach())))
    try:
        with torch.no_grad():
            probe(images)
    finally:
        for hook in hooks:
            hook.remove()
    return maps


def attention_rollout(maps: list[torch.Tensor], residual: float = 0.5) -> torch.Tensor:
    """Attention rollout (Abnar & Zuidema, 2020): per layer, the head-mean attention mixed with the
    identity for the residual path, rows renormalised, multiplied from the first layer to the last.

    list of (B, heads, T, T) -> (B, T, T); identity attention gives the identity."""
    rollout = None
    for attention in maps:
        a = attention.mean(1)
        a = residual * torch.eye(a.shape[-1], dtype=a.dtype, device=a.device) + (1 - residual) * a
        a = a / a.sum(-1, keepdim=True)
        rollout = a if rollout is None else a @ rollout
    return rollout


def translation_equivariance(features, images: torch.Tensor, shift: int, cell: int) -> torch.Tensor:
    """µ_T = ‖φ(Tx) − T'φ(x)‖² / ‖φ(x)‖² per image (B,), on the region both maps cover.

    ``features``: images (B, 3, H, W) -> a grid (B, C, h, w) with one cell per ``cell`` pixels (a
    CNN map, or ViT patch tokens reshaped to their grid).  T shifts the image right by ``shift``
    cells (zero fill); T' shifts the grid by ``shift`` cells.  0 for a translation-equivariant φ."""
    moved = torch.zeros_like(images)
    moved[..., shift * cell:] = images[..., : images.shape[-1] - shift * cell]
    with torch.no_grad():
        reference, shifted = features(images), features(moved)
    expected = reference[..., : reference.shape[-1] - shift]
    observed = shifted[..., shift:]
    return (observed - expected).square().flatten(1).sum(1) / expected.square().flatten(1).sum(1)


def feature_grid(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The last features of ``model`` on its spatial grid, (B, C, h, w): a CNN's map as it is, a
    ViT's patch tokens (prefix tokens dropped) reshaped to the patch grid."""
    features = model.forward_features(images)
    if features.dim() == 4:
        return features
    tokens = features[:, getattr(model, "num_prefix_tokens", 0):]
    side = int(round(tokens.shape[1] ** 0.5))
    return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], side, side)


def cls_attention(maps: list[torch.Tensor], prefix: int = 1) -> torch.Tensor:
    """Last layer's attention from the class token to the patches, (B, heads, side, side)."""
    last = maps[-1][:, :, 0, prefix:]
    side = int(round(last.shape[-1] ** 0.5))
    return last.reshape(*last.shape[:2], side, side)


def rollout_cls_map(maps: list[torch.Tensor], prefix: int = 1) -> torch.Tensor:
    """Attention rollout from the class token to the patches, (B, side, side), each map summing to 1."""
    row = attention_rollout(maps)[:, 0, prefix:]
    row = row / row.sum(-1, keepdim=True)
    side = int(round(row.shape[-1] ** 0.5))
    return row.reshape(-1, side, side)
