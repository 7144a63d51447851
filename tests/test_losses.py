"""Tests of the alignment losses against direct, fully materialised computations."""

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from substitute.losses import gaussian_w2, mmd_bandwidth, mmd_loss, wasserstein_loss


pytestmark = pytest.mark.usefixtures("single_thread")


def direct_mmd(features, codebook, estimator="biased", bandwidth=None):
    """Reference MMD written out with whole matrices and plain autograd, in float64."""
    x = features.detach().double()
    x = x.mean(0, keepdim=True) + 0.5 * (x - x.mean(0, keepdim=True))
    y = codebook
    scale = math.sqrt(x.shape[1])
    pooled = torch.cat([x, y.detach()])
    pooled_dist = torch.cdist(pooled, pooled).square() / scale
    m = pooled.shape[0]
    if bandwidth is None:
        bandwidth = (pooled_dist.sum() - pooled_dist.diagonal().sum()) / (m * (m - 1))

    def kernel(a, b):
        dist = (a[:, None, :] - b[None, :, :]).square().sum(-1) / scale
        return torch.exp(-dist / bandwidth) + torch.exp(-dist / (2 * bandwidth))

    k_xx, k_xy, k_yy = kernel(x, x), kernel(x, y), kernel(y, y)
    n, k = x.shape[0], y.shape[0]
    if estimator == "biased":
        return k_xx.mean() - 2 * k_xy.mean() + k_yy.mean()
    off_xx = (k_xx.sum() - k_xx.diagonal().sum()) / (n * (n - 1))
    off_yy = (k_yy.sum() - k_yy.diagonal().sum()) / (k * (k - 1))
    return off_xx - 2 * k_xy.mean() + off_yy


