"""Reconstruction and quantizer metrics that do not need pretrained networks: PSNR, SSIM, E and U.

Image metrics take uint8 images (B, 3, H, W), so they score exactly what a saved reconstruction would contain.
The set-level accumulators keep sums and counts only, so memory is bounded. Every process adds its own samples and
the sums are reduced once at the end, so the result is the same for any batch size or number of processes.
Per-sample values are instead stored with their sample keys and de-duplicated after gathering, because padding
that repeats samples (a WebDataset loader on several processes) cannot be dropped by accelerate.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

# PSNR of an exact reconstruction is infinite. Per image, the MSE is floored at 1e-10, which caps PSNR at 100 dB,
# so that one identical image does not turn the set mean into inf.
PSNR_MSE_FLOOR = 1e-10

# SSIM constants of Wang et al. (2004) for a data range of 1: Gaussian window of 11 taps with sigma 1.5,
# K1 = 0.01, K2 = 0.03.
SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_C1 = 0.01**2
SSIM_C2 = 0.03**2


def _check_uint8_pair(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.dtype != torch.uint8 or b.dtype != torch.uint8:
        raise TypeError(f"expected two uint8 image batches, got {a.dtype} and {b.dtype}; round with to_uint8 first")
    if a.shape != b.shape or a.dim() != 4:
        raise ValueError(f"expected two (B, C, H, W) batches of the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Compute PSNR in dB per image between uint8 batches (B, C, H, W), on [0, 1], capped at 100 dB: (B,) float64."""
    _check_uint8_pair(a, b)
    diff = (a.double() - b.double()) / 255.0
    mse = diff.square().flatten(1).mean(dim=1).clamp_min(PSNR_MSE_FLOOR)
    return -10.0 * torch.log10(mse)


def _gaussian_window(device: torch.device) -> torch.Tensor:
    """Return the normalised 1-D Gaussian window (SSIM_WINDOW,) in float64."""
    offsets = torch.arange(SSIM_WINDOW, dtype=torch.float64, device=device) - (SSIM_WINDOW - 1) / 2
    window = torch.exp(-0.5 * (offsets / SSIM_SIGMA) ** 2)
    return window / window.sum()


