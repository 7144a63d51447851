"""Vanilla VQ as in VQ-VAE: codes learn by gradient from a codebook loss, and z_q passes gradients straight through."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from common.quantize import Codebook
from substitute.quantizers.base import init_codes


class VanillaCodebook(Codebook):
    """Codebook trained by gradient: each code is pulled toward the vectors assigned to it.

    The codebook term is `codebook_weight * ||sg(f) - e_idx||^2` (mean over elements). The commitment term
    `beta * ||f - sg(z_q)||^2` lives in the layout and only acts when the encoder trains.
    """

    default_beta = 0.25

    def __init__(self, size: int, dim: int, *, init: str = "normal", codebook_weight: float = 1.0):
        super().__init__(size, dim)
        init_codes(self, init)
        self.codebook_weight = codebook_weight

    def codebook_loss(self, features: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        if not self.codebook_weight:
            return features.new_zeros(())
        return self.codebook_weight * F.mse_loss(self.embed(indices).float(), features.detach().float())
