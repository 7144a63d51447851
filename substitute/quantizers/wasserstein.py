"""Wasserstein VQ: the codebook's Gaussian is aligned with the features' by the Gaussian W2 distance."""

from __future__ import annotations

import torch

from common.quantize import Codebook
from substitute.losses import wasserstein_loss
from substitute.quantizers.base import FeatureQueue, init_codes


class WassersteinCodebook(Codebook):
    """Codebook trained by gradient from the layout's VQ loss plus `gamma * W2(features, codebook)`.

    Feature statistics come from a FIFO queue of the last `queue_size` features together with the current
    batch, and the feature covariance is scaled by `feature_cov_scale`. Codes start uniform in (-1/K, 1/K).
    """

    default_beta = 0.0

    def __init__(
        self,
        size: int,
        dim: int,
        *,
        init: str = "uniform",
        gamma: float = 0.2,
        feature_cov_scale: float = 0.25,
        queue_size: int = 65536,
    ):
        super().__init__(size, dim)
        init_codes(self, init)
        self.gamma = gamma
        self.feature_cov_scale = feature_cov_scale
        self.queue = FeatureQueue(queue_size)

    def codebook_loss(self, features: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        features = features.detach().float()
        if len(self.queue):
            features = torch.cat([self.queue.contents(), features])
        return self.gamma * wasserstein_loss(features, self.weight.float(), feature_cov_scale=self.feature_cov_scale)

    @torch.no_grad()
    def update(self, features: torch.Tensor, indices: torch.Tensor) -> None:
        self.queue.push(features)
