"""Training batches for adaptation: images streamed from WebDataset shards, joined by key with cached latents.

Each process reads its own round-robin share of the shards endlessly, reshuffling the shard order every pass.
Every process can then take the same number of steps, however many samples its share contains, because one
process running an extra collective call would hang the job. A small buffer mixes samples across shards.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader

from shards.read import ImageSamples, SkipLog


def endless_samples(urls: list[str], image_size: int, workers: int, seed: int, skips: SkipLog) -> Iterator[dict]:
    """Yield decoded samples of `urls` pass after pass, in a new shard order per pass; bad samples go to `skips`."""
    if not urls:
        raise ValueError("this process has no shard to read: give at least as many shards as processes")
    passes = 0
    while True:
        order = list(urls)
        random.Random(seed * 1_000_003 + passes).shuffle(order)
        loader = DataLoader(ImageSamples(order, image_size), batch_size=None, num_workers=min(workers, len(order)))
        produced = 0
        for sample in loader:
            if "skip" in sample:
                skips.record(sample)
                continue
            produced += 1
            yield sample
        if produced == 0:
            raise ValueError(f"no readable sample in shards {urls[:3]}{' ...' if len(urls) > 3 else ''}")
        passes += 1


def shuffle_buffer(samples: Iterator[dict], size: int, seed: int) -> Iterator[dict]:
    """Yield samples in random order through a buffer of `size` samples (no shuffling when size <= 1)."""
    rng = random.Random(seed)
    buffer: list[dict] = []
    for sample in samples:
        if len(buffer) < size:
            buffer.append(sample)
            continue
        index = rng.randrange(size)
        yield buffer[index]
        buffer[index] = sample
    rng.shuffle(buffer)
    yield from buffer


def image_batches(samples: Iterator[dict], batch_size: int) -> Iterator[dict]:
    """Group samples into batches {"key": [B], "image": (B, 3, R, R)}."""
    pending: list[dict] = []
    for sample in samples:
        pending.append(sample)
        if len(pending) == batch_size:
            yield {"key": [s["key"] for s in pending], "image": torch.stack([s["image"] for s in pending])}
            pending = []


class LatentJoin:
    """Attach cached latents to image samples by key; samples missing from the cache are dropped and counted.

    With `hflip`, each sample is mirrored with probability 1/2 and then takes its latents from the cache's
    `latents_hflip` view, so the encoder never runs on the flipped image.
    """

    def __init__(self, cache, hflip: bool, seed: int):
        if hflip and "latents_hflip" not in cache.views:
            raise ValueError(f"--hflip needs the view 'latents_hflip' in the latent cache, but {cache.path} contains "
                             f"only {list(cache.views)}; rebuild the cache with cache/build.py --hflip or drop --hflip")
        self.cache = cache
        self.hflip = hflip
        self.generator = torch.Generator().manual_seed(seed)
        self.dropped: Counter[str] = Counter()

    def filter(self, samples: Iterator[dict], max_misses: int | None = None) -> Iterator[dict]:
        """Yield only the samples whose key is in the cache.

        Raises ValueError after `max_misses` samples in a row are missing from the cache: over endless passes,
        shards that share no key with the cache would otherwise loop forever without yielding.
        """
        misses = 0
        for sample in samples:
            if sample["key"] in self.cache:
                misses = 0
                yield sample
                continue
            self.dropped["not_in_cache"] += 1
            misses += 1
            if max_misses is not None and misses >= max_misses:
                raise ValueError(
                    f"none of {misses} samples in a row (last key {sample['key']!r} from {sample.get('url', '?')}) "
                    f"is in the latent cache {self.cache.path}; give --shards the shards the cache was built from"
                )

    def attach(self, batch: dict) -> dict:
        """Add "latents" (B, C, h, w) float32 to a batch, flipping images and latents together when asked."""
        latents = self.cache.latents(batch["key"])
        if self.hflip:
            flip = torch.rand(len(batch["key"]), generator=self.generator) < 0.5  # (B,)
            if flip.any():
                flipped_keys = [k for k, f in zip(batch["key"], flip.tolist()) if f]
                latents[flip] = self.cache.latents(flipped_keys, view="latents_hflip")
                batch["image"][flip] = batch["image"][flip].flip(-1)
        return {**batch, "latents": latents}
