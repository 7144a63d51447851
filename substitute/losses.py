"""Distribution-alignment losses between encoder features and a codebook.

Both losses treat the features as constants and move only the codebook, which is how the substitution
stage uses them: `L_VQ = ||sg(z_e) - z_q||^2 + gamma * L_align(features, codebook)`.

- `mmd_loss`: maximum mean discrepancy with a two-bandwidth Gaussian kernel. A custom autograd function
  computes the value and its gradient in blocks. So the N x N, N x K and K x K kernel matrices are never
  held in memory whole, and autograd keeps no graph for them.
- `wasserstein_loss`: 2-Wasserstein distance (not squared) between the Gaussians fitted to the features
  and to the codebook.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

__all__ = ["mmd_loss", "mmd_bandwidth", "wasserstein_loss", "gaussian_w2"]

Estimator = Literal["biased", "unbiased"]


def _check_pair(features: torch.Tensor, codebook: torch.Tensor) -> None:
    if features.dim() != 2 or codebook.dim() != 2:
        raise ValueError(
            f"features and codebook must be 2-D (N, d) and (K, d), got shapes "
            f"{tuple(features.shape)} and {tuple(codebook.shape)}"
        )
    if features.shape[1] != codebook.shape[1]:
        raise ValueError(
            f"features have dimension {features.shape[1]} but codebook vectors have {codebook.shape[1]}"
        )


def _shrink_to_mean(features: torch.Tensor) -> torch.Tensor:
    """Move every feature halfway toward the batch mean."""
    mean = features.mean(dim=0, keepdim=True)
    return mean + 0.5 * (features - mean)


def mmd_bandwidth(x: torch.Tensor, y: torch.Tensor) -> float:
    """Return the mean off-diagonal scaled squared distance over the pooled set X u Y.

    Uses the identity sum_{i,j} ||z_i - z_j||^2 = 2 M sum_i ||z_i - mean||^2 over the M pooled vectors.
    The diagonal terms are zero, so dividing by M (M - 1) gives the off-diagonal mean exactly, in
    O(M d) time and memory. Centring first, in float64, avoids the cancellation of the uncentred form.
    """
    m = x.shape[0] + y.shape[0]
    if m < 2:
        raise ValueError("the MMD bandwidth needs at least two vectors in features and codebook together")
    x64, y64 = x.detach().double(), y.detach().double()
    mean = (x64.sum(dim=0) + y64.sum(dim=0)) / m
    spread = (x64 - mean).square().sum() + (y64 - mean).square().sum()
    total = 2.0 * m * spread / math.sqrt(x.shape[1])
    return float(total / (m * (m - 1)))


def _scaled_sq_dist(a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """Return ||a_i - b_j||^2 / scale for every pair as one new (n, m) tensor."""
    dist = torch.addmm(b.square().sum(dim=1).unsqueeze(0), a, b.T, beta=1.0, alpha=-2.0)  # (n, m)
    dist.add_(a.square().sum(dim=1, keepdim=True))
    return dist.clamp_min_(0.0).div_(scale)


def _kernel_block(
    dist: torch.Tensor, bandwidth: float, with_slope: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Return the sum of k(D) = exp(-D/b) + exp(-D/2b) over the block (float64) and, if asked, dk/dD per element.

    Overwrites `dist` and allocates only two block-sized buffers. Fewer buffers matter on the CPU, where every
    fresh block-sized allocation costs page faults.
    """
    narrow = torch.mul(dist, -1.0 / bandwidth).exp_()
    wide = dist.mul_(-0.5 / bandwidth).exp_()
    total = narrow.sum(dtype=torch.float64) + wide.sum(dtype=torch.float64)
    if not with_slope:
        return total, None
    slope = narrow.mul_(-1.0 / bandwidth).add_(wide, alpha=-0.5 / bandwidth)
    return total, slope


def _blocks(n: int, block_size: int) -> list[tuple[int, int]]:
    return [(start, min(start + block_size, n)) for start in range(0, n, block_size)]


