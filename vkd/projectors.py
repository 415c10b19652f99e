"""Projectors that map student features (..., d_s) to the teacher's width (..., d_t).

The orthogonal projector is the core of VkD: a matrix P (d_t x d_s) with orthonormal columns
(Pᵀ P = I), a point on the Stiefel manifold, so that the projected student keeps every pairwise
inner product of the student features.  Four exact parametrisations are offered:

``"stiefel"`` (default)
    P = W L⁻ᵀ with WᵀW = L Lᵀ (Cholesky), i.e. P is the Q factor of the QR decomposition of a free
    W (d_t x d_s) -- the QR retraction.  The forward pass never forms P: it computes (x L⁻¹) Wᵀ, so
    the only extra work over a linear layer is the Gram matrix WᵀW (cost d_t·d_s²)
    and d_s x d_s triangular algebra.
``"exp"``
    The paper's recipe: P = matrix_exp(A - Aᵀ)[:, :d_s] of a free d_t x d_t matrix A, evaluated in
    float64 (float32 loses orthogonality beyond 1e-5 once A grows in training).  ``expm_columns``
    applies the exponential to the d_s columns only, at a cost of ~ n_terms·d_t²·d_s instead of the
    full exponential's ~ d_t³ (n_terms ≈ 23 at the paper's initialisation; it grows with ‖A - Aᵀ‖₂).
``"cayley"``
    The Cayley transform of the Stiefel manifold, P = (I - K/2)⁻¹ (I + K/2) X₀, with the skew
    K = C X₀ᵀ - X₀ Cᵀ of rank 2·d_s built from a free C (d_t x d_s) and a fixed orthonormal base
    point X₀.  Woodbury's identity reduces the d_t x d_t inverse to a 2·d_s x 2·d_s solve.
``"householder"``
    ``torch.nn.utils.parametrizations.orthogonal`` (a product of Householder reflections), the
    parametrisation of the authors' released code.

Every orthogonal projector exposes ``.weight`` (d_t x d_s) with weightᵀ·weight = I.  A map with
orthonormal columns cannot reduce the width, so ``in_dim > out_dim`` raises ``ValueError``.

``"stiefel"`` and ``"cayley"`` have redundant free parameters (W and W·T give the same P for any
upper-triangular T with positive diagonal; X₀ and C can be re-based).  Optimisers such as Adam
drift along those directions, which slowly worsens the conditioning of WᵀW and with it the
float32 rounding of P.  ``retract_(module)`` resets every orthogonal projector in ``module`` to the
canonical representative of the same P (W ← P; X₀ ← P, C ← 0) -- the outputs do not change.  The
vkd engine calls it after every optimiser step; call it likewise in your own loop.

``"householder"`` needs it too where the optimiser decays weights: torch's map multiplies P's columns by
the diagonal of its parameter (±1, not learnt) cast with ``.int()``, so one step of weight decay
(-1 → -0.99997) truncates it to 0 and P to zero -- the VkD term then no longer depends on the student.
``retract_`` puts the diagonal back to its signs.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrizations

ORTHOGONAL_METHODS = ("stiefel", "exp", "cayley", "householder")
PROJECTORS = ("linear", "mlp", "ensemble", "orthogonal")


def random_orthonormal(rows: int, cols: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """A Haar-random (rows x cols) matrix with orthonormal columns (rows >= cols)."""
    q, r = torch.linalg.qr(torch.randn(rows, cols, generator=generator))
    return q * torch.sign(torch.diagonal(r))


def spectral_norm_estimate(matrix: torch.Tensor, iterations: int = 8, vectors: int = 4) -> torch.Tensor:
    """A lower estimate of ‖matrix‖₂ (0-d tensor) by block power iteration on MᵀM from a fixed random start.

    Leaves the global random state alone.  For the skew matrices of the ``"exp"`` projector it comes within
    a few per cent of the true norm (d_t = 3024 at init: 1.574 vs 1.631)."""
    generator = torch.Generator(matrix.device).manual_seed(0)
    block = torch.randn(matrix.shape[1], vectors, generator=generator, device=matrix.device, dtype=matrix.dtype)
    for _ in range(iterations):
        block = matrix.mT @ (matrix @ block)
        block = block / torch.linalg.vector_norm(block, dim=0).clamp_min(torch.finfo(matrix.dtype).tiny)
    return torch.linalg.vector_norm(matrix @ block, dim=0).max()


def _taylor_plan(norm: float, unit_roundoff: float, max_step_norm: float = 10.0) -> tuple[int, int]:
    """(scaling steps s, Taylor terms m) for exp(S)·E = (exp(S/s))^s·E with ‖S‖₂ <= ``norm``: the fewest
    products s·m whose truncation error r^(m+1)/(m+1)! per step (r = norm/s, S normal) is below
    ``unit_roundoff``.  ``max_step_norm`` caps r, and with it the largest term (~e^r) and its rounding."""
    plans, fewest_steps = [], max(1, math.ceil(norm / max_step_norm))
    for steps in range(fewest_steps, fewest_steps + 8):
        r, terms, bound = norm / steps, 0, 1.0
        while True:
            terms += 1
            bound *= r / terms
            if terms + 1 >= 2 * r and bound * r / (terms + 1) <= unit_roundoff:
                break
        plans.append((steps * terms, steps, terms))
    _, steps, terms = min(plans)
    return steps, terms


@torch.compiler.disable  # sizes its series on the host: torch.compile runs it eagerly, between two graphs
def expm_columns(skew: torch.Tensor, cols: int) -> torch.Tensor:
    """matrix_exp(skew)[:, :cols] for a skew-symmetric (n x n) ``skew``, differentiable, as exact as matrix_exp.

    The truncated Taylor series with scaling, applied to the first ``cols`` columns of I (the "action" of
    the exponential, Al-Mohy & Higham 2011): ~ n_terms·n²·cols flops instead of ~ 15·n³.  A skew matrix is
    normal, so ‖Sᵏ‖₂ = ‖S‖₂ᵏ: once k + 1 >= 2‖S/s‖₂ each term at most halves the next, and a step stops when
    its term is below the dtype's rounding of the result (unit-norm columns).  ‖S‖₂ is estimated by power
    iteration (with a 1.25 margin; the stopping test keeps the series exact if it is still low).  Where the
    series would cost more than the full exponential (a large ‖S‖₂), this returns matrix_exp's columns."""
    n = skew.shape[0]
    if skew.shape != (n, n) or not 1 <= cols <= n:
        raise ValueError(f"expm_columns expects a square (n x n) matrix and 1 <= cols <= n, got shape "
                         f"{tuple(skew.shape)} and cols={cols}")
    with torch.no_grad():
        norm = 1.25 * spectral_norm_estimate(skew.detach()).item()
    if not math.isfinite(norm):  # a non-finite matrix gives non-finite columns, as matrix_exp does
        return torch.linalg.matrix_exp(skew)[:, :cols]
    unit_roundoff = torch.finfo(skew.dtype).eps / 2
    steps, terms = _taylor_plan(norm, unit_roundoff)
    if steps * terms * cols > 40 * n:  # CPU, float64, forward+backward: the two cost the same at ~40-45 n
        return torch.linalg.matrix_exp(skew)[:, :cols]
    scaled = skew / steps
    result = torch.eye(n, cols, dtype=skew.dtype, device=skew.device)
    tolerance = unit_roundoff * math.sqrt(cols)
    for _ in range(steps):
        term, total, k = result, result, 0
        while True:
            k += 1
            term = (scaled @ term) / k
            total = total + term
            if k >= terms and torch.linalg.vector_norm(term.detach()).item() <= tolerance:
                break
        result = total
    return result


