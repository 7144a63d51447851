"""Synthetic benchmark: how well do Wasserstein and MMD codebooks fit a two-component Gaussian mixture?

    python -m substitute.synthetic                      # separations 0, 2, 4; Wasserstein and MMD
    python -m substitute.synthetic --separations 0 8 --kinds wasserstein mmd vanilla

Features are d-dimensional draws from an equal mixture of N(-zeta/2 e1, I) and N(+zeta/2 e1, I), where e1 is the
first unit vector, so zeta is the distance between the two means. Each codebook kind is trained as a single
full-resolution codebook (the fixed-scale layout on 1x1 latents) on fresh batches, then E and U are measured on a
held-out sample. The Gaussian W2 term depends only on the mean and covariance, so for large zeta it is expected to
pull codes into the empty gap between the components, while MMD follows the two modes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from common.config import parse_config
from substitute.metrics import quantization_stats
from substitute.quantizers import CODEBOOKS, build_quantizer


@dataclass
class SyntheticConfig:
    """Train codebooks on a two-component Gaussian mixture and report E and U per separation."""

    separations: tuple[float, ...] = field(
        default=(0.0, 2.0, 4.0), metadata={"help": "distances zeta between the means"}
    )
    kinds: tuple[str, ...] = field(
        default=("wasserstein", "mmd"), metadata={"help": "codebook kinds to train", "choices": sorted(CODEBOOKS)}
    )
    dim: int = field(default=8, metadata={"help": "feature dimension d"})
    codebook_size: int = field(default=256, metadata={"help": "codes K"})
    steps: int = field(default=200, metadata={"help": "optimizer steps per codebook"})
    batch_size: int = field(default=1024, metadata={"help": "feature vectors per step"})
    eval_size: int = field(default=8192, metadata={"help": "held-out feature vectors for E and U"})
    lr: float = field(default=1e-2, metadata={"help": "constant AdamW learning rate"})
    seed: int = field(default=0, metadata={"help": "seed of data and initialisation"})


def sample_mixture(n: int, dim: int, separation: float, generator: torch.Generator) -> torch.Tensor:
    """Draw n vectors (n, dim) from the equal two-component mixture with means at -/+ separation/2 along e1."""
    samples = torch.randn(n, dim, generator=generator)
    signs = torch.randint(0, 2, (n,), generator=generator).float() * 2.0 - 1.0
    samples[:, 0] += signs * separation / 2.0
    return samples


def as_latents(vectors: torch.Tensor) -> torch.Tensor:
    """View feature vectors (n, d) as 1x1 latents (n, d, 1, 1), the shape the quantizer layouts take."""
    return vectors[:, :, None, None]


def train_codebook(cfg: SyntheticConfig, kind: str, separation: float) -> dict[str, float]:
    """Train one codebook kind on the mixture and return its E and U on held-out samples."""
    torch.manual_seed(cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed)
    quantizer = build_quantizer(
        kind, layout="fixed", codebook_size=cfg.codebook_size, dim=cfg.dim, groups=1, patch_nums=(1,)
    )
    trainable = [p for p in quantizer.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=0.0) if trainable else None

    # Fresh samples every step, so the codebook fits the distribution rather than a fixed training set.
    quantizer.train()
    for _ in range(cfg.steps):
        batch = as_latents(sample_mixture(cfg.batch_size, cfg.dim, separation, generator))  # (B, d, 1, 1)
        loss = quantizer(batch).loss
        if optimizer is not None:
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

    # Held-out evaluation with the same E and U as substitution runs report.
    quantizer.eval()
    held_out = as_latents(sample_mixture(cfg.eval_size, cfg.dim, separation, generator))
    return quantization_stats(quantizer, held_out.split(4096))


def main(cfg: SyntheticConfig) -> list[dict]:

    # Every kind at every separation, each from the same seed.
    rows = []
    for separation in cfg.separations:
        for kind in cfg.kinds:
            stats = train_codebook(cfg, kind, separation)
            rows.append({"separation": separation, "kind": kind, "E": stats["E"], "U": stats["U"]})
            print(f"zeta={separation:<5g} {kind:<12} E={stats['E']:.4f}  U={100 * stats['U']:6.2f}%", flush=True)
    return rows


if __name__ == "__main__":
    main(parse_config(SyntheticConfig))