def _self_kernel_sum(
    z: torch.Tensor, bandwidth: float, scale: float, block_size: int, grad: torch.Tensor | None
) -> torch.Tensor:
    """Return the sum of k(z_i, z_j) over all ordered pairs, diagonal included, as a float64 scalar tensor.

    Visits only blocks on or above the diagonal and counts the others twice, since k is symmetric.
    When `grad` is given, adds d(sum)/dz to it (blockwise, in place).
    """
    total = torch.zeros((), dtype=torch.float64, device=z.device)
    spans = _blocks(z.shape[0], block_size)
    for row, (r0, r1) in enumerate(spans):
        for c0, c1 in spans[row:]:
            dist = _scaled_sq_dist(z[r0:r1], z[c0:c1], scale)  # (br, bc)
            if r0 == c0:
                # The expanded form leaves rounding noise on the diagonal, where the distance is exactly 0.
                dist.fill_diagonal_(0.0)
            block_sum, slope = _kernel_block(dist, bandwidth, with_slope=grad is not None)
            total += block_sum if r0 == c0 else 2.0 * block_sum
            if slope is None:
                continue
            # d/dz_r sum_{r,c} k(D_rc) = sum_c k'(D_rc) * 2 (z_r - z_c) / scale, counted for both arguments.
            factor = 4.0 / scale
            grad[r0:r1] += factor * (z[r0:r1] * slope.sum(dim=1, keepdim=True) - slope @ z[c0:c1])
            if r0 != c0:
                grad[c0:c1] += factor * (z[c0:c1] * slope.sum(dim=0).unsqueeze(1) - slope.T @ z[r0:r1])
    return total


def _cross_kernel_sum(
    x: torch.Tensor, y: torch.Tensor, bandwidth: float, scale: float, block_size: int, grad: torch.Tensor | None
) -> torch.Tensor:
    """Return the sum of k(x_i, y_j) over all pairs as a float64 scalar tensor, adding d(sum)/dy to `grad` if given."""
    total = torch.zeros((), dtype=torch.float64, device=y.device)
    for y0, y1 in _blocks(y.shape[0], block_size):
        for x0, x1 in _blocks(x.shape[0], block_size):
            dist = _scaled_sq_dist(y[y0:y1], x[x0:x1], scale)  # (by, bx)
            block_sum, slope = _kernel_block(dist, bandwidth, with_slope=grad is not None)
            total += block_sum
            if slope is not None:
                grad[y0:y1] += (2.0 / scale) * (y[y0:y1] * slope.sum(dim=1, keepdim=True) - slope @ x[x0:x1])
    return total


def _pair_weights(n: int, k: int, estimator: Estimator) -> tuple[float, float, float]:
    """Return the weights of the XX, XY and YY kernel sums in the MMD estimate."""
    if estimator == "biased":
        return 1.0 / (n * n), 1.0 / (n * k), 1.0 / (k * k)
    if estimator == "unbiased":
        if n < 2 or k < 2:
            raise ValueError(f"the unbiased MMD estimate needs at least 2 features and 2 codes, got N={n}, K={k}")
        return 1.0 / (n * (n - 1)), 1.0 / (n * k), 1.0 / (k * (k - 1))
    raise ValueError(f"estimator must be 'biased' or 'unbiased', got {estimator!r}")


class _BlockedMMD(torch.autograd.Function):
    """MMD value with its codebook gradient, both computed in one blocked pass in forward."""

    @staticmethod
    def forward(ctx, x, y, bandwidth: float, estimator: Estimator, block_size: int):  # type: ignore[override]
        n, k = x.shape[0], y.shape[0]
        scale = math.sqrt(x.shape[1])
        w_xx, w_xy, w_yy = _pair_weights(n, k, estimator)
        grad_y = torch.zeros_like(y) if ctx.needs_input_grad[1] else None
        grad_yy = torch.zeros_like(y) if grad_y is not None else None

        sum_xx = _self_kernel_sum(x, bandwidth, scale, block_size, grad=None)
        sum_xy = _cross_kernel_sum(x, y, bandwidth, scale, block_size, grad=grad_y)
        sum_yy = _self_kernel_sum(y, bandwidth, scale, block_size, grad=grad_yy)
        if estimator == "unbiased":
            # Every diagonal kernel value is k(0) = 2, and the diagonal has no gradient.
            sum_xx -= 2.0 * n
            sum_yy -= 2.0 * k
        value = w_xx * sum_xx - 2.0 * w_xy * sum_xy + w_yy * sum_yy  # float64 on the device, so no sync here

        if grad_y is not None:
            grad_y.mul_(-2.0 * w_xy).add_(grad_yy, alpha=w_yy)
        ctx.save_for_backward(grad_y if grad_y is not None else torch.empty(0))
        return value.to(y.dtype)

    @staticmethod
    def backward(ctx, grad_output):  # type: ignore[override]
        (grad_y,) = ctx.saved_tensors
        if not ctx.needs_input_grad[1]:
            return None, None, None, None, None
        return None, grad_output * grad_y, None, None, None


