"""Frozen DINO ViT-S/16 discriminator with small trainable per-token heads, and its losses.

The backbone (timm `vit_small_patch16_224.dino`) never trains. Five taps read its tokens: after the patch
embedding (position embedding and CLS token included) and after blocks 2, 5, 8 and 11. At each tap the CLS
token is added to every patch token, and a head of spectral-normalised 1-D convolutions turns the tokens into one
logit each. The discriminator loss is the hinge loss on DiffAugment views of reals and fakes, plus consistency
regularisation against more strongly augmented copies and the LeCAM regulariser.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from adapt.augment import DEFAULT, STRONG, diff_augment
from common.tokenizer import CheckpointError, check_checkpoint_file
from common.weights import dino_vits16_file, require_weights

DINO_MODEL = "vit_small_patch16_224.dino"
DINO_BLOCKS = (2, 5, 8, 11)
INPUT_SIZE = 224
CROP_FRACTION = 224 / 256  # at 256 px this is the 224 px random crop
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class TokenHead(nn.Module):
    """Per-token logits from one tap: 1x1 conv, a residual k-wide conv block, 1x1 conv to one channel."""

    def __init__(self, dim: int, hidden: int = 64, kernel_size: int = 9):
        super().__init__()
        self.project = spectral_norm(nn.Conv1d(dim, hidden, 1))
        self.mix = spectral_norm(nn.Conv1d(hidden, hidden, kernel_size, padding=kernel_size // 2,
                                           padding_mode="circular"))
        self.logit = spectral_norm(nn.Conv1d(hidden, 1, 1))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = F.leaky_relu(self.project(tokens.transpose(1, 2)), 0.2)  # (B, hidden, N)
        h = (h + F.leaky_relu(self.mix(h), 0.2)) / math.sqrt(2)  # residual block, variance kept near 1
        return self.logit(h).squeeze(1)  # (B, N)


class DinoDiscriminator(nn.Module):
    """Frozen DINO ViT-S/16 features, trainable token heads, LeCAM running means of the logits."""

    def __init__(self, weights_file: str | Path | None = None, random_backbone: bool = False,
                 hidden: int = 64, crop_probability: float = 0.5):
        super().__init__()
        if weights_file is None and not random_backbone:
            raise ValueError("DinoDiscriminator needs weights_file (DINO ViT-S/16 weights) "
                             "unless random_backbone=True")
        overlay = None if random_backbone else dict(file=str(weights_file))
        if not random_backbone:
            check_checkpoint_file(weights_file)
        try:
            self.backbone = timm.create_model(DINO_MODEL, pretrained=not random_backbone, num_classes=0,
                                              pretrained_cfg_overlay=overlay)
        # NOTE: broad on purpose: timm and torch's unpickler report a corrupt file with assorted exception types.
        except Exception as err:
            raise CheckpointError(f"DINO ViT-S/16 weights {weights_file} could not be loaded (corrupt or not "
                                  f"{DINO_MODEL}?): {str(err).splitlines()[0]}; fix --dino-weights") from None
        self.backbone.requires_grad_(False)
        self.crop_probability = crop_probability
        dim = self.backbone.embed_dim
        self.heads = nn.ModuleList(TokenHead(dim, hidden) for _ in range(1 + len(DINO_BLOCKS)))
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))
        # LeCAM keeps exponential moving averages of the mean logit on reals and on fakes.
        self.register_buffer("ema_real", torch.zeros(()))
        self.register_buffer("ema_fake", torch.zeros(()))

    def train(self, mode: bool = True) -> "DinoDiscriminator":
        super().train(mode)
        self.backbone.eval()  # frozen: no dropout or drop-path, whatever the parent's mode
        return self

    def to_backbone_input(self, x: torch.Tensor) -> torch.Tensor:
        """Map (B, 3, H, W) in [-1, 1] to (B, 3, 224, 224) ImageNet-normalised: random crop or resize per image."""
        resized = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", antialias=True,
                                align_corners=False)
        cropped = F.interpolate(random_crops(x, CROP_FRACTION), size=(INPUT_SIZE, INPUT_SIZE),
                                mode="bilinear", antialias=True, align_corners=False)
        use_crop = torch.rand(x.shape[0], 1, 1, 1, device=x.device) < self.crop_probability
        x = torch.where(use_crop, cropped, resized)
        return ((x + 1) / 2 - self.mean) / self.std

    def tap_tokens(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Return the patch tokens plus CLS at each tap, (B, N, D) each, from backbone-ready input."""
        vit = self.backbone
        # NOTE: timm 1.0.31's forward_intermediates cannot return the tokens before the first block, so the blocks
        # run here; a test checks these taps against forward_intermediates.
        h = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(x))))  # (B, 1 + N, D)
        taps = [h]
        for index, block in enumerate(vit.blocks[: max(DINO_BLOCKS) + 1]):
            h = block(h)
            if index in DINO_BLOCKS:
                taps.append(h)
        prefix = vit.num_prefix_tokens
        return [t[:, prefix:] + t[:, :1] for t in taps]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Return per-token logits of every tap, a list of (B, N); x is (B, 3, H, W) in [-1, 1]."""
        tokens = self.tap_tokens(self.to_backbone_input(x))
        return [head(t) for head, t in zip(self.heads, tokens)]


def random_crops(x: torch.Tensor, fraction: float) -> torch.Tensor:
    """Cut one square of side `fraction` of the image at a random place in each image."""
    b, _, h, w = x.shape
    size_y, size_x = round(h * fraction), round(w * fraction)
    tops = torch.randint(0, h - size_y + 1, (b,)).tolist()
    lefts = torch.randint(0, w - size_x + 1, (b,)).tolist()
    return torch.stack([img[:, t:t + size_y, l:l + size_x] for img, t, l in zip(x, tops, lefts)])


def hinge_discriminator_loss(real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """Hinge loss mean(relu(1 - D(real))) + mean(relu(1 + D(fake)))."""
    return F.relu(1 - real).mean() + F.relu(1 + fake).mean()


def hinge_generator_loss(fake: torch.Tensor) -> torch.Tensor:
    """Generator side of the hinge loss, -mean(D(fake))."""
    return -fake.mean()


def lecam_penalty(real: torch.Tensor, fake: torch.Tensor, ema_real: torch.Tensor,
                  ema_fake: torch.Tensor) -> torch.Tensor:
    """LeCAM regulariser: mean(relu(D(real) - ema_fake)^2) + mean(relu(ema_real - D(fake))^2)."""
    return F.relu(real - ema_fake).pow(2).mean() + F.relu(ema_real - fake).pow(2).mean()


@torch.no_grad()
def update_lecam_ema(disc: DinoDiscriminator, real: torch.Tensor, fake: torch.Tensor, decay: float) -> None:
    """Move the running mean logits on reals and fakes towards this batch's means."""
    disc.ema_real.mul_(decay).add_(real.detach().mean(), alpha=1 - decay)
    disc.ema_fake.mul_(decay).add_(fake.detach().mean(), alpha=1 - decay)


