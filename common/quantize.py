"""Quantizer layouts shared by the native VAR quantizer and the transplanted ones.

A layout decides *where* vectors are quantized: VAR's multi-scale residual pyramid, or G channel groups at full
resolution. A `Codebook` decides *how*: the nearest code, plus whatever loss or update its algorithm adds. The native
VAR quantizer is `MultiScaleQuantizer(Codebook(...))` with VAR's parameter names, so a VAR checkpoint loads into
it strictly; the quantizers in `substitute.quantizers` are the same layouts with other codebooks.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

VAR_PATCH_NUMS = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
# Weights of the per-scale VQ loss in the multi-scale transplant: later (finer) scales count more.
VAR_SCALE_WEIGHTS = (1, 1, 1, 2, 2, 2, 3, 3, 5, 5)

# Rows of the (N, K) distance matrix computed at once: 4096 x 65536 float32 distances are 1 GiB, so lookups stay
# bounded however large the batch is.
LOOKUP_BLOCK_ROWS = 4096


@dataclass
class Segment:
    """A run of columns of the index tensor: one scale (multi-scale) or one channel group (fixed-scale)."""

    name: str
    tokens: int
    codebook: int  # position in `quantizer.codebooks()`


@dataclass
class QuantizerOutput:
    z_q: torch.Tensor  # (B, C, H, W); the value is quantized, the gradient goes straight through to the input
    indices: torch.Tensor  # (B, T) int64, segments concatenated in `quantizer.segments` order
    loss: torch.Tensor  # scalar: the layout's VQ loss plus the codebook's own term
    # Detached scalar tensors for logging. The training loops convert them to floats only at log steps, so other
    # steps do not wait on the device.
    stats: dict[str, torch.Tensor] = field(default_factory=dict)


class Codebook(nn.Module):
    """K code vectors of dimension d with nearest-neighbour lookup: VAR's native codebook.

    Subclasses change how the codes learn by overriding `codebook_loss` (a loss term added to the layout's) and
    `update` (an in-place update under no_grad, for EMA or dead-code re-seeding).
    """

    def __init__(self, size: int, dim: int):
        super().__init__()
        self.size = size
        self.dim = dim
        self.embedding = nn.Embedding(size, dim)

    @property
    def weight(self) -> torch.Tensor:
        return self.embedding.weight

    @torch.no_grad()
    def lookup(self, x: torch.Tensor) -> torch.Tensor:
        """Return the index of the nearest code (squared L2) for each row of x (N, d)."""
        codes = self.embedding.weight.float()
        code_sq = codes.square().sum(dim=1)  # (K,)
        out = torch.empty(x.shape[0], dtype=torch.long, device=x.device)
        for start in range(0, x.shape[0], LOOKUP_BLOCK_ROWS):
            rows = x[start : start + LOOKUP_BLOCK_ROWS].float()
            # ||x||² is constant per row, so argmin over ||e||² − 2 x·e gives the same index.
            dist = torch.addmm(code_sq, rows, codes.t(), beta=1, alpha=-2)  # (n, K)
            out[start : start + rows.shape[0]] = dist.argmin(dim=1)
        return out

    def embed(self, indices: torch.Tensor) -> torch.Tensor:
        return self.embedding(indices)

    def codebook_loss(self, features: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """Return this codebook's own loss term for the detached features (N, d) quantized in one forward."""
        return features.new_zeros(())

    @torch.no_grad()
    def update(self, features: torch.Tensor, indices: torch.Tensor) -> None:
        """Update the codes in place after a training lookup; the plain codebook learns by gradient only."""


class Phi(nn.Conv2d):
    """VAR's residual refinement φ(h) = (1 − r)·h + r·conv3x3(h), with r = 0.5."""

    def __init__(self, dim: int, ratio: float = 0.5):
        super().__init__(dim, dim, kernel_size=3, padding=1)
        self.ratio = ratio

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h * (1 - self.ratio) + super().forward(h) * self.ratio


class SharedPhis(nn.Module):
    """A few φ's shared by many scales: scale k of K uses the φ whose tick is nearest to k / (K − 1).

    With 4 φ's the ticks are 4 evenly spaced points from 1/12 to 11/12 (VAR's choice). Other counts use evenly
    spaced midpoints 1/(2n) … 1 − 1/(2n). Ticks and distances are computed with numpy in float64 exactly as VAR
    does, because scale 2 of 10 lies halfway between two ticks and the rounding decides which φ it gets.
    """

    def __init__(self, dim: int, count: int = 4, ratio: float = 0.5):
        super().__init__()
        self.qresi_ls = nn.ModuleList(Phi(dim, ratio) for _ in range(count))
        edge = 1 / 3 / count if count == 4 else 1 / 2 / count
        self.ticks = np.linspace(edge, 1 - edge, count)

    def index_for(self, scale: int, num_scales: int) -> int:
        at = scale / (num_scales - 1) if num_scales > 1 else 0.0
        return int(np.argmin(np.abs(self.ticks - at)))

    def forward(self, h: torch.Tensor, scale: int, num_scales: int) -> torch.Tensor:
        return self.qresi_ls[self.index_for(scale, num_scales)](h)


class MultiScaleQuantizer(nn.Module):
    """VAR's multi-scale residual quantizer over a square latent grid.

    At each scale the residual is area-downsampled to pn×pn and every vector takes its nearest code. The code map
    is bicubically upsampled back (the last scale is used as is) and refined by φ. The result is added to the
    running sum and subtracted from the residual. Indices of all scales are concatenated: sum(pn²) tokens per image.
    """

    def __init__(
        self,
        codebook: Codebook,
        patch_nums: tuple[int, ...] = VAR_PATCH_NUMS,
        num_phi: int = 4,
        phi_ratio: float = 0.5,
        scale_weights: tuple[float, ...] | None = None,
        beta: float = 0.0,
    ):
        super().__init__()
        if scale_weights is not None and len(scale_weights) != len(patch_nums):
            raise ValueError(
                f"scale_weights has {len(scale_weights)} entries but patch_nums has {len(patch_nums)} scales"
            )
        self.codebook = codebook
        self.patch_nums = tuple(int(p) for p in patch_nums)
        self.quant_resi = SharedPhis(codebook.dim, num_phi, phi_ratio)
        self.scale_weights = tuple(float(w) for w in (scale_weights or (1.0,) * len(patch_nums)))
        self.beta = beta  # commitment weight; only matters when the encoder trains (from-scratch runs)
        self.segments = [Segment(f"scale{pn}", pn * pn, 0) for pn in self.patch_nums]

    @property
    def codebook_size(self) -> int:
        return self.codebook.size

    @property
    def dim(self) -> int:
        return self.codebook.dim

    def codebooks(self) -> list[Codebook]:
        return [self.codebook]

    def _check_input(self, z: torch.Tensor) -> None:
        if z.ndim != 4 or z.shape[1] != self.dim:
            raise ValueError(f"expected latents of shape (B, {self.dim}, H, W), got {tuple(z.shape)}")
        side = self.patch_nums[-1]
        if z.shape[2] != side or z.shape[3] != side:
            raise ValueError(
                f"latent grid is {z.shape[2]}x{z.shape[3]} but the last scale of patch_nums is {side}x{side}"
            )

    def _scale_step(self, rest: torch.Tensor, scale: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Quantize one scale of the residual; return (h, indices (B, pn²), vectors (B·pn², C))."""
        B, C, H, W = rest.shape
        pn = self.patch_nums[scale]
        last = scale == len(self.patch_nums) - 1
        small = rest if last else F.interpolate(rest, size=(pn, pn), mode="area")
        vectors = small.permute(0, 2, 3, 1).reshape(-1, C)  # (B·pn², C)
        idx = self.codebook.lookup(vectors)
        code_map = self.codebook.embed(idx).view(B, pn, pn, C).permute(0, 3, 1, 2)  # (B, C, pn, pn)
        if not last:
            code_map = F.interpolate(code_map, size=(H, W), mode="bicubic")
        h = self.quant_resi(code_map.contiguous(), scale, len(self.patch_nums))
        return h, idx.view(B, pn * pn), vectors

    @torch.no_grad()
    def quantize(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the quantized latents (B, C, H, W) and the indices (B, Σpn²) of z."""
        self._check_input(z)
        z = z.float()
        rest = z.clone()
        z_q = torch.zeros_like(z)
        all_idx = []
        for scale in range(len(self.patch_nums)):
            h, idx, _ = self._scale_step(rest, scale)
            z_q.add_(h)
            rest.sub_(h)
            all_idx.append(idx)
        return z_q, torch.cat(all_idx, dim=1)

    @torch.no_grad()
    def dequantize(self, indices: torch.Tensor) -> torch.Tensor:
        """Rebuild the quantized latents (B, C, H, W) from indices (B, Σpn²)."""
        B = indices.shape[0]
        side = self.patch_nums[-1]
        z_q = torch.zeros(B, self.dim, side, side, device=indices.device)
        for scale, chunk in enumerate(indices.split([s.tokens for s in self.segments], dim=1)):
            pn = self.patch_nums[scale]
            code_map = self.codebook.embed(chunk).view(B, pn, pn, self.dim).permute(0, 3, 1, 2).float()
            if scale != len(self.patch_nums) - 1:
                code_map = F.interpolate(code_map, size=(side, side), mode="bicubic")
            z_q.add_(self.quant_resi(code_map.contiguous(), scale, len(self.patch_nums)))
        return z_q

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        """Quantize z for training: codebook and φ's get gradients through the per-scale VQ loss."""
        self._check_input(z)
        z = z.float()
        target = z.detach()
        rest = target.clone()
        z_q = torch.zeros_like(target)
        all_idx, all_vectors = [], []
        vq_loss = target.new_zeros(())
        for scale, weight in enumerate(self.scale_weights):
            h, idx, vectors = self._scale_step(rest, scale)
            z_q = z_q + h
            rest = rest - h.detach()
            # MSE of the running sum against the (frozen) encoder latents, weighted per scale. The commitment
            # term moves the encoder toward the running sum when the encoder trains.
            vq_loss = vq_loss + weight * F.mse_loss(z_q, target)
            if self.beta:
                vq_loss = vq_loss + weight * self.beta * F.mse_loss(z_q.detach(), z)
            all_idx.append(idx)
            all_vectors.append(vectors)
        vq_loss = vq_loss / sum(self.scale_weights)

        indices = torch.cat(all_idx, dim=1)
        features = torch.cat(all_vectors, dim=0).detach()  # every vector quantized in this forward, all scales
        flat_idx = torch.cat([i.reshape(-1) for i in all_idx])
        code_loss = self.codebook.codebook_loss(features, flat_idx)
        if self.training:
            self.codebook.update(features, flat_idx)

        stats = {"vq_loss": vq_loss.detach(), "codebook_loss": code_loss.detach()}
        return QuantizerOutput(_straight_through(z, z_q), indices, vq_loss + code_loss, stats)


class FixedScaleQuantizer(nn.Module):
    """Split the channels into G equal groups and quantize each at full resolution with its own codebook."""

    def __init__(self, codebooks: list[Codebook], grid: int = 16, beta: float = 0.0):
        super().__init__()
        self.beta = beta
        if len({cb.dim for cb in codebooks}) != 1 or len({cb.size for cb in codebooks}) != 1:
            raise ValueError("all codebooks of a fixed-scale quantizer need the same size and dimension")
        self.groups = nn.ModuleList(codebooks)
        self.grid = grid
        self.segments = [Segment(f"group{g}", grid * grid, g) for g in range(len(codebooks))]

    @property
    def codebook_size(self) -> int:
        return self.groups[0].size

    @property
    def dim(self) -> int:
        return self.groups[0].dim * len(self.groups)

    def codebooks(self) -> list[Codebook]:
        return list(self.groups)

    def _check_input(self, z: torch.Tensor) -> None:
        if z.ndim != 4 or z.shape[1] != self.dim or z.shape[2] != self.grid or z.shape[3] != self.grid:
            raise ValueError(f"expected latents of shape (B, {self.dim}, {self.grid}, {self.grid}), got {tuple(z.shape)}")

    def _group_vectors(self, z: torch.Tensor) -> list[torch.Tensor]:
        B, C, H, W = z.shape
        return [part.permute(0, 2, 3, 1).reshape(-1, C // len(self.groups)) for part in z.chunk(len(self.groups), 1)]

    def _assemble(self, parts: list[torch.Tensor], shape: torch.Size) -> torch.Tensor:
        B, C, H, W = shape
        maps = [p.view(B, H, W, -1).permute(0, 3, 1, 2) for p in parts]
        return torch.cat(maps, dim=1).contiguous()

    @torch.no_grad()
    def quantize(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the quantized latents (B, C, H, W) and the indices (B, G·H·W) of z."""
        self._check_input(z)
        z = z.float()
        vectors = self._group_vectors(z)
        idx = [cb.lookup(v) for cb, v in zip(self.groups, vectors)]
        parts = [cb.embed(i).float() for cb, i in zip(self.groups, idx)]
        B = z.shape[0]
        return self._assemble(parts, z.shape), torch.cat([i.view(B, -1) for i in idx], dim=1)

    @torch.no_grad()
    def dequantize(self, indices: torch.Tensor) -> torch.Tensor:
        B = indices.shape[0]
        chunks = indices.split([s.tokens for s in self.segments], dim=1)
        parts = [cb.embed(c.reshape(-1)).float() for cb, c in zip(self.groups, chunks)]
        return self._assemble(parts, torch.Size((B, self.dim, self.grid, self.grid)))

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        self._check_input(z)
        z = z.float()
        target = z.detach()
        B = z.shape[0]
        parts, all_idx = [], []
        code_loss = target.new_zeros(())
        for cb, vectors in zip(self.groups, self._group_vectors(target)):
            idx = cb.lookup(vectors)
            parts.append(cb.embed(idx))
            all_idx.append(idx.view(B, -1))
            code_loss = code_loss + cb.codebook_loss(vectors, idx)
            if self.training:
                cb.update(vectors, idx)
        z_q = self._assemble(parts, z.shape)
        vq_loss = F.mse_loss(z_q, target)
        if self.beta:
            vq_loss = vq_loss + self.beta * F.mse_loss(z_q.detach(), z)
        stats = {"vq_loss": vq_loss.detach(), "codebook_loss": code_loss.detach()}
        return QuantizerOutput(_straight_through(z, z_q), torch.cat(all_idx, dim=1), vq_loss + code_loss, stats)


def _straight_through(z: torch.Tensor, z_q: torch.Tensor) -> torch.Tensor:
    """Return z_q's value with z's gradient when the encoder trains; z_q itself (codebook graph) otherwise."""
    if not z.requires_grad:
        return z_q
    return z + (z_q - z).detach()


def usage_counts(quantizer: nn.Module, indices: torch.Tensor) -> torch.Tensor:
    """Count how often each code appears in each segment: (S, K) int64 for indices (B, T)."""
    chunks = indices.split([s.tokens for s in quantizer.segments], dim=1)
    return torch.stack([c.reshape(-1).bincount(minlength=quantizer.codebook_size) for c in chunks])
