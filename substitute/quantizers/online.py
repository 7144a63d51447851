"""Online VQ: a gradient-trained codebook whose dead codes are re-initialised from recent features."""

from __future__ import annotations

import torch

from substitute.quantizers.base import FeatureQueue, broadcast_from_main, sum_across_processes
from substitute.quantizers.vanilla import VanillaCodebook


class OnlineCodebook(VanillaCodebook):
    """Vanilla codebook plus dead-code re-initialisation.

    Each training step updates a moving average of how often every code is chosen (hits per step, summed over
    processes). A code whose average falls below `dead_threshold` is replaced by a feature drawn at random from
    a queue of the most recent `queue_size` features, and its average is reset to 1 so it gets time to attract
    vectors: about log(dead_threshold) / log(usage_decay) steps (458 with the defaults). Averages start at 0,
    so every code not chosen in the first training step is drawn from data right away.
    """

    def __init__(
        self,
        size: int,
        dim: int,
        *,
        init: str = "normal",
        codebook_weight: float = 1.0,
        usage_decay: float = 0.99,
        dead_threshold: float = 0.01,
        queue_size: int = 65536,
    ):
        super().__init__(size, dim, init=init, codebook_weight=codebook_weight)
        if not 0.0 <= usage_decay < 1.0:
            raise ValueError(f"usage_decay must be in [0, 1), got {usage_decay}")
        self.usage_decay = usage_decay
        self.dead_threshold = dead_threshold
        self.queue = FeatureQueue(queue_size)
        self.register_buffer("usage", torch.zeros(size))  # (K,) moving average of hits per step

    @torch.no_grad()
    def update(self, features: torch.Tensor, indices: torch.Tensor) -> None:
        self.queue.push(features)
        counts = sum_across_processes(torch.bincount(indices, minlength=self.size).float())
        self.usage.mul_(self.usage_decay).add_(counts, alpha=1.0 - self.usage_decay)
        dead = torch.nonzero(self.usage < self.dead_threshold).squeeze(1)  # (D,), the same on every process
        if dead.numel() == 0:
            return

        # Draw on every process, then keep the main process's draw, so all copies of the codebook stay equal.
        # NOTE: the optimizer's moment estimates for a replaced code are kept, not reset.
        recent = self.queue.contents()
        picks = torch.randint(len(recent), (dead.numel(),), device=recent.device)
        replacements = broadcast_from_main(recent[picks].contiguous())
        weight = self.embedding.weight
        weight[dead] = replacements.to(weight.dtype)
        self.usage[dead] = 1.0
