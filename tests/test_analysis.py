import math

import pytest
import timm
import torch
from torch import nn

from vkd import analysis
from vkd.projectors import LinearProjector, OrthogonalProjector


def test_singular_values_and_effective_rank_of_known_matrices():
    u = torch.linalg.qr(torch.randn(6, 6, dtype=torch.double))[0]
    v = torch.linalg.qr(torch.randn(4, 4, dtype=torch.double))[0]
    s = torch.tensor([4.0, 3.0, 2.0, 0.5], dtype=torch.double)
    weight = u[:, :4] @ torch.diag(s) @ v.T
    torch.testing.assert_close(analysis.singular_values(weight), s)
    assert analysis.effective_rank(torch.ones(5)) == pytest.approx(5.0)
    assert analysis.effective_rank(torch.tensor([1.0, 0, 0])) == pytest.approx(1.0)


def test_correlation_of_identity_and_of_noise():
    torch.manual_seed(0)
    x = torch.randn(4000, 32)
    assert analysis.matched_correlation(x, x) == pytest.approx(1.0)
    noise = analysis.matched_correlation(x, torch.randn(4000, 64))
    assert noise < 3 * math.sqrt(2 / (math.pi * 4000))
    assert analysis.linear_cka(x, x) == pytest.approx(1.0)
    assert analysis.linear_cka(x, torch.randn(4000, 64)) < 0.02


def test_linear_cka_invariances():
    torch.manual_seed(0)
    x, y = torch.randn(500, 16), torch.randn(500, 16) @ torch.randn(16, 24)
    q = torch.linalg.qr(torch.randn(24, 24))[0]
    base = analysis.linear_cka(x, y)
    assert analysis.linear_cka(x, 3.7 * y @ q) == pytest.approx(base, rel=1e-6)  # orthogonal + isotropic scale
    assert analysis.linear_cka(x + 5.0, y - 2.0) == pytest.approx(base, rel=1e-6)  # offsets are centred away
    assert analysis.linear_cka(y, x) == pytest.approx(base, rel=1e-9)  # symmetric


def test_rollout_of_identity_attention_is_identity():
    maps = [torch.eye(5).expand(2, 3, 5, 5) for _ in range(4)]
    torch.testing.assert_close(analysis.attention_rollout(maps), torch.eye(5).expand(2, 5, 5))
    uniform = [torch.full((1, 2, 4, 4), 0.25)]
    rollout = analysis.attention_rollout(uniform)
    torch.testing.assert_close(rollout.sum(-1), torch.ones(1, 4))


def test_attention_maps_of_a_timm_vit():
    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_patch4_32", num_classes=10, depth=2)
    maps = analysis.attention_maps(model, torch.randn(3, 3, 32, 32))
    assert len(maps) == 2 and maps[0].shape == (3, 3, 65, 65)
    torch.testing.assert_close(maps[0].sum(-1), torch.ones(3, 3, 65))
    assert all(b.attn.fused_attn == model.blocks[0].attn.fused_attn for b in model.blocks)  # model untouched


def test_translation_equivariance_zero_for_a_patchwise_conv_and_positive_with_positions():
    torch.manual_seed(0)
    patchify = nn.Conv2d(3, 8, kernel_size=4, stride=4)  # a 1x1 conv on the 4-pixel patch grid
    images = torch.randn(5, 3, 32, 32)
    mu = analysis.translation_equivariance(patchify, images, shift=1, cell=4)
    assert mu.shape == (5,) and mu.abs().max() < 1e-10
    position = torch.randn(1, 8, 8, 8)
    mu = analysis.translation_equivariance(lambda x: patchify(x) + position, images, shift=1, cell=4)
    assert (mu > 0.1).all()


def test_feature_grid_and_cls_maps_of_a_vit():
    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_patch4_32", num_classes=10, depth=1).eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        grid = analysis.feature_grid(model, images)
        tokens = model.forward_features(images)[:, 1:]
    assert grid.shape == (2, 192, 8, 8)
    torch.testing.assert_close(grid[:, :, 2, 3], tokens[:, 2 * 8 + 3])  # row-major patch order
    maps = analysis.attention_maps(model, images)
    assert analysis.cls_attention(maps).shape == (2, 3, 8, 8)
    rollout = analysis.rollout_cls_map(maps)
    torch.testing.assert_close(rollout.sum((1, 2)), torch.ones(2, dtype=rollout.dtype))


