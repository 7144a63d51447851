"""The evaluation set: which shards (and how many samples of the last one) are read, and the batches made of them.

The set is fixed by the shard list and `max_samples` alone: shards are taken in order until their sample counts
reach `max_samples`, and the last one is cut to the remainder. Processes then split those shards round-robin,
so any number of processes scores the same images.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from shards.index import ShardInfo
from shards.read import ImageSamples, SkipLog


@dataclass(frozen=True)
class ShardPlan:
    url: str
    limit: int | None  # read at most this many good samples of the shard; None reads all of them


def plan_samples(shards: list[ShardInfo], max_samples: int | None) -> list[ShardPlan]:
    """Choose the shards that hold the first `max_samples` samples of the set; all of them when None.

    The counts come from the shard index and include samples that later fail to decode, so a capped set can
    hold a few samples fewer than `max_samples`.
    """
    if max_samples is None:
        return [ShardPlan(s.url, None) for s in shards]
    if max_samples < 1:
        raise ValueError(f"--max-samples must be at least 1, got {max_samples}")
    plan: list[ShardPlan] = []
    remaining = max_samples
    for shard in shards:
        if remaining <= 0:
            break
        plan.append(ShardPlan(shard.url, None if shard.nsamples <= remaining else remaining))
        remaining -= shard.nsamples
    return plan


class EvalSamples(IterableDataset):
    """Preprocessed samples of planned shards, plus skip records; loader workers split the shards among them."""

    def __init__(self, plan: list[ShardPlan], image_size: int) -> None:
        super().__init__()
        self.plan = list(plan)
        self.image_size = image_size

    def __iter__(self) -> Iterator[dict]:
        worker = get_worker_info()
        mine = self.plan if worker is None else self.plan[worker.id :: worker.num_workers]
        for shard in mine:
            good = 0
            for sample in ImageSamples([shard.url], self.image_size, split_workers=False):
                if shard.limit is not None and good >= shard.limit:
                    break
                yield sample
                good += "skip" not in sample


def eval_batches(plan: list[ShardPlan], image_size: int, batch_size: int, workers: int, skips: SkipLog) -> Iterator[dict]:
    """Yield batches {"key": [B], "image": (B, 3, R, R)} of samples not yet seen by this process.

    A key seen before is dropped, so a key repeated in a later shard (or a shard listed twice) is scored once.
    The first occurrence wins, as in the latent cache. Bad samples are recorded in `skips`.
    """
    loader = DataLoader(EvalSamples(plan, image_size), batch_size=None, num_workers=min(workers, len(plan)))
    seen: set[str] = set()
    pending: list[dict] = []
    for sample in loader:
        if "skip" in sample:
            skips.record(sample)
            continue
        if sample["key"] in seen:
            continue
        seen.add(sample["key"])
        pending.append(sample)
        if len(pending) == batch_size:
            yield _collate(pending)
            pending = []
    if pending:
        yield _collate(pending)


def _collate(samples: list[dict]) -> dict:
    return {"key": [s["key"] for s in samples], "image": torch.stack([s["image"] for s in samples])}
