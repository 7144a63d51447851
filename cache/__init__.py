"""Latent cache: the frozen encoder's latents of every sample of a WebDataset shard set, stored once in Zarr v3."""

from cache.reader import (
    IncompleteCacheError,
    LatentCache,
    ProvenanceMismatchError,
    ShardRecord,
    TokenizerMismatchError,
    open_cache,
)

__all__ = [
    "IncompleteCacheError",
    "LatentCache",
    "ProvenanceMismatchError",
    "ShardRecord",
    "TokenizerMismatchError",
    "open_cache",
]
