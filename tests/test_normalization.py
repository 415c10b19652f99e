import pytest
import torch

import vkd


def test_l2_and_layernorm():
    z = torch.randn(8, 20) * 3 + 1
    torch.testing.assert_close(vkd.l2_normalize(z).norm(dim=1), torch.ones(8))
    y = vkd.layer_normalize(z)
    torch.testing.assert_close(y.mean(1), torch.zeros(8), atol=1e-5, rtol=0)
    torch.testing.assert_close(y.var(1, unbiased=False), torch.ones(8), atol=1e-3, rtol=0)


def test_batchnorm_uses_batch_statistics_without_affine():
    z = torch.randn(64, 10) * 5 + 2
    y = vkd.batch_normalize(z, eps=1e-4)
    expected = (z - z.mean(0)) / torch.sqrt(z.var(0, unbiased=False) + 1e-4)
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", ["zca", "cholesky"])
@pytest.mark.parametrize("dim", [8, 64])
def test_whitened_covariance_is_identity(method, dim):
    torch.manual_seed(0)
    rotation = torch.linalg.qr(torch.randn(dim, dim))[0]
    mixing = torch.diag(torch.logspace(0, 1, dim)) @ rotation  # correlated, feature stds spanning 10x
    z = (torch.randn(2 * dim, dim) @ mixing + 4.0) * 30  # off-centre, large scale, batch = 2*dim
    y = vkd.whiten(z, eps=1e-6, method=method)
    y = y - y.mean(0)
    cov = y.mT @ y / y.shape[0]
    assert (cov - torch.eye(dim)).abs().max().item() <= 1e-3


def test_zca_is_symmetric_and_cholesky_is_triangular():
    torch.manual_seed(0)
    z = torch.randn(100, 5) @ torch.randn(5, 5)
    centred = (z - z.mean(0)).double()
    m_zca = torch.linalg.lstsq(centred, vkd.whiten(z, 1e-6, "zca").double()).solution
    m_chol = torch.linalg.lstsq(centred, vkd.whiten(z, 1e-6, "cholesky").double()).solution
    torch.testing.assert_close(m_zca, m_zca.T, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(m_chol, m_chol.triu(), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("method", ["zca", "cholesky"])
def test_whiten_is_finite_when_batch_smaller_than_dim(method):
    z = torch.randn(8, 64)
    y = vkd.whiten(z, eps=1e-3, method=method)
    assert torch.isfinite(y).all()
    z.requires_grad_(True)
    vkd.whiten(z, eps=1e-3, method="cholesky").sum().backward()
    assert torch.isfinite(z.grad).all()


def test_registry_and_errors():
    z = torch.randn(4, 6)
    for name in vkd.NORMALIZATIONS:
        assert vkd.get_normalization(name)(z).shape == z.shape
    torch.testing.assert_close(vkd.get_normalization("batchnorm", eps=0.5)(z), vkd.batch_normalize(z, eps=0.5))
    with pytest.raises(ValueError, match="unknown normalisation 'group'"):
        vkd.get_normalization("group")
    with pytest.raises(ValueError, match=r"expects a \(B, d\) batch, got shape \(2, 3, 4\)"):
        vkd.whiten(torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match="unknown whitening method"):
        vkd.whiten(z, method="pca")
