"""Per-shard batches of preprocessed images, the frozen encoder call, and the buffer that collects one shard."""

from __future__ import annotations

from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from cache.store import MAX_SKIP_EXAMPLES
from common.precision import float32_precision
from common.tokenizer import VQVAE
from shards.read import ImageSamples, SkipLog


class ShardBatches(IterableDataset):
    """Batches that never mix shards: {"shard", "keys", "images" (b, 3, R, R), "skips", "last"}.

    Every shard ends with one item whose "last" is True (its batch may be empty), so the consumer can tell when the
    shard is whole. Loader workers take shards round-robin. Batches start at each shard's first sample, so batch
    contents do not depend on the number of processes or workers.
    """

    def __init__(self, shards: list[tuple[int, str]], image_size: int, batch_size: int):
        super().__init__()
        self.shards, self.image_size, self.batch_size = list(shards), image_size, batch_size

    def __iter__(self) -> Iterator[dict[str, Any]]:
        worker = get_worker_info()
        mine = self.shards if worker is None else self.shards[worker.id :: worker.num_workers]
        for shard, url in mine:
            yield from self._shard_batches(shard, url)

    def _shard_batches(self, shard: int, url: str) -> Iterator[dict[str, Any]]:
        keys: list[str] = []
        images: list[torch.Tensor] = []
        skips: list[dict] = []
        for sample in ImageSamples([url], self.image_size, split_workers=False):
            if "skip" in sample:
                skips.append(sample)
                continue
            keys.append(sample["key"])
            images.append(sample["image"])
            if len(keys) == self.batch_size:
                yield self._item(shard, keys, images, skips, last=False)
                keys, images, skips = [], [], []
        yield self._item(shard, keys, images, skips, last=True)

    def _item(self, shard: int, keys: list[str], images: list[torch.Tensor], skips: list[dict], last: bool) -> dict:
        R = self.image_size
        stacked = torch.stack(images) if images else torch.empty((0, 3, R, R))  # (b, 3, R, R)
        return {"shard": shard, "keys": keys, "images": stacked, "skips": skips, "last": last}


class Encoder:
    """The tokenizer's frozen encoder (quant_conv included) on one device, returning latents per view.

    By default it computes in IEEE float32 on GPUs too. `tf32` allows TensorFloat-32 convolutions and `bf16` runs
    it under bfloat16 autocast. Both are faster on GPUs and both change the latents.
    """

    def __init__(self, tokenizer: VQVAE, device: torch.device, *, hflip: bool, bf16: bool, channels_last: bool,
                 tf32: bool = False):
        if bf16 and tf32:
            raise ValueError("--bf16 and --tf32 exclude each other: choose one encoder precision")
        self.tokenizer = tokenizer.to(device).eval().requires_grad_(False)
        self.device, self.hflip, self.bf16, self.channels_last = device, hflip, bf16, channels_last
        self.tf32 = tf32
        if channels_last:
            self.tokenizer.to(memory_format=torch.channels_last)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> dict[str, np.ndarray]:
        """Encode images (b, 3, R, R) in [-1, 1] into {"latents": (b, C, h, w)} plus "latents_hflip" if requested."""
        x = images.to(self.device, non_blocking=True)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if self.bf16:
            precision = torch.autocast(self.device.type, dtype=torch.bfloat16)
        else:
            precision = float32_precision("tf32" if self.tf32 else "ieee")
        with precision:
            views = {"latents": self.tokenizer.encode(x)}
            # the flipped view is a separate call so "latents" does not depend on whether flips were requested
            if self.hflip:
                views["latents_hflip"] = self.tokenizer.encode(x.flip(-1))
        return {name: z.float().cpu().numpy() for name, z in views.items()}


def is_tar_error(skip: dict) -> bool:
    """Tell a failure to read the shard file itself (missing, truncated) from one bad sample."""
    return skip.get("key") is None or skip.get("skip") == "unreadable_tar"


class ShardBuffer:
    """One shard's keys, latents per view and skip records, held until the shard is complete.

    Errors reading the tar file are kept apart from sample skips, because a shard cut short must not be stored
    as if it were whole.
    """

    def __init__(self, strict: bool):
        self.keys: list[str] = []
        self.parts: dict[str, list[np.ndarray]] = {}
        self.skips = SkipLog(strict=strict, max_logged=MAX_SKIP_EXAMPLES)
        self.tar_errors: list[str] = []

    def add(self, keys: list[str], latents: dict[str, np.ndarray], skips: list[dict]) -> None:
        # skips go first: with --strict a bad sample raises before anything else happens
        for skip in skips:
            if is_tar_error(skip):
                self.tar_errors.append(str(skip.get("error")))
            else:
                self.skips.record(skip)
        self.keys.extend(keys)
        for view, z in latents.items():
            self.parts.setdefault(view, []).append(z)

    def views(self, names: tuple[str, ...], latent_shape: tuple[int, int, int]) -> dict[str, np.ndarray]:
        empty = np.empty((0, *latent_shape), dtype=np.float32)
        return {name: np.concatenate(self.parts[name]) if name in self.parts else empty for name in names}

    def skip_record(self) -> dict[str, Any]:
        return {"counts": dict(sorted(self.skips.counts.items())), "examples": self.skips.examples}
