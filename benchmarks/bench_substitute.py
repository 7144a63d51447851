"""Time and memory of one MMD alignment step (value + codebook gradient) as the codebook grows.

    python benchmarks/bench_substitute.py                     # K = 4096 ... 65536, N = 1024, CPU
    python benchmarks/bench_substitute.py --sizes 4096 8192 --features 21760 --device cuda
    python benchmarks/bench_substitute.py --throughput --throughput-steps 4   # cached latents vs encoder in the loop

Each codebook size runs in a fresh process, so the peak-memory column is that size's own peak: CUDA's
max_memory_allocated on a GPU, the growth of the process's maximum resident set size on the CPU. The blocked
computation costs O(K^2) time but O(K d + block^2) memory, so time ratios should approach 4x per doubling of
K while memory ratios stay near 1x.

With --throughput it instead times substitution steps (quantizer forward, backward, AdamW step) in two ways.
The first reads latents from a small Zarr latent cache that cache.store writes first (batch --cache-batch-size).
The second encodes random 256-px images under no_grad before every step, with a randomly initialised encoder of
the "var" preset (batch --encoder-batch-size). Both use the same quantizer and count latent images per second,
so their ratio is the speed-up that the cache gives.
"""

from __future__ import annotations

import multiprocessing as mp
import resource
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn as nn

from common.config import parse_config
from substitute.quantizers import CODEBOOKS


@dataclass
class BenchConfig:
    """Benchmark the blocked MMD loss for growing codebook sizes."""

    sizes: tuple[int, ...] = field(default=(4096, 8192, 16384, 32768, 65536), metadata={"help": "codebook sizes K"})
    features: int = field(default=1024, metadata={"help": "feature vectors N per step"})
    dim: int = field(default=32, metadata={"help": "vector dimension d"})
    block_size: int = field(default=4096, metadata={"help": "rows per block of the kernel matrices"})
    repeats: int = field(default=2, metadata={"help": "timed steps per size, after one warm-up step"})
    device: str = field(default="cpu", metadata={"help": "torch device, e.g. cpu or cuda"})
    throughput: bool = field(
        default=False, metadata={"help": "time substitution steps on cached latents against the encoder in the loop"}
    )
    throughput_steps: int = field(default=4, metadata={"help": "timed steps per throughput loop, after one warm-up"})
    cache_batch_size: int = field(default=32, metadata={"help": "latents per step read from the cache"})
    encoder_batch_size: int = field(default=2, metadata={"help": "256-px images per step encoded in the loop"})
    quantizer: str = field(
        default="vanilla",
        metadata={"help": "codebook kind of the throughput quantizer", "choices": sorted(CODEBOOKS)},
    )
    codebook_size: int = field(default=4096, metadata={"help": "codes K of the throughput quantizer"})


def _max_rss_bytes() -> int:
    # ru_maxrss is in kilobytes on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure(cfg: BenchConfig, size: int) -> tuple[float, float]:
    """Return (seconds per step, peak extra bytes) of mmd_loss + backward for codebook size `size`."""
    from substitute.losses import mmd_loss

    device = torch.device(cfg.device)
    generator = torch.Generator(device=device).manual_seed(0)
    features = torch.randn(cfg.features, cfg.dim, device=device, generator=generator)
    codebook = torch.randn(size, cfg.dim, device=device, generator=generator).requires_grad_(True)
    mmd_loss(features, codebook, block_size=cfg.block_size).backward()  # warm-up

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        baseline = torch.cuda.memory_allocated(device)
    started = time.perf_counter()
    for _ in range(cfg.repeats):
        codebook.grad = None
        mmd_loss(features, codebook, block_size=cfg.block_size).backward()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - baseline
    else:
        # The resident-set peak cannot be reset, so this is the growth since the process started, warm-up included.
        peak = _max_rss_bytes() - _START_RSS
    return (time.perf_counter() - started) / cfg.repeats, float(max(peak, 0))


_START_RSS = 0


def _worker(cfg: BenchConfig, size: int, queue: mp.Queue) -> None:
    global _START_RSS
    _START_RSS = _max_rss_bytes()
    queue.put(measure(cfg, size))


def run_in_fresh_process(cfg: BenchConfig, size: int) -> tuple[float, float]:
    context = mp.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_worker, args=(cfg, size, queue))
    process.start()
    result = queue.get()
    process.join()
    return result


def write_random_cache(path: Path, latent_shape: tuple[int, int, int], shards: int, rows: int) -> str:
    """Write a complete float16 latent cache of `shards` shards of `rows` random latents each and return its path."""
    from cache.store import create_store, mark_complete, plan_layout, write_shard

    layout = plan_layout([rows] * shards, latent_shape, dtype="float16")
    index = [(f"bench-{shard:04d}.tar", rows) for shard in range(shards)]
    group = create_store(str(path), index, layout, {"tokenizer": {"sha256": None}})
    generator = torch.Generator().manual_seed(0)
    for shard in range(shards):
        latents = torch.randn(rows, *latent_shape, generator=generator)  # (rows, C, h, w)
        keys = [f"s{shard:04d}_{row:05d}" for row in range(rows)]
        write_shard(group, shard, keys, {"latents": latents.numpy().astype(np.float16)})
    mark_complete(group)
    return str(path)


