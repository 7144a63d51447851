"""Differentiable augmentations for the discriminator (DiffAugment: colour, translation, cutout).

Every operation is differentiable with respect to the image, so the generator receives gradients through the
same augmentations the discriminator is trained on (Zhao et al., "Differentiable Augmentation for Data-Efficient
GAN Training", 2020). Images are (B, 3, H, W) in [-1, 1], and each image draws its own random parameters.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class AugmentStrength:
    """Parameters of one augmentation policy."""

    translation: float = 0.125  # maximum shift as a fraction of the image side
    cutout: float = 0.5  # side of the erased square as a fraction of the image side
    brightness: float = 0.5  # additive shift drawn from U(-brightness, brightness)
    saturation: float = 1.0  # multiplier drawn from U(1 - saturation, 1 + saturation)
    contrast: float = 0.5  # multiplier drawn from U(1 - contrast, 1 + contrast)


DEFAULT = AugmentStrength()
# Consistency regularisation compares logits on the DiffAugment view with logits on a harder view.
STRONG = AugmentStrength(translation=0.25, cutout=0.6, brightness=0.6, saturation=1.0, contrast=0.6)


def _uniform(x: torch.Tensor, low: float, high: float) -> torch.Tensor:
    return torch.empty(x.shape[0], 1, 1, 1, device=x.device, dtype=x.dtype).uniform_(low, high)


def adjust_colour(x: torch.Tensor, strength: AugmentStrength) -> torch.Tensor:
    """Random brightness shift, then saturation and contrast scaling around per-image means."""
    x = x + _uniform(x, -strength.brightness, strength.brightness)
    grey = x.mean(dim=1, keepdim=True)  # (B, 1, H, W)
    x = grey + (x - grey) * _uniform(x, 1 - strength.saturation, 1 + strength.saturation)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)  # (B, 1, 1, 1)
    return mean + (x - mean) * _uniform(x, 1 - strength.contrast, 1 + strength.contrast)


def translate(x: torch.Tensor, ratio: float) -> torch.Tensor:
    """Shift each image by a whole number of pixels up to `ratio` of its side, filling with zeros."""
    b, _, h, w = x.shape
    max_dy, max_dx = int(h * ratio + 0.5), int(w * ratio + 0.5)
    dy = torch.randint(-max_dy, max_dy + 1, (b, 1, 1), device=x.device)
    dx = torch.randint(-max_dx, max_dx + 1, (b, 1, 1), device=x.device)
    rows = torch.arange(h, device=x.device).view(1, h, 1) - dy  # (B, H, 1) source row of each output row
    cols = torch.arange(w, device=x.device).view(1, 1, w) - dx  # (B, 1, W)
    inside = (rows >= 0) & (rows < h) & (cols >= 0) & (cols < w)  # (B, H, W)
    flat = rows.clamp(0, h - 1) * w + cols.clamp(0, w - 1)  # (B, H, W)
    gathered = x.flatten(2).gather(2, flat.flatten(1).unsqueeze(1).expand(-1, x.shape[1], -1))
    return gathered.view_as(x) * inside.unsqueeze(1)


def cutout(x: torch.Tensor, ratio: float) -> torch.Tensor:
    """Zero one square of side `ratio` of the image at a random centre in each image."""
    b, _, h, w = x.shape
    size_y, size_x = int(h * ratio + 0.5), int(w * ratio + 0.5)
    cy = torch.randint(0, h, (b, 1, 1), device=x.device)
    cx = torch.randint(0, w, (b, 1, 1), device=x.device)
    top, left = cy - size_y // 2, cx - size_x // 2  # may lie outside the image: the square is then clipped
    rows = torch.arange(h, device=x.device).view(1, h, 1)
    cols = torch.arange(w, device=x.device).view(1, 1, w)
    erased = (rows >= top) & (rows < top + size_y) & (cols >= left) & (cols < left + size_x)  # (B, H, W)
    return x * (~erased).unsqueeze(1).to(x.dtype)


def diff_augment(x: torch.Tensor, strength: AugmentStrength = DEFAULT) -> torch.Tensor:
    """Apply colour, translation and cutout with fresh random parameters per image."""
    x = adjust_colour(x, strength)
    x = translate(x, strength.translation)
    return cutout(x, strength.cutout)