def test_knn_accuracy_by_hand_and_under_an_orthogonal_projection():
    points = torch.tensor([[0.0], [1.0], [2.0], [10.0], [11.0], [5.9]])
    labels = torch.tensor([0, 0, 0, 1, 1, 1])
    # 1-NN: 0->1, 1->0 or 2, 2->1, 10->11, 11->10, 5.9->2 (wrong): 5 of 6
    assert analysis.knn_accuracy(points, labels, k=1) == pytest.approx(500 / 6)
    torch.manual_seed(0)
    features, labels = torch.randn(300, 16), torch.randint(0, 3, (300,))
    features += 2 * nn.functional.one_hot(labels, 16).float()  # classes shifted apart along 3 axes
    projection = torch.linalg.qr(torch.randn(64, 16))[0]  # orthonormal columns: 16 -> 64
    accuracy = analysis.knn_accuracy(features, labels)
    assert 60 < accuracy < 100
    assert analysis.knn_accuracy(3 * features @ projection.T, labels) == pytest.approx(accuracy)
    with pytest.raises(ValueError, match="k must be"):
        analysis.knn_accuracy(features[:4], labels[:4], k=4)


def test_projector_step_equals_the_first_order_step_of_each_parametrisation():
    torch.manual_seed(0)
    square = torch.randn(16, 16, dtype=torch.float64)
    # a square P has no normal part: QR moves it by 2·lr·R, the Cayley map by 4·lr·R
    for method, gain in [("stiefel", 2.0), ("cayley", 4.0)]:
        step = analysis.projector_step(OrthogonalProjector(16, 16, method), square)
        assert step["gain"] == pytest.approx(gain, rel=1e-5) and step["alignment"] == pytest.approx(1, abs=1e-9)
    # 8 -> 32, by hand: the QR step is (I - PPᵀ)G + 2·P·skew(PᵀG), the manifold gradient (I - PPᵀ)G + P·skew(PᵀG)
    projector, g = OrthogonalProjector(8, 32), torch.randn(32, 8, dtype=torch.float64)
    p = projector.weight.detach().double()
    skew, normal = (p.T @ g - g.T @ p) / 2, g - p @ (p.T @ g)
    step, riemannian = normal + 2 * p @ skew, normal + p @ skew
    measured = analysis.projector_step(projector, g)
    assert measured["gain"] == pytest.approx((step.norm() / riemannian.norm()).item(), rel=1e-5)
    assert measured["alignment"] == pytest.approx(((step * riemannian).sum() / step.norm() / riemannian.norm()).item(),
                                                  rel=1e-6)
    assert projector.weight.detach().double().equal(p)  # measured on a copy
    with pytest.raises(ValueError, match=r"expected a gradient of P's shape \(32, 8\), got \(8, 32\)"):
        analysis.projector_step(projector, g.T)
    with pytest.raises(TypeError, match="an OrthogonalProjector's step on the Stiefel manifold, got LinearProjector"):
        analysis.projector_step(LinearProjector(8, 32), g)


def test_tsne_keeps_separated_clusters_apart_and_is_seeded():
    torch.manual_seed(0)
    labels = torch.arange(3).repeat_interleave(40)
    features = torch.randn(120, 50) + 20 * nn.functional.one_hot(labels, 50).float()
    embedding = analysis.tsne(features, seed=1)
    assert embedding.shape == (120, 2)
    assert analysis.knn_accuracy(embedding, labels) == 100.0
    torch.testing.assert_close(analysis.tsne(features, seed=1), embedding)


def test_filter_normalised_direction_matches_each_filter_norm():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Linear(5, 2))
    direction = analysis.filter_normalised_direction(model, seed=3)
    conv = model[0].weight.detach()
    torch.testing.assert_close(direction["0.weight"].flatten(1).norm(dim=1), conv.flatten(1).norm(dim=1))
    assert not direction["0.weight"].equal(conv)
    assert all(not direction[k].any() for k in ("0.bias", "1.weight", "1.bias", "2.bias"))
    torch.testing.assert_close(analysis.filter_normalised_direction(model, seed=3)["2.weight"], direction["2.weight"])


def test_loss_surface_of_a_quadratic_equals_its_closed_form_and_restores_the_weights():
    model = nn.Linear(3, 2, bias=False)
    weights = model.weight.detach().clone()
    d1, d2 = {"weight": torch.randn(2, 3)}, {"weight": torch.randn(2, 3)}
    grids = analysis.loss_surface(model, lambda m: {"square": m.weight.square().sum()}, (d1, d2), radius=2.0, steps=5)
    offsets = torch.linspace(-2, 2, 5)
    expected = torch.tensor([[(weights + a * d1["weight"] + b * d2["weight"]).square().sum() for b in offsets]
                             for a in offsets], dtype=torch.float64)
    torch.testing.assert_close(grids["square"], expected)
    assert torch.equal(model.weight, weights)
    bowl = offsets.square()[:, None] + offsets.square()[None, :] + 1.0  # centre 1, border mean 104 / 16 = 6.5
    assert analysis.relative_rise(bowl.double()) == pytest.approx(5.5)