@dataclass
class DiscriminatorLossConfig:
    """Weights of the discriminator's regularisers."""

    consistency_weight: float = 4.0
    lecam_weight: float = 0.001
    lecam_decay: float = 0.999


def all_logits(disc: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Return the logits of all taps concatenated, (B, taps * N); `disc` may be wrapped for DDP."""
    return torch.cat(disc(x), dim=1)


def discriminator_loss(disc: nn.Module, real: torch.Tensor, fake: torch.Tensor,
                       config: DiscriminatorLossConfig = DiscriminatorLossConfig()
                       ) -> tuple[torch.Tensor, dict[str, float]]:
    """Return the discriminator's loss on one batch and its terms; updates the LeCAM means.

    real, fake: (B, 3, H, W) in [-1, 1]; fake is detached here. Reals and fakes each get a DiffAugment view
    (hinge loss) and a strongly augmented view (consistency), all four in one backbone pass. `disc` is a
    DinoDiscriminator or its DDP wrapper, called through its forward so DDP synchronises the head gradients.
    """
    module = getattr(disc, "module", disc)
    fake = fake.detach()
    views = torch.cat([diff_augment(real, DEFAULT), diff_augment(fake, DEFAULT),
                       diff_augment(real, STRONG), diff_augment(fake, STRONG)])
    real_logits, fake_logits, real_strong, fake_strong = all_logits(disc, views).chunk(4)  # (B, taps * N) each

    hinge = hinge_discriminator_loss(real_logits, fake_logits)
    consistency = F.mse_loss(real_strong, real_logits) + F.mse_loss(fake_strong, fake_logits)
    lecam = lecam_penalty(real_logits, fake_logits, module.ema_real, module.ema_fake)
    update_lecam_ema(module, real_logits, fake_logits, config.lecam_decay)
    total = hinge + config.consistency_weight * consistency + config.lecam_weight * lecam

    stats = {"d_hinge": hinge.detach(), "d_consistency": consistency.detach(), "d_lecam": lecam.detach(),
             "d_real": real_logits.detach().mean(), "d_fake": fake_logits.detach().mean()}
    return total, stats


def generator_gan_loss(disc: nn.Module, fake: torch.Tensor) -> torch.Tensor:
    """Hinge generator loss on a DiffAugment view of the reconstructions (gradients reach `fake`)."""
    return hinge_generator_loss(all_logits(disc, diff_augment(fake, DEFAULT)))


def load_discriminator(weights_file: str | Path | None = None, random_backbone: bool = False,
                       hidden: int = 64) -> DinoDiscriminator:
    """Build the discriminator from the local DINO ViT-S/16 file that `common.weights` resolves."""
    if random_backbone:
        return DinoDiscriminator(random_backbone=True, hidden=hidden)
    weight_file = dino_vits16_file(weights_file)
    require_weights(weight_file)
    return DinoDiscriminator(weight_file.path, hidden=hidden)