def timed_steps(quantizer: nn.Module, batches: Iterator[torch.Tensor], steps: int) -> float:
    """Run one warm-up step and then `steps` timed training steps, and return the timed seconds.

    Producing each batch (reading the cache, or running the encoder) counts toward the time.
    """
    optimizer = torch.optim.AdamW([p for p in quantizer.parameters() if p.requires_grad], lr=1e-4)
    quantizer.train()
    started = 0.0
    for step in range(steps + 1):
        if step == 1:
            started = time.perf_counter()
        z = next(batches)  # (B, C, h, w)
        quantizer(z).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - started


def cached_batches(path: str, batch_size: int) -> Iterator[torch.Tensor]:
    """Yield batches read from the cache the way substitute/run.py reads them (whole shards, one process)."""
    from cache import open_cache
    from substitute.data import shard_sizes, steps_per_epoch, train_loader

    source = open_cache(path)
    per_epoch = steps_per_epoch(shard_sizes(source), batch_size, 1)
    epoch = 0
    while True:
        yield from train_loader(
            source, batch_size=batch_size, seed=0, epoch=epoch, start=0, steps=per_epoch, rank=0, world_size=1,
            workers=0, window=4,
        )
        epoch += 1


def encoded_batches(encode: Callable[[torch.Tensor], torch.Tensor], batch_size: int) -> Iterator[torch.Tensor]:
    """Yield latents of random 256-px images, encoded under no_grad just before each step."""
    while True:
        images = torch.rand(batch_size, 3, 256, 256) * 2 - 1  # (B, 3, 256, 256) in [-1, 1]
        with torch.no_grad():
            latents = encode(images)  # (B, C, 16, 16)
        # Yield outside the no_grad block: a generator paused inside it would leave gradients off in the caller.
        yield latents


def throughput(cfg: BenchConfig) -> dict[str, float]:
    """Return latent images per second of substitution on cached latents and with the encoder in the loop."""
    from common.tokenizer import build_tokenizer
    from substitute.quantizers import build_quantizer

    # The VAR-width tokenizer, randomly initialised: the encoder's cost does not depend on its weights.
    tokenizer = build_tokenizer("var").eval()
    latent_shape = tuple(tokenizer.latent_shape)  # (C, h, w)

    # Identical starting quantizers, so both loops do the same work per latent.
    def fresh_quantizer() -> nn.Module:
        torch.manual_seed(0)
        return build_quantizer(cfg.quantizer, layout="multiscale", codebook_size=cfg.codebook_size,
                               dim=latent_shape[0], grid=latent_shape[1])

    # Enough cached rows for the warm-up and the timed steps without wrapping around an epoch.
    rows = cfg.cache_batch_size * (cfg.throughput_steps + 1)
    with tempfile.TemporaryDirectory() as folder:
        path = write_random_cache(Path(folder) / "latents.zarr", latent_shape, shards=4, rows=-(-rows // 4))
        cached = timed_steps(fresh_quantizer(), cached_batches(path, cfg.cache_batch_size), cfg.throughput_steps)
    encoded = timed_steps(
        fresh_quantizer(), encoded_batches(tokenizer.encode, cfg.encoder_batch_size), cfg.throughput_steps
    )
    return {
        "cached": cfg.throughput_steps * cfg.cache_batch_size / cached,
        "encoder": cfg.throughput_steps * cfg.encoder_batch_size / encoded,
    }


def report_throughput(cfg: BenchConfig) -> dict[str, float]:
    rates = throughput(cfg)
    print(
        f"substitution steps ({cfg.quantizer}, multiscale, K={cfg.codebook_size}), {cfg.throughput_steps} timed steps "
        f"each, {torch.get_num_threads()} torch threads, CPU"
    )
    print(f"{'source':<28} {'batch':>6} {'latents/s':>10}")
    print(f"{'cached latents (Zarr)':<28} {cfg.cache_batch_size:>6} {rates['cached']:>10.1f}")
    print(f"{'VAR encoder in the loop':<28} {cfg.encoder_batch_size:>6} {rates['encoder']:>10.2f}")
    print(f"cache / encoder: {rates['cached'] / rates['encoder']:.1f}x")
    return rates


def main(cfg: BenchConfig) -> list[dict]:

    # One fresh process per size, so one size's peak memory cannot hide another's.
    rows = []
    for size in cfg.sizes:
        seconds, peak = run_in_fresh_process(cfg, size)
        rows.append({"K": size, "seconds": seconds, "peak_bytes": peak})

    # Ratios against the previous size show the scaling: time ~ K^2, memory ~ constant.
    print(f"MMD step (value + gradient), N={cfg.features}, d={cfg.dim}, block={cfg.block_size}, device={cfg.device}")
    print(f"{'K':>7} {'s/step':>9} {'x time':>7} {'peak MiB':>9} {'x mem':>6} {'dense K x K MiB':>16}")
    previous = None
    for row in rows:
        time_ratio = row["seconds"] / previous["seconds"] if previous else float("nan")
        mem_ratio = row["peak_bytes"] / previous["peak_bytes"] if previous and previous["peak_bytes"] else float("nan")
        dense = row["K"] ** 2 * 4 / 2**20  # one float32 K x K matrix, as a direct computation would allocate
        print(
            f"{row['K']:>7} {row['seconds']:>9.3f} {time_ratio:>7.2f} {row['peak_bytes'] / 2**20:>9.1f} "
            f"{mem_ratio:>6.2f} {dense:>16.0f}"
        )
        previous = row
    return rows


if __name__ == "__main__":
    config = parse_config(BenchConfig)
    if config.throughput:
        report_throughput(config)
    else:
        main(config)