def mmd_loss(
    features: torch.Tensor,
    codebook: torch.Tensor,
    *,
    block_size: int = 4096,
    estimator: Estimator = "biased",
    bandwidth: Literal["mean"] | float = "mean",
) -> torch.Tensor:
    """Compute the MMD between the features (N, d) and the codebook (K, d); gradient flows to the codebook only.

    X is the features shrunk halfway toward their mean and detached, and Y is the codebook. D is the squared
    Euclidean distance divided by sqrt(d). The kernel is exp(-D/b) + exp(-D/(2b)), where b is the mean
    off-diagonal D over X u Y (detached) unless `bandwidth` gives b. The biased estimate is
    mean k(X,X) - 2 mean k(X,Y) + mean k(Y,Y), and "unbiased" leaves the diagonals out of the XX and YY means.

    Memory stays O((N + K) d + block_size^2) whatever N and K are. Computation runs in float32 (or float64
    when the codebook is float64) and block sums are accumulated in float64.
    """
    _check_pair(features, codebook)
    if block_size < 1:
        raise ValueError(f"block_size must be positive, got {block_size}")
    if features.shape[0] == 0 or codebook.shape[0] == 0:
        raise ValueError("mmd_loss needs at least one feature and one code")
    dtype = torch.float64 if codebook.dtype == torch.float64 else torch.float32
    x = _shrink_to_mean(features.detach().to(dtype))
    y = codebook.to(dtype)

    if bandwidth == "mean":
        b = mmd_bandwidth(x, y)
    elif isinstance(bandwidth, (int, float)) and not isinstance(bandwidth, bool):
        b = float(bandwidth)
    else:
        raise ValueError(f"bandwidth must be 'mean' or a positive number, got {bandwidth!r}")
    if not b > 0.0:
        raise ValueError(
            f"MMD bandwidth is {b}: features and codebook are all one point, or the given bandwidth is not positive"
        )
    return _BlockedMMD.apply(x, y, b, estimator, block_size)


def _sqrtm_psd(matrix: torch.Tensor, eps: float) -> torch.Tensor:
    """Return the symmetric square root of a PSD matrix, clamping eigenvalues below `eps` to `eps`."""
    eigenvalues, eigenvectors = torch.linalg.eigh(matrix)
    roots = eigenvalues.clamp_min(eps).sqrt()
    return (eigenvectors * roots) @ eigenvectors.T


def gaussian_w2(
    mean_a: torch.Tensor, cov_a: torch.Tensor, mean_b: torch.Tensor, cov_b: torch.Tensor, *, eps: float = 1e-12
) -> torch.Tensor:
    """Compute the 2-Wasserstein distance (not squared) between N(mean_a, cov_a) and N(mean_b, cov_b).

    W2^2 = ||m_a - m_b||^2 + tr(C_a) + tr(C_b) - 2 tr((C_a^1/2 C_b C_a^1/2)^1/2). Gradient flows to the
    b side only: C_a^1/2 is built from a detached eigendecomposition, and the cross term goes through
    eigenvalues alone (`eigvalsh`), whose gradient stays finite when eigenvalues coincide.
    """
    root_a = _sqrtm_psd(cov_a.detach(), eps)
    middle = root_a @ cov_b @ root_a
    middle = 0.5 * (middle + middle.T)  # symmetrise away rounding before the eigendecomposition
    cross = torch.linalg.eigvalsh(middle).clamp_min(eps).sqrt().sum()
    squared = (mean_a - mean_b).square().sum() + torch.trace(cov_a) + torch.trace(cov_b) - 2.0 * cross
    return squared.clamp_min(eps).sqrt()


def wasserstein_loss(
    features: torch.Tensor, codebook: torch.Tensor, *, feature_cov_scale: float = 0.25, eps: float = 1e-12
) -> torch.Tensor:
    """Compute the Gaussian W2 distance between features (N, d), detached, and the codebook (K, d).

    The feature covariance is multiplied by `feature_cov_scale` (default 0.25), which aims the codebook at a
    distribution narrower than the features. Covariances use the unbiased (n - 1) normalisation, and the
    computation runs in float64 for stable eigendecompositions.
    """
    _check_pair(features, codebook)
    if features.shape[0] < 2 or codebook.shape[0] < 2:
        raise ValueError(
            f"wasserstein_loss needs at least 2 features and 2 codes, got N={features.shape[0]}, K={codebook.shape[0]}"
        )
    x = features.detach().double()
    y = codebook.double()
    dim = x.shape[1]
    cov_x = torch.cov(x.T).reshape(dim, dim) * feature_cov_scale  # reshape: torch.cov returns 0-D when d = 1
    cov_y = torch.cov(y.T).reshape(dim, dim)
    return gaussian_w2(x.mean(dim=0), cov_x, y.mean(dim=0), cov_y, eps=eps).to(codebook.dtype)
