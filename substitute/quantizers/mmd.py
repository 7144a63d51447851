"""MMD VQ: the codebook is aligned with the batch's features by a blocked maximum mean discrepancy."""

from __future__ import annotations

import torch

from common.quantize import Codebook
from substitute.losses import mmd_loss
from substitute.quantizers.base import init_codes


class MMDCodebook(Codebook):
    """Codebook trained by gradient from the layout's VQ loss plus `gamma * MMD(features, codebook)`.

    The features are every vector quantized in the forward pass (all scales' residuals in the multi-scale
    layout). See `substitute.losses.mmd_loss` for the kernel, the bandwidth and the blocked computation.
    """

    default_beta = 0.0

    def __init__(
        self,
        size: int,
        dim: int,
        *,
        # Codes start near the origin (U(−1/K, 1/K)) and the MMD term spreads them over the features. An N(0, 1)
        # start leaves most codes far outside small-scale latents: on the demo tokenizer (latent std 0.16) it
        # used 7% of 1,024 codes after 300 steps, against 97% after 150 steps from the uniform start.
        init: str = "uniform",
        gamma: float = 0.5,
        block_size: int = 4096,
        estimator: str = "biased",
        bandwidth: str | float = "mean",
    ):
        super().__init__(size, dim)
        init_codes(self, init)
        self.gamma = gamma
        self.block_size = block_size
        self.estimator = estimator
        self.bandwidth = bandwidth

    def codebook_loss(self, features: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        return self.gamma * mmd_loss(
            features, self.weight, block_size=self.block_size, estimator=self.estimator, bandwidth=self.bandwidth
        )
