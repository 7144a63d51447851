"""Seeded tokenizer weights and inputs shared by the reference-numerics test and the fixture that test reads.

The fixture `data/var_reference_ch32.safetensors` contains outputs of the public VAR implementation
(FoundationVision/VAR, `models/vqvae.py`, `basic_vae.py`, `quant.py` at commit 78b9539) run on exactly these
weights and images: a width-32 VAR tokenizer (ch_mult 1,1,2,2,4, 4096 codes, 32 latent channels, 4 shared φ's)
on two 256×256 images. Only the numbers are stored; the weights are regenerated here from the seed and the key
list, so the fixture stays small.
"""

from __future__ import annotations

import zlib

import torch

from common.tokenizer import build_tokenizer

SEED = 20241204
REFERENCE_CONFIG = dict(ch=32, vocab_size=4096)


def reference_shapes() -> dict[str, tuple[int, ...]]:
    """Return the checkpoint key -> shape table of the width-32 VAR tokenizer (VAR's key names)."""
    return {k: tuple(v.shape) for k, v in build_tokenizer("var", **REFERENCE_CONFIG).var_state_dict().items()}


def seeded_tensor(key: str, shape: tuple[int, ...]) -> torch.Tensor:
    """Draw one tensor from a generator seeded by SEED and the key's CRC-32, scaled like a trained network."""
    gen = torch.Generator().manual_seed(SEED + zlib.crc32(key.encode()))
    noise = torch.randn(shape, generator=gen, dtype=torch.float64)
    if key.endswith("ema_vocab_hit_SV"):
        return torch.zeros(shape)
    if key.endswith("embedding.weight"):
        return (noise * 0.5).float()
    if len(shape) == 4:  # convolution weight: unit-variance outputs for unit-variance inputs
        fan_in = shape[1] * shape[2] * shape[3]
        return (noise / fan_in**0.5).float()
    if ".norm" in key and key.endswith(".weight"):
        return (1 + 0.1 * noise).float()
    return (0.05 * noise).float()


def seeded_state_dict() -> dict[str, torch.Tensor]:
    return {key: seeded_tensor(key, shape) for key, shape in sorted(reference_shapes().items())}


def seeded_images(count: int = 2, size: int = 256) -> torch.Tensor:
    """Return smooth random images in [−1, 1]: low-resolution noise upsampled, so every scale carries signal."""
    gen = torch.Generator().manual_seed(SEED)
    coarse = torch.rand(count, 3, size // 8, size // 8, generator=gen) * 2 - 1
    fine = torch.rand(count, 3, size, size, generator=gen) * 0.2 - 0.1
    up = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    return (up + fine).clamp(-1, 1)
