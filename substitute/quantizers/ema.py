"""EMA VQ: codes are exponential moving averages of the vectors assigned to them, and no gradient reaches them."""

from __future__ import annotations

import torch

from common.quantize import Codebook
from substitute.quantizers.base import init_codes, sum_across_processes


class EMACodebook(Codebook):
    """Codebook updated in place: e_k = EMA(sum of vectors assigned to k) / EMA(number assigned to k).

    A code whose smoothed count has decayed below `min_count` keeps its current vector, so codes that are never
    chosen stay where they are instead of collapsing toward zero. Counts and sums are summed across processes
    before the update, so every process has the same codebook.
    """

    default_beta = 0.0

    def __init__(self, size: int, dim: int, *, init: str = "normal", decay: float = 0.8, min_count: float = 1e-5):
        super().__init__(size, dim)
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        init_codes(self, init)
        self.embedding.weight.requires_grad_(False)
        self.decay = decay
        self.min_count = min_count
        self.register_buffer("ema_count", torch.zeros(size))  # (K,)
        self.register_buffer("ema_sum", torch.zeros(size, dim))  # (K, d)

    @torch.no_grad()
    def update(self, features: torch.Tensor, indices: torch.Tensor) -> None:
        features = features.float()
        counts = torch.bincount(indices, minlength=self.size).float()  # (K,)
        sums = torch.zeros(self.size, self.dim, device=features.device).index_add_(0, indices, features)  # (K, d)
        sum_across_processes(counts)
        sum_across_processes(sums)

        self.ema_count.mul_(self.decay).add_(counts, alpha=1.0 - self.decay)
        self.ema_sum.mul_(self.decay).add_(sums, alpha=1.0 - self.decay)
        alive = self.ema_count > self.min_count
        weight = self.embedding.weight
        weight[alive] = (self.ema_sum[alive] / self.ema_count[alive, None]).to(weight.dtype)
