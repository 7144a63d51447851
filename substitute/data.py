"""Batches of cached latents for substitution, read shard by shard: shuffled per epoch, dealt to processes and
loader workers, resumable mid-epoch.

Random single-row reads from a Zarr store decode a whole chunk per row, so training reads whole shards instead.
Each epoch shuffles the shard order, deals the shards round-robin to the processes, groups each process's shards
into windows of a few shards, shuffles the rows within each window and cuts the window stream into batches.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable, Iterator, Protocol, Sequence

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

if TYPE_CHECKING:
    from cache import LatentCache

class LatentSource(Protocol):
    """Read interface of a latent cache as substitution uses it; `cache.open_cache` returns one."""

    keys: Sequence[str]

    def latents(self, keys: Sequence[str]) -> torch.Tensor: ...

    def read_shard(self, shard: int) -> tuple[list[str], torch.Tensor]: ...


class PreloadedLatents:
    """All latents of a cache held in memory, read shard by shard in one sequential pass.

    It keeps the shard boundaries, so training reads it in the same order as the store it came from. The latents
    stay in the cache's stored dtype unless `dtype` is given, so training gets the same values as a streamed run.
    A 32x16x16 latent costs 32 KiB in float32 (42 GB for 1.28M samples) and 16 KiB in float16.
    """

    def __init__(self, cache: "LatentCache", dtype: torch.dtype | None = None):
        dtype = dtype or getattr(torch, cache.dtype)
        keys: list[str] = []
        parts: list[torch.Tensor] = []
        self._bounds: list[tuple[int, int]] = []  # rows [begin, end) of each shard of the cache
        for record in cache.shards:
            begin = len(keys)
            if record.written and record.count:
                shard_keys, latents = cache.read_shard(record.index)  # (n, C, h, w) float32
                keys.extend(shard_keys)
                parts.append(latents.to(dtype))
            self._bounds.append((begin, len(keys)))
        self.keys = keys
        self._rows = {key: row for row, key in enumerate(keys)}
        self._latents = torch.cat(parts) if parts else torch.empty(0)

    def shard_rows(self) -> list[int]:
        return [end - begin for begin, end in self._bounds]

    def latents(self, keys: Sequence[str]) -> torch.Tensor:
        rows = torch.tensor([self._rows[k] for k in keys], dtype=torch.long)
        return self._latents[rows].float()

    def read_shard(self, shard: int) -> tuple[list[str], torch.Tensor]:
        begin, end = self._bounds[shard]
        return self.keys[begin:end], self._latents[begin:end].float()


def shard_sizes(source: LatentSource) -> list[int]:
    """Return the number of readable rows of every shard of the source (0 for a shard not written)."""
    own = getattr(source, "shard_rows", None)
    if callable(own):
        return list(own())
    # A LatentCache: a key repeated in a later shard is read from its first shard only, so count keys by shard.
    counts = [0] * len(source.shards)
    slot = source.layout.slot
    for key in source.keys:
        counts[source.row_of(key) // slot] += 1
    return counts


def _seed(*parts: int) -> int:
    """Mix integers into one generator seed that fits in 63 bits."""
    value = 0
    for part in parts:
        value = (value * 1_000_003 + part) % (1 << 63)
    return value


@dataclass
class EpochWindows:
    """One process's share of an epoch: windows of shard indices, their row counts and their shuffle seeds."""

    windows: list[list[int]]
    rows: list[int]
    seeds: list[int]


def epoch_windows(
    sizes: Sequence[int], *, seed: int, epoch: int, rank: int, world_size: int, window: int
) -> EpochWindows:
    """Deal the epoch's shuffled shards round-robin to processes and group this process's into windows.

    The shard order depends only on seed and epoch, so every process and every resumed run computes the same.
    """
    order = torch.randperm(len(sizes), generator=torch.Generator().manual_seed(_seed(seed, epoch))).tolist()
    mine = [s for s in order if sizes[s] > 0][rank::world_size]
    windows = [mine[i : i + window] for i in range(0, len(mine), window)]
    rows = [sum(sizes[s] for s in w) for w in windows]
    seeds = [_seed(seed, epoch, rank, i) for i in range(len(windows))]
    return EpochWindows(windows, rows, seeds)


