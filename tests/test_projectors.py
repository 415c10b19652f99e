import re

import pytest
import torch
from torch import nn

import vkd
from vkd.projectors import ORTHOGONAL_METHODS, OrthogonalProjector, expm_columns

# "exp" forms a d_t x d_t matrix exponential and "householder" a d_s-step reflection product with a
# slow backward: both run at the smaller sizes to keep the suite fast.
SIZES = {
    "stiefel": [(192, 3024), (256, 256), (64, 128)],
    "cayley": [(192, 3024), (256, 256), (64, 128)],
    "householder": [(64, 512), (128, 128), (64, 128)],
    "exp": [(32, 256), (96, 96), (64, 128)],
}
CASES = [(m, s, t) for m in ORTHOGONAL_METHODS for (s, t) in SIZES[m]]


def orthogonality_error(p: vkd.OrthogonalProjector) -> float:
    w = p.weight.detach()
    return (w.mT @ w - torch.eye(w.shape[1])).abs().max().item()


@pytest.mark.parametrize("method,d_s,d_t", CASES)
def test_orthonormal_at_init(method, d_s, d_t):
    torch.manual_seed(0)
    p = vkd.OrthogonalProjector(d_s, d_t, method=method)
    assert p.weight.shape == (d_t, d_s)
    assert orthogonality_error(p) <= 1e-5
    x = torch.randn(7, d_s)
    torch.testing.assert_close(p(x), x @ p.weight.mT, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method,d_s,d_t", CASES)
@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_orthonormal_after_100_steps(method, d_s, d_t, optimizer):
    """Fit a random regression target, calling ``retract_`` after each step as the engine does, with weight
    decay on every parameter as the recipes have it (torch's "householder" map once turned it into P = 0)."""
    torch.manual_seed(1)
    p = vkd.OrthogonalProjector(d_s, d_t, method=method)
    x, target = torch.randn(64, d_s), torch.randn(64, d_t)
    opt = torch.optim.SGD(p.parameters(), lr=0.5, momentum=0.9, weight_decay=5e-4) if optimizer == "sgd" else (
        torch.optim.AdamW(p.parameters(), lr=1e-3, weight_decay=0.05))
    first = None
    for _ in range(100):
        loss = (p(x) - target).square().mean()
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
        vkd.retract_(p)
    assert loss.item() < first  # it learned something
    assert orthogonality_error(p) <= 1e-5
    torch.testing.assert_close(p(x), x @ p.weight.mT, atol=1e-4, rtol=1e-4)


def test_projection_preserves_gram_matrix():
    torch.manual_seed(0)
    x = torch.randn(32, 64)
    for method in ORTHOGONAL_METHODS:
        p = vkd.OrthogonalProjector(64, 100, method=method)
        y = p(x).detach()
        torch.testing.assert_close(y @ y.mT, x @ x.mT, atol=1e-4, rtol=1e-4)
    y = vkd.LinearProjector(64, 100)(x).detach()
    assert not torch.allclose(y @ y.mT, x @ x.mT, atol=1e-1)


def test_stiefel_matches_qr_factor():
    torch.manual_seed(0)
    p = vkd.OrthogonalProjector(48, 200)
    with torch.no_grad():
        p.free.copy_(torch.randn(200, 48))
    q, r = torch.linalg.qr(p.free.detach().double())
    q = q * torch.sign(torch.diagonal(r))
    torch.testing.assert_close(p.weight.detach().double(), q, atol=1e-5, rtol=0)


def test_exp_is_paper_recipe():
    torch.manual_seed(0)
    p = vkd.OrthogonalProjector(8, 20, method="exp")
    a = p.free.detach()
    torch.testing.assert_close(p.weight.detach(), torch.linalg.matrix_exp(a - a.T)[:, :8])


def _paper_free(n: int, scale: float) -> torch.Tensor:
    """The "exp" projector's free n x n matrix A at its init, times ``scale`` (training grows it), float64."""
    return (scale * OrthogonalProjector(1, n, method="exp").free.detach()).double()


@pytest.mark.parametrize("n,cols,scale", [(128, 32, 1.0), (96, 96, 3.0), (160, 24, 20.0)])
def test_expm_columns_equals_matrix_exp_and_its_gradient(n, cols, scale, monkeypatch):
    """The Taylor action (one scaling step at init, several at scale 20: ‖S‖₂ ≈ 30) against torch's full
    exponential, values and gradients, in float64."""
    torch.manual_seed(0)
    free = _paper_free(n, scale).requires_grad_()
    weights = torch.randn(n, cols, dtype=torch.float64)
    reference = torch.linalg.matrix_exp(free - free.mT)[:, :cols]
    (reference_grad,) = torch.autograd.grad((reference * weights).sum(), free)

    def refuse(_):
        raise AssertionError("expm_columns fell back to the full exponential")

    monkeypatch.setattr(torch.linalg, "matrix_exp", refuse)
    state = torch.get_rng_state()
    columns = expm_columns(free - free.mT, cols)
    assert torch.equal(torch.get_rng_state(), state)  # the norm estimate draws from its own generator
    torch.testing.assert_close(columns, reference, atol=1e-12, rtol=0)
    (grad,) = torch.autograd.grad((columns * weights).sum(), free)
    torch.testing.assert_close(grad, reference_grad, atol=1e-10, rtol=1e-10)


def test_expm_columns_falls_back_where_the_series_costs_more(monkeypatch):
    torch.manual_seed(0)
    free = _paper_free(64, 200.0)  # ‖A - Aᵀ‖₂ ≈ 300: dozens of scaling steps
    skew = free - free.mT
    calls = []
    full = torch.linalg.matrix_exp
    monkeypatch.setattr(torch.linalg, "matrix_exp", lambda m: calls.append(m.shape) or full(m))
    torch.testing.assert_close(expm_columns(skew, 32), full(skew)[:, :32], atol=0, rtol=0)
    assert calls == [(64, 64)]


def test_expm_columns_of_a_non_finite_matrix_is_non_finite():
    # as matrix_exp's: the engine then stops on the non-finite loss with its own message
    skew = torch.zeros(6, 6, dtype=torch.float64)
    skew[0, 1], skew[1, 0] = float("nan"), float("nan")
    assert expm_columns(skew, 3).isnan().any()


def test_expm_columns_refuses_bad_shapes():
    with pytest.raises(ValueError, match=r"square \(n x n\) matrix and 1 <= cols <= n, got shape \(4, 5\)"):
        expm_columns(torch.zeros(4, 5), 2)
    with pytest.raises(ValueError, match="cols=5"):
        expm_columns(torch.zeros(4, 4), 5)


def test_gradients_match_finite_differences():
    """Our parametrisations; "householder" is torch's own and tested there."""
    torch.manual_seed(0)
    for method in ("stiefel", "exp", "cayley"):
        p = vkd.OrthogonalProjector(4, 9, method=method).double()
        x = torch.randn(5, 4, dtype=torch.double, requires_grad=True)
        params = [q for q in p.parameters()]
        assert torch.autograd.gradcheck(lambda x_, *ps, p=p: p(x_), (x, *params), eps=1e-6, atol=1e-5), method


@pytest.mark.parametrize("method", ["stiefel", "cayley"])
def test_retract_keeps_function_and_conditions_free_parameters(method):
    torch.manual_seed(0)
    p = vkd.OrthogonalProjector(64, 512, method=method)
    opt = torch.optim.Adam(p.parameters(), lr=1e-2)
    x, target = torch.randn(128, 64), torch.randn(128, 512)
    for _ in range(50):
        opt.zero_grad()
        (p(x) - target).square().mean().backward()
        opt.step()
    before = p(x).detach()
    vkd.retract_(nn.Sequential(p))
    torch.testing.assert_close(p(x).detach(), before, atol=1e-5, rtol=1e-5)
    if method == "stiefel":
        assert torch.linalg.cond(p.free.detach()).item() < 1 + 1e-4
    else:
        assert p.free.abs().max().item() == 0
    assert orthogonality_error(p) <= 1e-5


def test_tokens_and_leading_dims():
    p = vkd.OrthogonalProjector(16, 32)
    x = torch.randn(2, 5, 16)
    torch.testing.assert_close(p(x), x @ p.weight.mT, atol=1e-5, rtol=1e-5)


def test_bad_shapes_raise_clear_errors():
    with pytest.raises(ValueError, match=r"in_dim <= out_dim.*in_dim=64, out_dim=32"):
        vkd.OrthogonalProjector(64, 32)
    with pytest.raises(ValueError, match="unknown orthogonal method 'qr'"):
        vkd.OrthogonalProjector(4, 8, method="qr")
    with pytest.raises(ValueError, match=r"expected inputs \(\.\.\., 4\), got \(3, 5\)"):
        vkd.OrthogonalProjector(4, 8)(torch.randn(3, 5))
    with pytest.raises(ValueError, match="unknown projector"):
        vkd.build_projector("conv", 4, 8)
    with pytest.raises(ValueError, match="widths of at least 1, got in_dim=0, out_dim=8"):
        vkd.VkDLoss(0, 8)


def test_other_projectors_shapes():
    x = torch.randn(6, 16)
    assert vkd.build_projector("linear", 16, 40)(x).shape == (6, 40)
    mlp = vkd.build_projector("mlp", 16, 40, hidden=64, layers=3)
    assert mlp(x).shape == (6, 40)
    assert sum(isinstance(m, nn.Linear) for m in mlp) == 3
    assert mlp(torch.randn(2, 3, 16)).shape == (2, 3, 40)
    ens = vkd.build_projector("ensemble", 16, 40, members=4, hidden=32)
    assert ens(x).shape == (6, 40) and len(ens.members) == 4
    torch.testing.assert_close(ens(x), torch.stack([m(x) for m in ens.members]).mean(0))


def test_bench_reports_every_method_against_linear():
    from vkd.bench import bench_projectors

    table = bench_projectors([8], [16, 32], batch=4, reps=2)
    assert set(table.method) == {"linear", *ORTHOGONAL_METHODS}
    assert len(table) == 2 * (1 + len(ORTHOGONAL_METHODS))
    assert (table.loc[table.method == "linear", "ratio_to_linear"] == 1).all()
    assert (table.loc[table.method != "linear", "orthogonality_error"] <= 1e-5).all()
    # a training step also pays for retract_ (timed separately; nn.Linear has none)
    linear = table.method == "linear"
    assert (table.loc[linear, "retract_ms"] == 0).all() and (table.loc[~linear, "retract_ms"] > 0).all()
    expected = table.ratio_to_linear * (1 + table.retract_ms / table.ms)
    assert (table.step_ratio_to_linear - expected).abs().max() < 1e-9
    with pytest.raises(ValueError, match=re.escape("no student width [64] is at most a teacher width [16, 32]")):
        bench_projectors([64], [16, 32], batch=4, reps=2)  # before: an empty table


@pytest.mark.parametrize("method", ORTHOGONAL_METHODS)
def test_autocast_keeps_the_projection_exact(method):
    """Under bf16 autocast the projector still computes in float32 (a bf16 Gram would break PᵀP = I)."""
    torch.manual_seed(0)
    p = vkd.OrthogonalProjector(16, 48, method=method)
    x = torch.randn(8, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = p(x)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, x @ p.weight.mT, atol=1e-5, rtol=1e-5)


def test_stiefel_projector_compiled_under_bf16_autocast_has_the_eager_gradients():
    # the compiled backward of the hand-written Stiefel gradient once ran under the forward's autocast
    # and mixed bf16 with float32 (a crash on the GPU, reproduced here on the CPU)
    torch.manual_seed(0)
    projector = OrthogonalProjector(8, 16)
    x = torch.randn(4, 8)
    eager_x = x.clone().requires_grad_()
    projector(eager_x).square().sum().backward()
    eager_grads = (eager_x.grad.clone(), projector.free.grad.clone())
    projector.zero_grad()
    compiled_x = x.clone().requires_grad_()
    loss_of = torch.compile(lambda v: projector(v).square().sum(), backend="aot_eager")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = loss_of(compiled_x)
    loss.backward()
    torch.testing.assert_close(compiled_x.grad, eager_grads[0])
    torch.testing.assert_close(projector.free.grad, eager_grads[1])


def test_exp_projector_compiles_to_the_eager_result_without_graph_break_warnings(caplog):
    # expm_columns sizes its series on the host (.item()): compiled, it runs eagerly between two graphs
    torch.manual_seed(0)
    projector = OrthogonalProjector(8, 24, method="exp")
    x = torch.randn(4, 8)
    projector(x).square().sum().backward()
    eager_grad = projector.free.grad.clone()
    projector.zero_grad()
    torch._dynamo.reset()
    with caplog.at_level("WARNING"):
        loss = torch.compile(lambda v: projector(v).square().sum(), backend="aot_eager")(x)
    loss.backward()
    assert "Graph break" not in caplog.text
    torch.testing.assert_close(loss, projector(x).square().sum())
    torch.testing.assert_close(projector.free.grad, eager_grad)
