"""Shard-wise training and evaluation batches of substitution: coverage per epoch, dealing, resume."""

import numpy as np
import pytest
import torch

from cache import open_cache
from cache.store import create_store, mark_complete, plan_layout, write_shard
from substitute.data import PreloadedLatents, eval_batches, shard_sizes, steps_per_epoch, train_loader

SHAPE = (2, 2, 2)


def numbered_cache(path, sizes) -> str:
    """Write a cache whose latent number i is filled with the value i, in shards of the given sizes."""
    layout = plan_layout(list(sizes), SHAPE, dtype="float32", chunk_rows=4)
    group = create_store(str(path), [(f"s-{i:04d}.tar", n) for i, n in enumerate(sizes)], layout,
                         {"tokenizer": {"sha256": None}})
    first = 0
    for shard, n in enumerate(sizes):
        values = np.arange(first, first + n, dtype=np.float32)[:, None, None, None] * np.ones(SHAPE, np.float32)
        write_shard(group, shard, [f"k{first + i:04d}" for i in range(n)], {"latents": values})
        first += n
    mark_complete(group)
    return str(path)


def numbers(batches) -> list[int]:
    """Return the sample numbers of a list of batches (B, C, h, w), in order."""
    return [int(v) for batch in batches for v in batch[:, 0, 0, 0].tolist()]


def epoch(source, *, rank=0, world_size=1, workers=0, start=0, epoch_index=0, window=2, batch_size=8, steps=None):
    sizes = shard_sizes(source)
    steps = steps if steps is not None else steps_per_epoch(sizes, batch_size, world_size)
    return list(train_loader(source, batch_size=batch_size, seed=3, epoch=epoch_index, start=start, steps=steps,
                             rank=rank, world_size=world_size, workers=workers, window=window))


@pytest.fixture(scope="module")
def even(tmp_path_factory):
    return open_cache(numbered_cache(tmp_path_factory.mktemp("even") / "c.zarr", [16] * 6))


def test_one_process_sees_every_latent_once(even):
    batches = epoch(even)
    assert len(batches) == 12
    assert sorted(numbers(batches)) == list(range(96))
    assert numbers(batches) != list(range(96))


def test_two_processes_split_the_epoch(even):
    parts = [numbers(epoch(even, rank=r, world_size=2)) for r in range(2)]
    assert len(parts[0]) == len(parts[1]) == 48
    assert sorted(parts[0] + parts[1]) == list(range(96))


def test_order_independent_of_worker_count(even):
    assert numbers(epoch(even, workers=2)) == numbers(epoch(even, workers=0))


@pytest.mark.parametrize("start", [1, 4, 5, 11])
def test_resume_continues_same_order(even, start):
    whole = numbers(epoch(even))
    assert numbers(epoch(even, start=start)) == whole[start * 8 :]


def test_epochs_differ(even):
    assert numbers(epoch(even, epoch_index=0)) != numbers(epoch(even, epoch_index=1))


def test_uneven_shards_give_equal_steps(tmp_path):
    source = open_cache(numbered_cache(tmp_path / "c.zarr", [16, 16, 16, 10]))
    # Each of 2 processes gets 2 shards, at worst the 10- and a 16-row one: 26 rows, 3 batches of 8.
    assert steps_per_epoch(shard_sizes(source), 8, 2) == 3
    for epoch_index in range(4):
        parts = [numbers(epoch(source, rank=r, world_size=2, epoch_index=epoch_index)) for r in range(2)]
        assert [len(p) for p in parts] == [24, 24]
        assert len(set(parts[0] + parts[1])) == 48


def test_eval_batches_deal_shards_once(even):
    parts = [numbers(eval_batches(even, batch_size=5, rank=r, world_size=2)) for r in range(2)]
    assert sorted(parts[0] + parts[1]) == list(range(96))
    assert parts[0][:16] == list(range(16))
    limited = [numbers(eval_batches(even, batch_size=5, rank=r, world_size=2, limit=40)) for r in range(2)]
    assert sorted(limited[0] + limited[1]) == list(range(40))


def test_preloaded_reads_same_batches(even):
    preloaded = PreloadedLatents(even, dtype=torch.float32)
    assert shard_sizes(preloaded) == shard_sizes(even)
    assert numbers(epoch(preloaded, start=3)) == numbers(epoch(even, start=3))