def steps_per_epoch(sizes: Sequence[int], batch_size: int, world_size: int) -> int:
    """Return the steps of an epoch that every process can run, whatever shards the shuffle deals it.

    Each process gets at least floor(S / P) of the S shards, and at worst the smallest ones, so it has at least
    their rows. When the shards are not equally many per process or not equally large, each epoch leaves out the
    rows above that bound (different ones every epoch).
    """
    nonempty = sorted(n for n in sizes if n > 0)
    return sum(nonempty[: len(nonempty) // world_size]) // batch_size


class ShardWindows(IterableDataset):
    """Shuffled rows of one window of shards per item, (n, C, h, w) float32; loader worker k takes windows k, k+W, ...

    The DataLoader returns the items of its workers in turn, so the windows arrive in order for any worker count.
    """

    def __init__(self, source: LatentSource, windows: list[list[int]], seeds: list[int]):
        self.source = source
        self.windows = windows
        self.seeds = seeds

    def __iter__(self) -> Iterator[torch.Tensor]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for i in range(worker, len(self.windows), workers):
            rows = torch.cat([self.source.read_shard(s)[1] for s in self.windows[i]])  # (n, C, h, w)
            order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(self.seeds[i]))
            yield rows[order]


def rebatch(windows: Iterable[torch.Tensor], batch_size: int, skip: int, steps: int) -> Iterator[torch.Tensor]:
    """Cut a stream of row windows into batches of `batch_size`, after dropping its first `skip` rows.

    Yields at most `steps` batches; rows left over at the end of the stream are dropped.
    """
    yielded = 0
    leftover = None
    for rows in windows:
        rows = rows[skip:]
        skip = 0
        if leftover is not None and len(leftover):
            rows = torch.cat([leftover, rows])
        offset = 0
        while len(rows) - offset >= batch_size:
            if yielded >= steps:
                return
            yield rows[offset : offset + batch_size]  # (B, C, h, w)
            offset += batch_size
            yielded += 1
        leftover = rows[offset:]


def train_loader(
    source: LatentSource,
    *,
    batch_size: int,
    seed: int,
    epoch: int,
    start: int,
    steps: int,
    rank: int,
    world_size: int,
    workers: int,
    window: int,
) -> Iterator[torch.Tensor]:
    """Yield this process's batches (B, C, h, w) of `epoch` from step `start` to step `steps`.

    Windows that lie wholly before `start` are never read, so resuming costs at most one window of reading.
    """
    plan = epoch_windows(shard_sizes(source), seed=seed, epoch=epoch, rank=rank, world_size=world_size, window=window)
    skip, first = start * batch_size, 0
    while first < len(plan.windows) and plan.rows[first] <= skip:
        skip -= plan.rows[first]
        first += 1
    dataset = ShardWindows(source, plan.windows[first:], plan.seeds[first:])
    workers = min(workers, len(dataset.windows))
    # Each item is already a whole window of rows, hence batch_size=None.
    loader = DataLoader(dataset, batch_size=None, num_workers=workers, persistent_workers=False)
    return rebatch(loader, batch_size, skip, steps - start)


def eval_batches(
    source: LatentSource, *, batch_size: int, rank: int, world_size: int, limit: int | None = None
) -> Iterator[torch.Tensor]:
    """Yield this process's share of the evaluation latents: every `world_size`-th non-empty shard, read whole.

    Every key goes to exactly one process, so sums reduced across processes count each sample once. `limit`
    keeps the first `limit` keys in store order.
    """
    sizes = shard_sizes(source)
    remaining = limit if limit is not None else sum(sizes)
    dealt = 0
    for shard, size in enumerate(sizes):
        if remaining <= 0:
            return
        if size == 0:
            continue
        take = min(size, remaining)
        remaining -= take
        dealt += 1
        if (dealt - 1) % world_size != rank:
            continue
        latents = source.read_shard(shard)[1][:take]  # (n, C, h, w)
        yield from latents.split(batch_size)
