"""Generator objective of decoder adaptation: ||x_hat - x||^2 + lambda_P * LPIPS + lambda_G * w * GAN.

w is the adaptive GAN weight of Esser et al., "Taming Transformers for High-Resolution Image Synthesis" (2021).
It is the ratio of the gradient norms of the reconstruction loss (L2 plus weighted LPIPS) and of the GAN loss at
the decoder's last layer, clamped and detached. The GAN term then pulls about as hard as the reconstruction
terms, whatever their scales.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from adapt.discriminator import generator_gan_loss


@dataclass
class LossWeights:
    """Weights of the generator terms; 0 switches a term off."""

    l2: float = 1.0
    perceptual: float = 1.0
    gan: float = 0.5
    max_adaptive_weight: float = 1e4  # clamp on the gradient-norm ratio
    eps: float = 1e-4  # keeps the ratio finite when the GAN gradient vanishes


def adaptive_gan_weight(rec_loss: torch.Tensor, gan_loss: torch.Tensor, last_layer: torch.Tensor,
                        max_weight: float = 1e4, eps: float = 1e-4) -> torch.Tensor:
    """Return ||d rec_loss / d last_layer|| / (||d gan_loss / d last_layer|| + eps), clamped to [0, max_weight].

    Both graphs are kept for the backward pass that follows; the result is detached.
    """
    rec_grad, = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)
    gan_grad, = torch.autograd.grad(gan_loss, last_layer, retain_graph=True)
    return (rec_grad.norm() / (gan_grad.norm() + eps)).clamp(0.0, max_weight).detach()


class GeneratorObjective:
    """Generator loss of the decoder. Terms whose weight is 0 or whose network is None are skipped and not reported."""

    def __init__(self, weights: LossWeights, perceptual: nn.Module | None = None,
                 discriminator: nn.Module | None = None):
        self.weights = weights
        self.perceptual = perceptual if weights.perceptual > 0 else None
        self.discriminator = discriminator if weights.gan > 0 else None

    @property
    def uses_gan(self) -> bool:
        return self.discriminator is not None

    def __call__(self, x_hat: torch.Tensor, x: torch.Tensor, last_layer: torch.Tensor | None = None,
                 gan_active: bool = True) -> tuple[torch.Tensor, dict[str, float]]:
        """Return the total loss and each term (unweighted) as floats.

        x_hat, x: (B, 3, H, W) in [-1, 1]. `last_layer` (the decoder's conv_out.weight) is needed when the GAN
        term is on; `gan_active=False` skips it, e.g. before a warm-up step.
        """
        terms: dict[str, float] = {}
        rec = x_hat.new_zeros(())
        if self.weights.l2 > 0:
            l2 = F.mse_loss(x_hat, x)
            rec = rec + self.weights.l2 * l2
            terms["l2"] = l2.detach()
        if self.perceptual is not None:
            lpips = self.perceptual(x_hat, x).mean()
            rec = rec + self.weights.perceptual * lpips
            terms["lpips"] = lpips.detach()

        total = rec
        if self.uses_gan and gan_active:
            gan = generator_gan_loss(self.discriminator, x_hat)
            weight = self._gan_weight(rec, gan, last_layer)
            total = total + weight * gan
            terms["gan"] = gan.detach()
            terms["gan_weight"] = weight.detach()
        terms["total"] = total.detach()
        return total, terms

    def _gan_weight(self, rec: torch.Tensor, gan: torch.Tensor, last_layer: torch.Tensor | None) -> torch.Tensor:
        """lambda_G times the adaptive ratio, or lambda_G alone when no reconstruction term is on."""
        if not rec.requires_grad:
            return gan.new_tensor(self.weights.gan)
        if last_layer is None:
            raise ValueError("the GAN term needs last_layer (the decoder's conv_out.weight) for its adaptive weight")
        ratio = adaptive_gan_weight(rec, gan, last_layer, self.weights.max_adaptive_weight, self.weights.eps)
        return self.weights.gan * ratio
