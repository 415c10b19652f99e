import math

import pytest
import torch
import torch.nn.functional as F

import vkd
from vkd.paths import project_root


def test_distances_by_hand():
    a, b = torch.tensor([[0.0, 2.0], [1.0, -3.0]]), torch.tensor([[0.5, 0.0], [1.0, 0.0]])
    d = a - b
    assert vkd.mse(a, b).item() == pytest.approx((d**2).mean().item())
    huber = torch.where(d.abs() < 1, 0.5 * d**2, d.abs() - 0.5).mean()
    assert vkd.smooth_l1(a, b).item() == pytest.approx(huber.item())
    assert vkd.logsum(a, b, alpha=4).item() == pytest.approx(math.log(0.5**4 + 2**4 + 3**4))
    with pytest.raises(ValueError, match="unknown distance"):
        vkd.get_distance("cosine")


def test_vkd_loss_equals_hand_computation():
    torch.manual_seed(0)
    loss = vkd.VkDLoss(16, 48)
    z_s, z_t = torch.randn(10, 16), torch.randn(10, 48) * 3 + 1
    p = loss.projector.weight.detach()
    projected = z_s @ p.T
    target = (z_t - z_t.mean(1, keepdim=True)) / torch.sqrt(z_t.var(1, unbiased=False, keepdim=True) + 1e-5)
    d = projected - target
    expected = torch.where(d.abs() < 1, 0.5 * d**2, d.abs() - 0.5).mean()
    assert loss(z_s, z_t).item() == pytest.approx(expected.item(), rel=1e-5)


def test_vkd_pools_tokens_and_maps():
    torch.manual_seed(0)
    loss = vkd.VkDLoss(8, 12, norm="whiten", distance="mse", method="cayley")
    tokens, maps = torch.randn(6, 5, 8), torch.randn(6, 12, 3, 3)
    assert loss(tokens, maps).item() == pytest.approx(loss(tokens.mean(1), maps.mean((2, 3))).item())


def test_srd_elementwise_and_correlation_by_hand():
    torch.manual_seed(0)
    z_s, z_t = torch.randn(32, 8), torch.randn(32, 20)

    def bn(x):
        return (x - x.mean(0)) / torch.sqrt(x.var(0, unbiased=False) + 1e-4)

    loss = vkd.SRDLoss(8, 20, alpha=4.0)
    s, t = bn(loss.projector(z_s).detach()), bn(z_t)
    assert loss(z_s, z_t).item() == pytest.approx(torch.log(((s - t).abs() ** 4).sum()).item(), rel=1e-5)
    corr = vkd.SRDLoss(8, 20, variant="correlation")
    s = bn(corr.projector(z_s).detach())
    c = (s * t).mean(0)
    assert corr(z_s, z_t).item() == pytest.approx(torch.log(((c - 1).abs() ** 4).sum() + 1e-5).item(), rel=1e-5)
    assert vkd.SRDLoss(8, 20, projector="mlp", projector_options={"hidden": 32})(z_s, z_t).isfinite()


def test_kd_matches_formula():
    torch.manual_seed(0)
    s, t, T = torch.randn(5, 7), torch.randn(5, 7), 4.0
    p_t = F.softmax(t / T, 1)
    expected = (p_t * (p_t.log() - F.log_softmax(s / T, 1))).sum(1).mean() * T * T
    assert vkd.KDLoss(T)(s, t).item() == pytest.approx(expected.item(), rel=1e-5)
    assert vkd.KDLoss(T)(t, t).item() == pytest.approx(0.0, abs=1e-6)


def test_dkd_matches_published_formula():
    """DKD, Zhao et al. 2022, eq. (7): alpha * TCKD + beta * NCKD, as in their reference code."""
    torch.manual_seed(0)
    s, t, y = torch.randn(6, 5), torch.randn(6, 5), torch.tensor([0, 1, 2, 3, 4, 0])
    alpha, beta, T = 1.0, 8.0, 4.0
    expected = 0.0
    for i in range(6):
        ps, pt = F.softmax(s[i] / T, 0), F.softmax(t[i] / T, 0)
        bs = torch.stack([ps[y[i]], 1 - ps[y[i]]])
        bt = torch.stack([pt[y[i]], 1 - pt[y[i]]])
        tckd = (bt * (bt / bs).log()).sum()
        keep = torch.arange(5) != y[i]
        qs, qt = F.softmax(s[i][keep] / T, 0), F.softmax(t[i][keep] / T, 0)
        nckd = (qt * (qt / qs).log()).sum()
        expected += (alpha * tckd + beta * nckd) * T * T / 6
    assert vkd.DKDLoss(alpha, beta, T)(s, t, y).item() == pytest.approx(expected.item(), rel=1e-4)


