"""Time and memory of one MMD alignment step (value + codebook gradient) as the codebook grows.

    python benchmarks/bench_substitute.py                     # K = 4096 ... 65536, N = 1024, CPU
    python benchmarks/bench_substitute.py --sizes 4096 8192 --features 21760 --device cuda

Each codebook size runs in a fresh process, so the peak-memory column is that size's own peak: CUDA's
max_memory_allocated on a GPU, the growth of the process's maximum resident set size on the CPU. The blocked
computation costs O(K^2) time but O(K d + block^2) memory, so time ratios should approach 4x per doubling of
K while memory ratios stay near 1x.
"""

from __future__ import annotations

import multiprocessing as mp
import resource
import time
from dataclasses import dataclass, field

import torch

from common.config import parse_config


@dataclass
class BenchConfig:
    """Benchmark the blocked MMD loss for growing codebook sizes."""

    sizes: tuple[int, ...] = field(default=(4096, 8192, 16384, 32768, 65536), metadata={"help": "codebook sizes K"})
    features: int = field(default=1024, metadata={"help": "feature vectors N per step"})
    dim: int = field(default=32, metadata={"help": "vector dimension d"})
    block_size: int = field(default=4096, metadata={"help": "rows per block of the kernel matrices"})
    repeats: int = field(default=2, metadata={"help": "timed steps per size, after one warm-up step"})
    device: str = field(default="cpu", metadata={"help": "torch device, e.g. cpu or cuda"})


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
    main(parse_config(BenchConfig))
