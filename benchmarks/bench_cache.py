"""Latent cache throughput and size: writes, sequential and random reads, against a raw read of the same files.

For each stored dtype, writes a store of synthetic latents shard by shard and reads it back three ways. Whole
shards in order (`read_shard`) is the fastest way to stream a cache. Batches of random keys (`latents`) is how
shuffled training batches and the join with streamed images read it. The raw bytes of the latents array's files,
read with no decoding, are the floor of any Zarr read. Prints latents per second, MB/s of decoded float data, and
bytes per latent on disk.

    python benchmarks/bench_cache.py [--shards 4] [--rows-per-shard 512] [--store EXISTING.zarr]

With --store, only the three reads run, on that cache. Synthetic latents are Gaussian (per-channel scale from
0.5 to 2), so they compress differently from real ones. Measure a real cache with --store for the bytes that
matter. The store is read right after it is written, so the raw read comes from the page cache.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cache import open_cache
from cache.store import create_store, mark_complete, plan_layout, write_shard
from common.config import parse_config


@dataclass
class BenchConfig:
    """Measure latent cache write and read throughput and bytes per latent."""

    shards: int = field(default=4, metadata={"help": "WebDataset shards to simulate"})
    rows_per_shard: int = field(default=512, metadata={"help": "latents per shard"})
    latent_shape: tuple[int, ...] = field(default=(32, 16, 16), metadata={"help": "C h w of one latent (VAR's)"})
    chunk_rows: int = field(default=64, metadata={"help": "latents per Zarr chunk"})
    random_batch: int = field(default=32, metadata={"help": "keys per random-read call"})
    random_batches: int = field(default=50, metadata={"help": "random-read calls to time"})
    store: str | None = field(default=None, metadata={"help": "time the reads of this existing cache instead"})
    seed: int = 0


@dataclass
class Row:
    name: str
    latents: int
    seconds: float
    decoded_bytes: int

    def format(self) -> str:
        rate = self.latents / self.seconds
        mbps = self.decoded_bytes / self.seconds / 1e6
        return f"  {self.name:<28} {rate:>12,.0f} latents/s {mbps:>10,.1f} MB/s"


def synthetic_latents(cfg: BenchConfig, shard: int) -> np.ndarray:
    rng = np.random.default_rng(cfg.seed + shard)
    C = cfg.latent_shape[0]
    scale = np.linspace(0.5, 2.0, C, dtype=np.float32).reshape(1, C, 1, 1)
    return rng.standard_normal((cfg.rows_per_shard, *cfg.latent_shape), dtype=np.float32) * scale


def time_writes(cfg: BenchConfig, path: str, dtype: str) -> Row:
    """Create a store and write every shard in one call each. The timing covers creation and writes."""
    sizes = [cfg.rows_per_shard] * cfg.shards
    shards = [(f"bench-{i:04d}.tar", n) for i, n in enumerate(sizes)]
    latents = [synthetic_latents(cfg, i) for i in range(cfg.shards)]
    start = time.perf_counter()
    layout = plan_layout(sizes, cfg.latent_shape, dtype=dtype, chunk_rows=cfg.chunk_rows)
    group = create_store(path, shards, layout, {"tokenizer": {"sha256": None}, "note": "synthetic benchmark"})
    for i, z in enumerate(latents):
        write_shard(group, i, [f"{i}-{j}" for j in range(len(z))], {"latents": z})
    mark_complete(group)
    seconds = time.perf_counter() - start
    n = sum(sizes)
    return Row(f"write {dtype}", n, seconds, n * int(np.prod(cfg.latent_shape)) * np.dtype(dtype).itemsize)


def time_reads(cfg: BenchConfig, path: str) -> list[Row]:
    """Time whole-shard reads, random-key reads and a raw read of the latents array's files."""
    cache = open_cache(path, allow_incomplete=True)
    itemsize = np.dtype(cache.dtype).itemsize
    per_latent = int(np.prod(cache.latent_shape)) * itemsize
    written = [s.index for s in cache.shards if s.written]

    # whole shards in store order
    start = time.perf_counter()
    sequential = sum(len(cache.read_shard(i)[0]) for i in written)
    rows = [Row(f"read_shard ({cache.dtype})", sequential, time.perf_counter() - start, sequential * per_latent)]

    # batches of random keys
    rng = np.random.default_rng(cfg.seed)
    batches = [rng.choice(len(cache.keys), cfg.random_batch, replace=False) for _ in range(cfg.random_batches)]
    start = time.perf_counter()
    for batch in batches:
        cache.latents([cache.keys[k] for k in batch])
    n = cfg.random_batch * cfg.random_batches
    rows.append(Row(f"latents(random {cfg.random_batch})", n, time.perf_counter() - start, n * per_latent))

    # the stored bytes read back raw, with no decoding: the floor for a sequential read
    files = [p for p in (Path(path) / "latents").rglob("*") if p.is_file()]
    start = time.perf_counter()
    raw_bytes = sum(len(p.read_bytes()) for p in files)
    rows.append(Row("raw file read (same bytes)", sequential, time.perf_counter() - start, raw_bytes))
    return rows


def bytes_per_latent(path: str) -> float:
    cache = open_cache(path, allow_incomplete=True)
    stored = sum(p.stat().st_size for p in (Path(path) / "latents").rglob("*") if p.is_file())
    return stored / max(len(cache.keys), 1)


def main(cfg: BenchConfig) -> None:
    # an existing cache: reads only
    if cfg.store:
        print(f"{cfg.store}: {bytes_per_latent(cfg.store):,.0f} bytes per latent on disk")
        for row in time_reads(cfg, cfg.store):
            print(row.format())
        return

    # synthetic stores, one per dtype, removed afterwards
    total = cfg.shards * cfg.rows_per_shard
    print(f"{total} synthetic latents of {'x'.join(map(str, cfg.latent_shape))} in {cfg.shards} shards")
    workdir = Path(tempfile.mkdtemp(prefix="bench_cache_"))
    try:
        for dtype in ("float16", "float32"):
            path = str(workdir / f"{dtype}.zarr")
            raw = int(np.prod(cfg.latent_shape)) * np.dtype(dtype).itemsize
            write = time_writes(cfg, path, dtype)
            print(f"{dtype}: {bytes_per_latent(path):,.0f} bytes per latent on disk (raw {raw})")
            print(write.format())
            for row in time_reads(cfg, path):
                print(row.format())
    finally:
        shutil.rmtree(workdir)


if __name__ == "__main__":
    main(parse_config(BenchConfig))