def _at_least_float32(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.promote_types(t.dtype, torch.float32))


class _StiefelLinear(torch.autograd.Function):
    """y = x Pᵀ with P = W L⁻ᵀ, WᵀW = L Lᵀ, computed as (x L⁻¹) Wᵀ without forming P.

    The hand-written backward needs five (d_t x d_s x {B or d_s}) matmuls in all -- a linear layer
    needs three -- plus d_s x d_s algebra.  L⁻¹ is formed explicitly (d_s³/3 flops): with W kept
    well conditioned by ``retract_`` this is as accurate as triangular solves and avoids copies."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        chol, info = torch.linalg.cholesky_ex(weight.mT @ weight)
        # checked where it costs no device sync and no graph break (eager CPU); elsewhere a failure shows as NaN
        if chol.device.type == "cpu" and not torch.compiler.is_compiling() and info.item() != 0:
            raise FloatingPointError(
                "OrthogonalProjector('stiefel'): the free matrix lost full column rank "
                "(Cholesky of WᵀW failed); lower the learning rate of the projector."
            )
        eye = torch.eye(chol.shape[0], dtype=chol.dtype, device=chol.device)
        chol_inv = torch.linalg.solve_triangular(chol, eye, upper=False)
        z = x @ chol_inv
        ctx.save_for_backward(x, z, weight, chol_inv)
        return z @ weight.mT

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        with torch.autocast(grad_y.device.type, enabled=False):  # as the forward (compiled, it inherits its autocast)
            return _StiefelLinear._backward(ctx, grad_y)

    @staticmethod
    def _backward(ctx, grad_y: torch.Tensor):
        x, z, weight, chol_inv = ctx.saved_tensors
        grad_z = grad_y @ weight
        grad_x = grad_z @ chol_inv.mT
        # z = x L⁻¹ gives dL = -zᵀ dz L⁻ᵀ.  Cholesky backward (torch's formula): dG = ½ L⁻ᵀ (Φ + Φᵀ) L⁻¹
        # with Φ = tril(Lᵀ dL), diagonal halved; Lᵀ dL = -(z L)ᵀ dz L⁻ᵀ = -xᵀ dz L⁻ᵀ.
        phi = -((x.mT @ grad_z) @ chol_inv.mT).tril()
        phi.diagonal().mul_(0.5)
        grad_gram_x2 = chol_inv.mT @ (phi + phi.mT) @ chol_inv
        # G = WᵀW, dG symmetric  =>  dW = dyᵀ z + 2 W dG, in one fused matmul-add
        grad_weight = grad_y.mT @ z
        return grad_x, grad_weight.addmm_(weight, grad_gram_x2)


class LinearProjector(nn.Linear):
    """A plain linear map d_s -> d_t (bias off by default: a normalisation usually follows)."""

    def __init__(self, in_dim: int, out_dim: int, bias: bool = False):
        super().__init__(in_dim, out_dim, bias=bias)


class MLPProjector(nn.Sequential):
    """``layers`` linear layers, hidden width ``hidden``, BatchNorm + ReLU between them."""

    def __init__(self, in_dim: int, out_dim: int, hidden: int = 1024, layers: int = 2):
        if layers < 1:
            raise ValueError(f"MLPProjector needs layers >= 1, got {layers}")
        widths = [in_dim] + [hidden] * (layers - 1) + [out_dim]
        modules: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
            modules.append(nn.Linear(a, b))
            if i < layers - 1:
                modules += [nn.BatchNorm1d(b), nn.ReLU(inplace=True)]
        super().__init__(*modules)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2:  # BatchNorm1d wants (B, C): fold any leading dims into the batch
            return super().forward(x.reshape(-1, x.shape[-1])).reshape(*x.shape[:-1], -1)
        return super().forward(x)


class EnsembleProjector(nn.Module):
    """The mean of ``members`` independently initialised MLP projectors (Chen et al., 2022)."""

    def __init__(self, in_dim: int, out_dim: int, members: int = 3, hidden: int = 1024, layers: int = 2):
        super().__init__()
        self.members = nn.ModuleList(MLPProjector(in_dim, out_dim, hidden, layers) for _ in range(members))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([m(x) for m in self.members]).mean(0)


class OrthogonalProjector(nn.Module):
    """x (..., in_dim) -> x Pᵀ (..., out_dim) with P (out_dim x in_dim), PᵀP = I.

    ``method`` picks the parametrisation (see the module docstring); all start from a random
    orthonormal P except ``"exp"``, which follows the paper (a free matrix with nn.Linear's init).
    """

    def __init__(self, in_dim: int, out_dim: int, method: str = "stiefel"):
        super().__init__()
        if in_dim > out_dim:
            raise ValueError(
                f"OrthogonalProjector maps to a space at least as wide: expected in_dim <= out_dim, "
                f"got in_dim={in_dim}, out_dim={out_dim}. Use LinearProjector to reduce the width."
            )
        check_projector("orthogonal", method)
        self.in_dim, self.out_dim, self.method = in_dim, out_dim, method
        if method == "stiefel":
            self.free = nn.Parameter(random_orthonormal(out_dim, in_dim))
        elif method == "exp":
            self.free = nn.Parameter(torch.empty(out_dim, out_dim))
            nn.init.kaiming_uniform_(self.free, a=5**0.5)
        elif method == "cayley":
            self.free = nn.Parameter(torch.zeros(out_dim, in_dim))
            self.register_buffer("base", random_orthonormal(out_dim, in_dim))
        else:
            linear = nn.Linear(in_dim, out_dim, bias=False)
            with torch.no_grad():
                linear.weight.copy_(random_orthonormal(out_dim, in_dim))
            self.householder = parametrizations.orthogonal(linear, orthogonal_map="householder")

    def extra_repr(self) -> str:
        return f"in_dim={self.in_dim}, out_dim={self.out_dim}, method={self.method!r}"

    @property
    def weight(self) -> torch.Tensor:
        """P (out_dim x in_dim) with orthonormal columns."""
        if self.method == "stiefel":
            eye = torch.eye(self.in_dim, dtype=self.free.dtype, device=self.free.device)
            return _StiefelLinear.apply(eye, self.free).mT
        if self.method == "exp":
            skew = (self.free - self.free.mT).double()  # float32 expm drifts past 1e-5 once |A| grows
            return expm_columns(skew, self.in_dim).to(self.free.dtype)
        if self.method == "cayley":
            return self._cayley()
        return self.householder.weight

    def _cayley(self) -> torch.Tensor:
        # K = U J Uᵀ with U = [C, X₀] (d_t x 2k), J = [[0, I], [-I, 0]].
        # Cay(K) X₀ = 2 (I - K/2)⁻¹ X₀ - X₀ = X₀ + U (I - J UᵀU / 2)⁻¹ J Uᵀ X₀   (Woodbury)
        k, c, x0 = self.in_dim, self.free, self.base
        u = torch.cat([c, x0], dim=1)
        eye_k = torch.eye(k, dtype=c.dtype, device=c.device)
        zero_k = torch.zeros_like(eye_k)
        j = torch.cat([torch.cat([zero_k, eye_k], 1), torch.cat([-eye_k, zero_k], 1)], 0)
        system = torch.eye(2 * k, dtype=c.dtype, device=c.device) - 0.5 * j @ (u.mT @ u)
        rhs = j @ torch.cat([c.mT @ x0, eye_k], dim=0)
        return x0 + u @ torch.linalg.solve(system, rhs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_dim:
            raise ValueError(f"OrthogonalProjector expected inputs (..., {self.in_dim}), got {tuple(x.shape)}")
        # Autocast off: a Gram matrix or a matrix function in bf16 would cost orthogonality (1e-2 instead of
        # 1e-7). The output is float32 (float64 for double inputs); later ops autocast as usual.
        with torch.autocast(x.device.type, enabled=False):
            flat = _at_least_float32(x.reshape(-1, self.in_dim))
            if self.method == "stiefel":  # x Pᵀ = (x L⁻¹) Wᵀ, never forming P
                y = _StiefelLinear.apply(flat, _at_least_float32(self.free))
            else:
                y = F.linear(flat, self.weight.to(flat.dtype))
        return y.reshape(*x.shape[:-1], self.out_dim)


@torch.no_grad()
def retract_(module: nn.Module) -> None:
    """Re-express every orthogonal projector inside ``module`` by its canonical free parameters.

    P, and so every output, is unchanged; only the redundant directions are reset (see module doc), and
    for ``"householder"`` the ±1 diagonal of torch's parameter, which weight decay shrinks (see module doc)."""
    for sub in module.modules():
        if not isinstance(sub, OrthogonalProjector):
            continue
        if sub.method == "stiefel":
            sub.free.copy_(sub.weight.to(sub.free.dtype))
        elif sub.method == "cayley":
            sub.base.copy_(sub.weight.to(sub.free.dtype))
            sub.free.zero_()
        elif sub.method == "householder":
            signs = sub.householder.parametrizations.weight.original.diagonal()
            signs.copy_(signs.sign())


def check_projector(kind: str, method: str | None = None) -> None:
    """Refuse (ValueError) a projector ``kind`` not in PROJECTORS, or an orthogonal ``method`` not in
    ORTHOGONAL_METHODS, naming the choices."""
    if kind not in PROJECTORS:
        raise ValueError(f"unknown projector {kind!r}; expected one of {PROJECTORS}")
    if method is not None and method not in ORTHOGONAL_METHODS:
        raise ValueError(f"unknown orthogonal method {method!r}; expected one of {ORTHOGONAL_METHODS}")


def build_projector(kind: str, in_dim: int, out_dim: int, **options) -> nn.Module:
    """Factory: ``kind`` in PROJECTORS; ``options`` go to the class (hidden, layers, members, method)."""
    classes = {
        "linear": LinearProjector,
        "mlp": MLPProjector,
        "ensemble": EnsembleProjector,
        "orthogonal": OrthogonalProjector,
    }
    check_projector(kind)
    if not (in_dim >= 1 and out_dim >= 1):
        raise ValueError(f"a projector maps between feature widths of at least 1, got in_dim={in_dim}, "
                         f"out_dim={out_dim}")
    return classes[kind](in_dim, out_dim, **options)