def sample_pair(n=37, k=23, d=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    features = torch.randn(n, d, generator=gen) * 1.5 + 0.3
    codebook = torch.randn(k, d, generator=gen) * 0.7
    return features, codebook


def test_mmd_bandwidth_matches_pairwise_mean():
    x, y = sample_pair()
    pooled = torch.cat([x, y]).double()
    dist = torch.cdist(pooled, pooled).square() / math.sqrt(x.shape[1])
    m = pooled.shape[0]
    expected = (dist.sum() / (m * (m - 1))).item()
    assert mmd_bandwidth(x, y) == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("estimator", ["biased", "unbiased"])
@pytest.mark.parametrize("block_size", [5, 16, 4096])
def test_mmd_value_matches_direct(estimator, block_size):
    features, codebook = sample_pair()
    blocked = mmd_loss(features, codebook, block_size=block_size, estimator=estimator)
    expected = direct_mmd(features, codebook.double(), estimator)
    assert blocked.dtype == torch.float32
    assert blocked.item() == pytest.approx(expected.item(), rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("estimator", ["biased", "unbiased"])
@pytest.mark.parametrize("block_size", [7, 4096])
def test_mmd_gradient_matches_autograd(estimator, block_size):
    features, codebook = sample_pair()
    blocked_codebook = codebook.clone().requires_grad_(True)
    mmd_loss(features, blocked_codebook, block_size=block_size, estimator=estimator).backward()
    direct_codebook = codebook.double().requires_grad_(True)
    direct_mmd(features, direct_codebook, estimator).backward()
    expected = direct_codebook.grad.float()
    scale = expected.abs().max()
    assert torch.allclose(blocked_codebook.grad, expected, rtol=1e-4, atol=1e-5 * scale)


def test_mmd_float64_gradcheck():
    features, codebook = sample_pair(n=9, k=6, d=3)
    codebook = codebook.double().requires_grad_(True)
    # A fixed bandwidth makes the loss a smooth function of the codebook, as gradcheck needs.
    assert torch.autograd.gradcheck(
        lambda c: mmd_loss(features.double(), c, block_size=4, bandwidth=1.3), (codebook,)
    )


def test_mmd_fixed_bandwidth_and_scaled_gradient():
    features, codebook = sample_pair()
    value = mmd_loss(features, codebook, bandwidth=2.0)
    assert value.item() == pytest.approx(direct_mmd(features, codebook.double(), bandwidth=2.0).item(), rel=1e-4)
    codebook = codebook.clone().requires_grad_(True)
    (3.0 * mmd_loss(features, codebook, block_size=8)).backward()
    once = codebook.grad.clone()
    codebook.grad = None
    mmd_loss(features, codebook, block_size=8).backward()
    assert torch.allclose(once, 3.0 * codebook.grad, rtol=1e-5, atol=1e-8)


def test_mmd_no_gradient_to_features():
    features, codebook = sample_pair()
    features.requires_grad_(True)
    loss = mmd_loss(features, codebook.requires_grad_(True))
    loss.backward()
    assert features.grad is None
    assert codebook.grad is not None


def test_mmd_decreases_along_negative_gradient():
    features, codebook = sample_pair(n=64, k=16)
    codebook = codebook.requires_grad_(True)
    before = mmd_loss(features, codebook, block_size=10)
    before.backward()
    with torch.no_grad():
        after = mmd_loss(features, codebook - 0.05 * codebook.grad / codebook.grad.norm(), block_size=10)
    assert after.item() < before.item()


def test_mmd_rejects_bad_arguments():
    features, codebook = sample_pair()
    with pytest.raises(ValueError, match="dimension"):
        mmd_loss(features, codebook[:, :3])
    with pytest.raises(ValueError, match="estimator"):
        mmd_loss(features, codebook, estimator="median")
    with pytest.raises(ValueError, match="bandwidth"):
        mmd_loss(features, codebook, bandwidth=-1.0)
    with pytest.raises(ValueError, match="unbiased"):
        mmd_loss(features, codebook[:1], estimator="unbiased")


def test_gaussian_w2_diagonal_closed_form():
    mean_a, mean_b = torch.tensor([0.0, 1.0, -2.0]), torch.tensor([0.5, 0.0, 1.0])
    var_a, var_b = torch.tensor([4.0, 1.0, 0.25]), torch.tensor([1.0, 9.0, 0.25])
    distance = gaussian_w2(mean_a.double(), torch.diag(var_a).double(), mean_b.double(), torch.diag(var_b).double())
    expected = math.sqrt((mean_a - mean_b).square().sum() + (var_a.sqrt() - var_b.sqrt()).square().sum())
    assert distance.item() == pytest.approx(expected, rel=1e-9)


def test_gaussian_w2_commuting_full_covariances():
    # Covariances sharing eigenvectors: W2^2 = ||dm||^2 + sum (sqrt(la) - sqrt(lb))^2.
    rotation, _ = torch.linalg.qr(torch.randn(4, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64))
    eig_a = torch.tensor([3.0, 1.0, 0.5, 0.1], dtype=torch.float64)
    eig_b = torch.tensor([1.0, 2.0, 0.5, 0.4], dtype=torch.float64)
    cov_a = rotation @ torch.diag(eig_a) @ rotation.T
    cov_b = rotation @ torch.diag(eig_b) @ rotation.T
    zero = torch.zeros(4, dtype=torch.float64)
    distance = gaussian_w2(zero, cov_a, zero, cov_b)
    expected = (eig_a.sqrt() - eig_b.sqrt()).square().sum().sqrt()
    assert distance.item() == pytest.approx(expected.item(), rel=1e-8)


def test_wasserstein_loss_matches_diagonal_statistics():
    gen = torch.Generator().manual_seed(2)
    features = torch.randn(500, 3, generator=gen) * torch.tensor([2.0, 1.0, 0.5]) + 1.0
    codebook = torch.randn(300, 3, generator=gen) * torch.tensor([0.5, 0.2, 1.0])
    # Decorrelate the samples exactly, so the sample covariances are diagonal and the closed form applies.
    features = _whiten_to_diagonal(features)
    codebook = _whiten_to_diagonal(codebook)
    loss = wasserstein_loss(features, codebook, feature_cov_scale=0.25)
    var_f = features.double().var(0) * 0.25
    var_c = codebook.double().var(0)
    mean_gap = (features.double().mean(0) - codebook.double().mean(0)).square().sum()
    expected = (mean_gap + (var_f.sqrt() - var_c.sqrt()).square().sum()).sqrt()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def _whiten_to_diagonal(samples):
    """Rotate samples into their covariance eigenbasis, which makes the sample covariance diagonal."""
    centred = samples.double() - samples.double().mean(0)
    _, vectors = torch.linalg.eigh(torch.cov(centred.T))
    return (centred @ vectors + samples.double().mean(0)).float()


def test_wasserstein_identical_distributions_near_zero():
    features = torch.randn(400, 6, generator=torch.Generator().manual_seed(3))
    assert wasserstein_loss(features, features, feature_cov_scale=1.0).item() < 1e-4
    # With the default 0.25 scale the codebook must be the features shrunk by half about their mean.
    shrunk = features.mean(0) + 0.5 * (features - features.mean(0))
    assert wasserstein_loss(features, shrunk).item() < 1e-4


def test_wasserstein_gradient_flows_to_codebook_only():
    features = torch.randn(100, 4, generator=torch.Generator().manual_seed(4)).requires_grad_(True)
    codebook = (torch.rand(64, 4) * 2 - 1).div(64).requires_grad_(True)
    loss = wasserstein_loss(features, codebook)
    loss.backward()
    assert features.grad is None
    assert torch.isfinite(codebook.grad).all()
    assert codebook.grad.abs().sum() > 0
    with torch.no_grad():
        stepped = wasserstein_loss(features, codebook - 1e-3 * codebook.grad / codebook.grad.norm())
    assert stepped.item() < loss.item()


def test_wasserstein_gradcheck():
    gen = torch.Generator().manual_seed(5)
    features = torch.randn(50, 3, generator=gen, dtype=torch.float64)
    codebook = torch.randn(20, 3, generator=gen, dtype=torch.float64).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda c: wasserstein_loss(features, c), (codebook,))


class LargestTensor(TorchDispatchMode):
    """Record the largest number of elements of any tensor an operator returns."""

    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in torch.utils._pytree.tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                self.numel = max(self.numel, tensor.numel())
        return out


def test_mmd_memory_bounded_by_block():
    n, k, d, block = 300, 500, 4, 64
    features, codebook = sample_pair(n=n, k=k, d=d)
    codebook.requires_grad_(True)
    with LargestTensor() as tracker:
        mmd_loss(features, codebook, block_size=block).backward()
    # Nothing larger than one block of the kernel matrix or the inputs themselves: no N x K or K x K matrix.
    assert tracker.numel <= max(block * block, (n + k) * d)
    assert tracker.numel < n * k