def test_fitnet_maps_and_vectors():
    torch.manual_seed(0)
    loss = vkd.FitNetLoss(4, 6)
    z_s, z_t = torch.randn(2, 4, 3, 3), torch.randn(2, 6, 3, 3)
    w = loss.conv.weight.detach().flatten(1)
    regressed = torch.einsum("oc,bchw->bohw", w, z_s)
    mean, var = regressed.mean((0, 2, 3), keepdim=True), regressed.var((0, 2, 3), unbiased=False, keepdim=True)
    regressed = torch.relu((regressed - mean) / torch.sqrt(var + 1e-5))  # ConvReg: conv, BatchNorm, ReLU
    expected = ((regressed - z_t) ** 2).mean()
    assert loss(z_s, z_t).item() == pytest.approx(expected.item(), rel=1e-5)
    v_s, v_t = torch.randn(2, 4), torch.randn(2, 6)
    assert loss(v_s, v_t).item() == pytest.approx(((v_s @ w.T - v_t) ** 2).mean().item(), rel=1e-5)
    with pytest.raises(ValueError, match="share batch and spatial size"):
        loss(z_s, torch.randn(2, 6, 4, 4))


@pytest.mark.parametrize("cls", [vkd.VkDLoss, vkd.SRDLoss, vkd.FitNetLoss])
def test_feature_losses_name_expected_and_received_sizes(cls):
    loss = cls(16, 32)
    with pytest.raises(ValueError, match=r"student.*expected feature width d=16, got d=24"):
        loss(torch.randn(4, 24), torch.randn(4, 32))
    with pytest.raises(ValueError, match=r"teacher.*expected feature width d=32, got d=30.*\(B, d, H, W\)"):
        loss(torch.randn(4, 16), torch.randn(4, 30, 2, 2))
    with pytest.raises(ValueError, match="batch sizes differ: 4 vs 5"):
        loss(torch.randn(4, 16), torch.randn(5, 32))
    with pytest.raises(ValueError, match=r"expected \(B, d\), \(B, N, d\) or \(B, d, H, W\)"):
        loss(torch.randn(4), torch.randn(4, 32))


def test_logit_losses_reject_mismatched_logits():
    with pytest.raises(ValueError, match=r"same shape \(B, C\), got \(4, 10\) and \(4, 100\)"):
        vkd.KDLoss()(torch.randn(4, 10), torch.randn(4, 100))
    with pytest.raises(ValueError, match=r"targets of shape \(4,\)"):
        vkd.DKDLoss()(torch.randn(4, 10), torch.randn(4, 10), torch.zeros(3, dtype=torch.long))
    for make in (lambda: vkd.KDLoss(0), lambda: vkd.DKDLoss(temperature=-1)):  # would give NaN or a wrong sign
        with pytest.raises(ValueError, match="the softmax temperature must be positive"):
            make()


def test_srd_ablation_options():
    torch.manual_seed(0)
    z_s, z_t = torch.randn(16, 8), torch.randn(16, 12)
    plain = vkd.SRDLoss(8, 12, norm="none", distance="mse")
    assert plain(z_s, z_t).item() == pytest.approx(((plain.projector(z_s).detach() - z_t) ** 2).mean().item())
    l2 = vkd.SRDLoss(8, 12, norm="l2", distance="mse")
    s, t = F.normalize(l2.projector(z_s).detach(), dim=1), F.normalize(z_t, dim=1)
    assert l2(z_s, z_t).item() == pytest.approx(((s - t) ** 2).mean().item(), rel=1e-5)
    with pytest.raises(ValueError, match="correlation variant is defined with batchnorm and logsum"):
        vkd.SRDLoss(8, 12, variant="correlation", norm="l2")


def test_the_readmes_library_example_runs_as_written():
    # the README's first Python block, with a stand-in student (tokens of width 192) and teacher maps (3024 channels)
    readme = (project_root() / "README.md").read_text()
    example = readme.split("## Using the library", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    torch.manual_seed(0)
    student = torch.nn.Linear(16, 192)
    namespace = {"student": student, "student_tokens": student(torch.randn(4, 5, 16)),
                 "teacher_map": torch.randn(4, 3024, 2, 2)}
    before = student.weight.detach().clone()
    exec(example, namespace)
    loss_fn = namespace["loss_fn"]
    assert isinstance(loss_fn, vkd.VkDLoss) and torch.isfinite(namespace["loss"])
    assert not torch.equal(student.weight, before)  # the step trained the student through the VkD loss
    weight = loss_fn.projector.weight.detach()
    assert weight.shape == (3024, 192)
    assert (weight.T @ weight - torch.eye(192)).abs().max() < 1e-5