def _blur(x: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
    """Filter (N, 1, H, W) separably with `window`, keeping only positions where the window fits ('valid')."""
    x = F.conv2d(x, window.view(1, 1, 1, -1))
    return F.conv2d(x, window.view(1, 1, -1, 1))


def ssim(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Compute SSIM per image between uint8 batches (B, C, H, W): (B,) float64.

    SSIM is computed per colour channel on [0, 1] and averaged over channels and over the positions where the
    11x11 window fits entirely inside the image (no padding). This equals scikit-image's
    `structural_similarity(..., channel_axis=0, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
    data_range=1)`, which filters with reflection and then crops the 5-pixel border. Everything is in float64.
    """
    _check_uint8_pair(a, b)
    batch, channels, height, width = a.shape
    if min(height, width) < SSIM_WINDOW:
        raise ValueError(f"SSIM needs images of at least {SSIM_WINDOW}x{SSIM_WINDOW} pixels, got {height}x{width}")

    # every channel becomes its own single-channel image: (B*C, 1, H, W)
    x = (a.double() / 255.0).reshape(batch * channels, 1, height, width)
    y = (b.double() / 255.0).reshape(batch * channels, 1, height, width)
    window = _gaussian_window(a.device)

    # local means, variances and covariance, all from one filtered stack: (5, B*C, 1, h, w)
    moments = _blur(torch.cat([x, y, x * x, y * y, x * y]), window).chunk(5)
    mean_x, mean_y, sq_x, sq_y, prod_xy = moments
    var_x = sq_x - mean_x.square()
    var_y = sq_y - mean_y.square()
    cov_xy = prod_xy - mean_x * mean_y

    numerator = (2 * mean_x * mean_y + SSIM_C1) * (2 * cov_xy + SSIM_C2)
    denominator = (mean_x.square() + mean_y.square() + SSIM_C1) * (var_x + var_y + SSIM_C2)
    ssim_map = numerator / denominator
    return ssim_map.reshape(batch, -1).mean(dim=1)


def reduce_sum(tensor: torch.Tensor, accelerator=None) -> torch.Tensor:
    """Sum a tensor over all processes; a no-op without an accelerator or with one process."""
    if accelerator is None or accelerator.num_processes == 1:
        return tensor
    return accelerator.reduce(tensor.to(accelerator.device), reduction="sum").cpu()


class QuantizationError:
    """Quantization error E: per-element MSE between quantized and encoder latents over the whole set.

    Squared errors and element counts are summed (float64 and int64) and divided once at the end, so E does not
    depend on how the set was split into batches or processes.
    """

    def __init__(self) -> None:
        self.squared_error = torch.zeros((), dtype=torch.float64)
        self.count = torch.zeros((), dtype=torch.int64)

    @torch.no_grad()
    def update(self, z_q: torch.Tensor, z_e: torch.Tensor) -> None:
        if z_q.shape != z_e.shape:
            raise ValueError(f"z_q {tuple(z_q.shape)} and z_e {tuple(z_e.shape)} must have the same shape")
        self.squared_error += (z_q.double() - z_e.double()).square().sum().cpu()
        self.count += z_e.numel()

    def compute(self, accelerator=None) -> float:
        totals = reduce_sum(torch.stack([self.squared_error, self.count.double()]), accelerator)
        if totals[1] == 0:
            raise ValueError("quantization error of an empty set: no latents were added")
        return float(totals[0] / totals[1])


class CodeUsage:
    """Codebook utilization U: the fraction of codes used at least once over the whole set.

    Counts are kept per segment (scale or channel group) as (S, K) int64, summed across processes before they
    are thresholded, so a code used once on any process counts as used. The pooled value treats each codebook
    as one pool: a code is used if any segment that reads from its codebook used it.
    """

    def __init__(self, segment_names: Sequence[str], segment_codebooks: Sequence[int], codebook_size: int) -> None:
        if len(segment_names) != len(segment_codebooks):
            raise ValueError("segment_names and segment_codebooks must have one entry per segment")
        self.segment_names = list(segment_names)
        self.segment_codebooks = list(segment_codebooks)
        self.codebook_size = codebook_size
        self.counts = torch.zeros(len(segment_names), codebook_size, dtype=torch.int64)

    @classmethod
    def for_quantizer(cls, quantizer) -> "CodeUsage":
        """Build an accumulator matching a quantizer's `segments` and `codebook_size`."""
        segments = quantizer.segments
        return cls([s.name for s in segments], [s.codebook for s in segments], quantizer.codebook_size)

    def update(self, counts: torch.Tensor) -> None:
        """Add per-segment code counts (S, K), e.g. from `common.quantize.usage_counts(quantizer, indices)`."""
        if counts.shape != self.counts.shape:
            raise ValueError(f"expected counts of shape {tuple(self.counts.shape)}, got {tuple(counts.shape)}")
        self.counts += counts.to(device="cpu", dtype=torch.int64)

    def compute(self, accelerator=None) -> dict[str, object]:
        """Return {"pooled": U over all segments, "per_segment": {name: U}, "codes_used": ..., "codes_total": ...}."""
        used = reduce_sum(self.counts, accelerator) > 0  # (S, K)
        per_segment = {name: float(row.double().mean()) for name, row in zip(self.segment_names, used)}

        # one pool per codebook that any segment reads from
        codebooks = sorted(set(self.segment_codebooks))
        pooled_used = 0
        for codebook in codebooks:
            rows = [i for i, c in enumerate(self.segment_codebooks) if c == codebook]
            pooled_used += int(used[rows].any(dim=0).sum())
        codes_total = len(codebooks) * self.codebook_size
        return {
            "pooled": pooled_used / codes_total,
            "per_segment": per_segment,
            "codes_used": pooled_used,
            "codes_total": codes_total,
        }


def gather_keyed(values: dict[str, object], accelerator=None) -> dict[str, object]:
    """Merge {sample key: value} dicts from all processes; a key seen on several processes is kept once."""
    if accelerator is None or accelerator.num_processes == 1:
        return dict(values)
    from accelerate.utils import gather_object

    merged: dict[str, object] = {}
    # gather_object concatenates the per-process lists, so each process contributes one dict in a list
    for part in gather_object([values]):
        merged.update(part)
    return merged


class PerSampleMean:
    """Mean of a per-image metric over unique sample keys, gathered from all processes."""

    def __init__(self) -> None:
        self.values: dict[str, float] = {}

    def update(self, keys: Sequence[str], values: torch.Tensor) -> None:
        if len(keys) != values.numel():
            raise ValueError(f"got {len(keys)} keys for {values.numel()} values")
        for key, value in zip(keys, values.detach().double().cpu().tolist()):
            self.values[key] = value

    def compute(self, accelerator=None) -> dict[str, float]:
        """Return {"mean": ..., "std": ..., "n": ...} over the unique keys of all processes."""
        merged = gather_keyed(self.values, accelerator)
        if not merged:
            raise ValueError("mean of an empty set: no samples were added")
        # sum in key order so the result does not depend on which process saw which sample
        ordered = torch.tensor([merged[k] for k in sorted(merged)], dtype=torch.float64)
        std = float(ordered.std()) if len(ordered) > 1 else 0.0
        return {"mean": float(ordered.mean()), "std": std, "n": len(ordered)}
