"""Batches of cached latents for substitution: shuffled per epoch, split across processes, resumable mid-epoch."""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterator, Protocol, Sequence

import torch
from torch.utils.data import DataLoader, Dataset

if TYPE_CHECKING:
    from cache import LatentCache


class LatentSource(Protocol):
    """Read interface of a latent cache as substitution uses it; `cache.open_cache` returns one."""

    keys: Sequence[str]

    def latents(self, keys: Sequence[str]) -> torch.Tensor: ...


class PreloadedLatents:
    """All latents of a cache held in memory (float16 by default), read shard by shard in one sequential pass.

    Random single-row reads from a Zarr store decode a whole chunk per row. Holding the set in memory avoids
    that, at about 16 KiB per 32x16x16 latent in float16 (21 GB for 1.28M samples).
    """

    def __init__(self, cache: "LatentCache", dtype: torch.dtype = torch.float16):
        keys: list[str] = []
        parts: list[torch.Tensor] = []
        for record in cache.shards:
            if record.written and record.count:
                shard_keys, latents = cache.read_shard(record.index)  # (n, C, h, w) float32
                keys.extend(shard_keys)
                parts.append(latents.to(dtype))
        self.keys = keys
        self._rows = {key: row for row, key in enumerate(keys)}
        self._latents = torch.cat(parts) if parts else torch.empty(0)

    def latents(self, keys: Sequence[str]) -> torch.Tensor:
        rows = torch.tensor([self._rows[k] for k in keys], dtype=torch.long)
        return self._latents[rows].float()


def epoch_order(num_samples: int, seed: int, epoch: int) -> torch.Tensor:
    """Return the sample order of one epoch, which is the same on every process and after a resume."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(num_samples, generator=generator)


class EpochBatches(Dataset):
    """This process's batches of one epoch from step `start` on, where item i is a (B, C, h, w) float32 tensor.

    Global batch s contains positions [s * B * P, (s + 1) * B * P) of the epoch order, for P processes of B
    samples, and process r takes the r-th slice of B. The partial global batch at the end of the epoch is
    dropped, so every process runs the same number of steps.
    """

    def __init__(
        self, source: LatentSource, order: torch.Tensor, batch_size: int, rank: int, world_size: int, start: int = 0
    ):
        self.source = source
        self.order = order
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.start = start
        self.steps = len(order) // (batch_size * world_size)

    def __len__(self) -> int:
        return max(self.steps - self.start, 0)

    def __getitem__(self, item: int) -> torch.Tensor:
        step = self.start + item
        first = (step * self.world_size + self.rank) * self.batch_size
        positions = self.order[first : first + self.batch_size].tolist()
        return self.source.latents([self.source.keys[p] for p in positions])


def steps_per_epoch(num_samples: int, batch_size: int, world_size: int) -> int:
    return num_samples // (batch_size * world_size)


def train_loader(
    source: LatentSource,
    *,
    batch_size: int,
    seed: int,
    epoch: int,
    start: int,
    rank: int,
    world_size: int,
    workers: int,
) -> DataLoader:
    """Return a loader over this process's batches of `epoch`, skipping the first `start` steps."""
    order = epoch_order(len(source.keys), seed, epoch)
    dataset = EpochBatches(source, order, batch_size, rank, world_size, start)
    # Each dataset item is already a whole batch read from the cache in one call, hence batch_size=None.
    return DataLoader(dataset, batch_size=None, shuffle=False, num_workers=workers, persistent_workers=False)


def eval_batches(
    source: LatentSource, *, batch_size: int, rank: int, world_size: int, limit: int | None = None
) -> Iterator[torch.Tensor]:
    """Yield this process's share of the evaluation latents (every `world_size`-th key), in store order.

    Every key goes to exactly one process, so sums reduced across processes count each sample once.
    """
    keys = list(source.keys)[:limit] if limit is not None else list(source.keys)
    mine = keys[rank::world_size]
    for first in range(0, len(mine), batch_size):
        yield source.latents(mine[first : first + batch_size])
