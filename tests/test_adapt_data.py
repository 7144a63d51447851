"""Tests of the adaptation data stages: shuffle buffer, batching, joining images with cached latents."""

from __future__ import annotations

import pytest
import torch

from adapt.data import LatentJoin, image_batches, shuffle_buffer


class FakeCache:
    """A latent cache stand-in: latent value = the key's number + 1, flipped view = minus that."""

    path = "fake.zarr"

    def __init__(self, keys: list[str], views: tuple[str, ...] = ("latents",)):
        self.keys = keys
        self.views = views

    def __contains__(self, key: str) -> bool:
        return key in self.keys

    def latents(self, keys, view: str = "latents") -> torch.Tensor:
        sign = -1.0 if view == "latents_hflip" else 1.0
        return torch.tensor([sign * (float(k) + 1) for k in keys]).view(-1, 1, 1, 1).expand(-1, 2, 2, 2).clone()


def samples(n: int) -> list[dict]:
    images = torch.arange(4.0).view(1, 2, 2).expand(3, 2, 2)  # columns differ, so a mirror is visible
    return [{"key": str(i), "image": images.clone() + i} for i in range(n)]


def test_shuffle_buffer_yields_each_sample_once():
    keys = [s["key"] for s in shuffle_buffer(iter(samples(50)), size=8, seed=0)]
    assert sorted(keys, key=int) == [str(i) for i in range(50)]
    assert keys != [str(i) for i in range(50)]


def test_image_batches_drop_incomplete_tail():
    batches = list(image_batches(iter(samples(10)), batch_size=4))
    assert len(batches) == 2
    assert batches[0]["image"].shape == (4, 3, 2, 2)
    assert batches[1]["key"] == ["4", "5", "6", "7"]


def test_latent_join_drops_uncached_keys():
    join = LatentJoin(FakeCache(["0", "2", "3"]), hflip=False, seed=0)
    kept = [s["key"] for s in join.filter(iter(samples(5)))]
    assert kept == ["0", "2", "3"]
    assert join.dropped["not_in_cache"] == 2


def test_latent_join_flips_images_with_latents():
    cache = FakeCache([str(i) for i in range(32)], views=("latents", "latents_hflip"))
    batch = next(image_batches(iter(samples(32)), batch_size=32))
    original = batch["image"].clone()
    joined = LatentJoin(cache, hflip=True, seed=0).attach(batch)
    flipped = joined["latents"][:, 0, 0, 0] < 0
    assert 0 < flipped.sum() < 32
    for i in range(32):
        value = float(i) + 1
        if flipped[i]:
            torch.testing.assert_close(joined["image"][i], original[i].flip(-1))
            assert joined["latents"][i, 0, 0, 0].item() == -value
        else:
            torch.testing.assert_close(joined["image"][i], original[i])
            assert joined["latents"][i, 0, 0, 0].item() == value


def test_latent_join_hflip_needs_flipped_view():
    with pytest.raises(ValueError, match="latents_hflip"):
        LatentJoin(FakeCache(["0"]), hflip=True, seed=0)


def test_latent_join_raises_when_no_key_is_cached():
    """Shards that share no key with the cache must fail, not loop forever over endless passes."""
    join = LatentJoin(FakeCache(["90", "91"]), hflip=False, seed=0)
    endless = (s for _ in iter(int, 1) for s in samples(5))
    with pytest.raises(ValueError, match="give --shards the shards the cache was built from"):
        next(join.filter(endless, max_misses=10))
    assert join.dropped["not_in_cache"] == 10
    join = LatentJoin(FakeCache(["4"]), hflip=False, seed=0)
    kept = join.filter((s for _ in range(3) for s in samples(5)), max_misses=5)
    assert [s["key"] for s in kept] == ["4", "4", "4"]
