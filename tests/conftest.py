"""Shared fixtures: a few real-photograph shards at 64 px and a small random tokenizer of the demo preset."""

from __future__ import annotations

import os

# Tests never download: hub look-ups fail at once instead of retrying, and weight caches point at an empty folder.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch


@pytest.fixture(autouse=True)
def _empty_weight_caches(tmp_path_factory, monkeypatch):
    cache = tmp_path_factory.getbasetemp() / "empty_weight_cache"
    cache.mkdir(exist_ok=True)
    monkeypatch.setenv("TORCH_HOME", str(cache / "torch"))
    monkeypatch.setenv("HF_HOME", str(cache / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)


@pytest.fixture
def single_thread():
    """Run on one thread: with tensors this small, waking a thread pool costs more than the work itself."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def demo_shards(tmp_path_factory) -> dict[str, str]:
    """Train and eval shard sets cut from scikit-image's photographs: 26 train samples in 4 shards, 13 eval."""
    from shards.demo import build_demo_shards

    out = tmp_path_factory.mktemp("demo_shards")
    return build_demo_shards(out, train_per_photo=2, eval_per_photo=1, crop_size=80, maxcount=8, seed=1)


@pytest.fixture(scope="session")
def tiny_tokenizer_path(tmp_path_factory) -> str:
    """A seeded random tokenizer of the demo preset (64 px, 16x16x32 latents, 256 codes) saved as safetensors."""
    from common.tokenizer import build_tokenizer, save_tokenizer

    torch.manual_seed(0)
    model = build_tokenizer("demo", vocab_size=256)
    return str(save_tokenizer(model, tmp_path_factory.mktemp("tokenizer") / "tokenizer"))


@pytest.fixture
def tiny_tokenizer(tiny_tokenizer_path):
    from common.tokenizer import load_tokenizer

    return load_tokenizer(tiny_tokenizer_path)
