"""Quantization error E and codebook utilization U over a whole set of latents.

Both are sums over the set divided once at the end, so they do not depend on the batch size. A `reduce` that
sums a tensor across processes (for example `accelerator.reduce`) makes them independent of the process count
too, as long as exactly one process quantizes each latent.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable

import torch
import torch.nn as nn

from common.quantize import usage_counts

Reduce = Callable[[torch.Tensor], torch.Tensor]


def pooled_usage(quantizer: nn.Module, counts: torch.Tensor) -> torch.Tensor:
    """Sum per-segment code counts (S, K) into per-codebook counts (num_codebooks, K).

    The number of codebooks comes from the segments, so an outside quantizer without `codebooks()` counts as one.
    """
    pooled = counts.new_zeros(1 + max(s.codebook for s in quantizer.segments), counts.shape[1])
    for row, segment in enumerate(quantizer.segments):
        pooled[segment.codebook] += counts[row]
    return pooled


def usage_summary(quantizer: nn.Module, counts: torch.Tensor) -> dict[str, float]:
    """Return utilization and perplexity from per-segment code counts (S, K).

    U is the fraction of codes used at least once, over all codebooks together and per segment. Perplexity is
    exp(entropy) of each codebook's pooled code distribution, averaged over codebooks.
    """
    pooled = pooled_usage(quantizer, counts).double()  # (num_codebooks, K)
    summary = {"U": float((pooled > 0).double().mean())}
    probs = pooled / pooled.sum(dim=1, keepdim=True).clamp_min(1.0)
    entropy = -(probs * probs.clamp_min(1e-30).log()).sum(dim=1)
    summary["perplexity"] = float(entropy.exp().mean())
    for row, segment in enumerate(quantizer.segments):
        summary[f"U/{segment.name}"] = float((counts[row] > 0).double().mean())
    return summary


@torch.no_grad()
def quantization_stats(
    quantizer: nn.Module,
    latents_iter: Iterable[torch.Tensor],
    *,
    device: torch.device | str | None = None,
    reduce: Reduce | None = None,
) -> dict[str, float]:
    """Quantize every batch of latents (B, C, H, W) and return E, U (pooled and per segment) and perplexity.

    E is the per-element mean squared error between `quantizer.quantize(z)` and z over all latents.
    """
    if device is None:
        device = next(quantizer.parameters()).device
    squared_error = torch.zeros((), dtype=torch.float64, device=device)
    elements = torch.zeros((), dtype=torch.float64, device=device)
    counts = torch.zeros(len(quantizer.segments), quantizer.codebook_size, dtype=torch.long, device=device)
    latents = torch.zeros((), dtype=torch.float64, device=device)
    for z in latents_iter:
        z = z.to(device=device, dtype=torch.float32)  # (B, C, H, W)
        z_q, indices = quantizer.quantize(z)
        squared_error += (z_q.double() - z.double()).square().sum()
        elements += z.numel()
        latents += z.shape[0]
        counts += usage_counts(quantizer, indices)

    if reduce is not None:
        squared_error, elements, counts, latents = (reduce(t) for t in (squared_error, elements, counts, latents))
    if elements.item() == 0:
        raise ValueError("quantization_stats got no latents: the evaluation set is empty")
    stats = {"E": float(squared_error / elements), "num_latents": int(latents.item())}
    stats.update(usage_summary(quantizer, counts))
    return stats


def batch_error(z_q: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Return the per-element mean squared error of one batch, detached, for training logs."""
    return (z_q.detach().float() - z.detach().float()).square().mean()


def format_stats(stats: dict[str, float]) -> str:
    """Format the headline numbers of `quantization_stats` for a log line."""
    parts = [f"E={stats['E']:.4f}", f"U={100 * stats['U']:.2f}%"]
    if math.isfinite(stats.get("perplexity", math.nan)):
        parts.append(f"perplexity={stats['perplexity']:.1f}")
    parts.append(f"latents={stats['num_latents']}")
    return " ".join(parts)
