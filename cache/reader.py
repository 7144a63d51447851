"""Read a latent cache: keys in store order, latents by key, whole shards in order."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from cache.store import Layout, layout_of, open_store, shard_skips, written_marks
from common.config import InputError


class IncompleteCacheError(RuntimeError, InputError):
    """The store's build has not finished: some shards are not written or the complete mark is missing."""


class MissingKeyError(KeyError, InputError):
    """A sample key is not in the cache, typically because the shards given are not those the cache was built from."""

    def __str__(self) -> str:
        return str(self.args[0])


class ProvenanceMismatchError(ValueError):
    """The store was built from images of another size or with another preprocessing than expected."""


class TokenizerMismatchError(ValueError):
    """The store was built with a different tokenizer checkpoint than the one given."""


@dataclass(frozen=True)
class ShardRecord:
    """One WebDataset shard of the cache: its index-declared size and what the build stored."""

    index: int
    url: str
    nsamples: int  # from the shard index
    count: int  # rows stored (nsamples minus skips), 0 when not written
    written: bool
    skipped: dict[str, int]


class LatentCache:
    """Reader of a latent cache, which finds rows by sample key, never by position.

    A key stored by more than one shard resolves to its first shard in store order, and the build counts the later
    copies as ``duplicate_key`` skips. Instances pickle, so DataLoader workers can read from them.
    """

    def __init__(
        self,
        path: str,
        *,
        allow_incomplete: bool = False,
        tokenizer_sha256: str | None = None,
        image_size: int | None = None,
        preprocessing: dict | None = None,
    ):
        self.path = str(path)
        self._group = open_store(self.path, mode="r")
        self.attrs: dict[str, Any] = dict(self._group.attrs)
        self.layout: Layout = layout_of(self._group)
        self._check_tokenizer(tokenizer_sha256)
        self._check_preprocessing(image_size, preprocessing)
        marks = written_marks(self._group)
        if not allow_incomplete:
            self._check_complete(marks)
        self.shards = self._shard_records(marks)
        self._rows_by_key, self._live_rows = self._index_rows()
        self.keys: list[str] = list(self._rows_by_key)

    # properties of the stored latents

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return self.layout.latent_shape

    @property
    def dtype(self) -> str:
        return self.layout.dtype

    @property
    def views(self) -> tuple[str, ...]:
        return self.layout.views

    @property
    def tokenizer_sha256(self) -> str | None:
        return self.attrs["provenance"]["tokenizer"].get("sha256")

    def __len__(self) -> int:
        return len(self.keys)

    def __contains__(self, key: str) -> bool:
        return key in self._rows_by_key

    def row_of(self, key: str) -> int:
        try:
            return self._rows_by_key[key]
        except KeyError:
            raise MissingKeyError(f"sample key {key!r} is not in the latent cache {self.path}; give the shards the "
                                  "cache was built from, or build a cache of these shards") from None

    # reads

    def latents(self, keys: Sequence[str], view: str = "latents") -> torch.Tensor:
        """Return the latents of ``keys`` in the given order as a (n, C, h, w) float32 tensor."""
        array = self._view(view)
        rows = np.array([self.row_of(k) for k in keys], dtype=np.int64)
        if rows.size == 0:
            return torch.empty((0, *self.latent_shape), dtype=torch.float32)

        # sorted unique rows let zarr decode each chunk once, and the inverse restores the requested order
        unique_rows, inverse = np.unique(rows, return_inverse=True)
        data = np.asarray(array.get_orthogonal_selection((unique_rows,)))  # (U, C, h, w)
        return torch.from_numpy(data[inverse].astype(np.float32))

    def read_shard(self, shard: int, view: str = "latents") -> tuple[list[str], torch.Tensor]:
        """Return one shard's keys and latents (n, C, h, w) float32, in stored order, from one sequential read."""
        if not 0 <= shard < len(self.shards):
            raise IndexError(f"shard {shard} is out of range: latent cache {self.path} has {len(self.shards)} shards")
        record = self.shards[shard]
        if not record.written:
            raise IncompleteCacheError(f"shard {shard} ({record.url}) of latent cache {self.path} is not written")
        start = shard * self.layout.slot
        keys = self._group["keys"][start : start + record.count].tolist()
        data = np.asarray(self._view(view)[start : start + record.count])  # (n, C, h, w)
        live = self._live_rows[shard]
        if live is not None:
            keys = [keys[i] for i in live]
            data = data[live]
        return keys, torch.from_numpy(data.astype(np.float32))

    # checks and indexing done once at open

    def _view(self, view: str):
        if view not in self.layout.views:
            raise KeyError(f"latent cache {self.path} has no view {view!r}. Its views are {list(self.layout.views)}")
        return self._group[view]

    def _check_tokenizer(self, expected: str | None) -> None:
        stored = self.attrs["provenance"]["tokenizer"].get("sha256")
        if expected is not None and stored != expected:
            raise TokenizerMismatchError(
                f"latent cache {self.path} was built with tokenizer sha256 {stored}, but tokenizer sha256 "
                f"{expected} was given. Use the tokenizer the cache was built with, or rebuild the cache"
            )

    def _check_preprocessing(self, image_size: int | None, preprocessing: dict | None) -> None:
        provenance = self.attrs["provenance"]
        stored_size = provenance.get("image_size")
        if image_size is not None and stored_size != image_size:
            raise ProvenanceMismatchError(
                f"latent cache {self.path} was built from {stored_size}-px images, but {image_size}-px images were "
                "expected. Rebuild the cache with --image-size matching the tokenizer"
            )
        stored = provenance.get("preprocessing")
        if preprocessing is not None and stored != preprocessing:
            raise ProvenanceMismatchError(
                f"latent cache {self.path} was built with preprocessing {stored}, but {preprocessing} was expected. "
                "Rebuild the cache with this version's preprocessing"
            )

    def _check_complete(self, marks: np.ndarray) -> None:
        if self.attrs.get("complete"):
            return
        missing = [int(i) for i in np.flatnonzero(~marks)]
        remedy = (
            f"Resume the build by rerunning cache/build.py with the same arguments and --out {self.path} (it redoes "
            "only the missing shards), or pass allow_incomplete=True to read the written shards only."
        )
        if missing:
            listed = ", ".join(map(str, missing[:20])) + (", ..." if len(missing) > 20 else "")
            raise IncompleteCacheError(
                f"latent cache {self.path} is incomplete: {len(missing)} of {len(marks)} shards are not written "
                f"(shards {listed}). {remedy}"
            )
        raise IncompleteCacheError(
            f"latent cache {self.path} is incomplete: every shard is written but the build did not finish "
            f"(the complete mark is missing). {remedy}"
        )

    def _shard_records(self, marks: np.ndarray) -> list[ShardRecord]:
        counts = np.asarray(self._group["counts"][:])
        skips = shard_skips(self._group)
        records = []
        for i, entry in enumerate(self.attrs["shards"]):
            written = bool(marks[i])
            records.append(ShardRecord(
                index=i, url=entry["url"], nsamples=int(entry["nsamples"]),
                count=int(counts[i]) if written else 0, written=written,
                skipped=dict(skips[i]["counts"]) if written else {},
            ))
        return records

    def _index_rows(self) -> tuple[dict[str, int], list[list[int] | None]]:
        """Map each key to its row (a repeated key keeps its first shard) and list live rows of shards with repeats."""
        rows_by_key: dict[str, int] = {}
        live_rows: list[list[int] | None] = []
        keys_array = self._group["keys"]
        for record in self.shards:
            start = record.index * self.layout.slot
            keys = keys_array[start : start + record.count].tolist() if record.count else []
            live = []
            for j, key in enumerate(keys):
                if key not in rows_by_key:
                    rows_by_key[key] = start + j
                    live.append(j)
            live_rows.append(None if len(live) == len(keys) else live)
        return rows_by_key, live_rows


def open_cache(
    path: str,
    *,
    tokenizer_sha256: str | None = None,
    allow_incomplete: bool = False,
    image_size: int | None = None,
    preprocessing: dict | None = None,
) -> LatentCache:
    """Open a latent cache for reading.

    Raises IncompleteCacheError when the build has not finished (unless ``allow_incomplete``, which reads the
    written shards only), TokenizerMismatchError when ``tokenizer_sha256`` differs from the one recorded, and
    ProvenanceMismatchError when ``image_size`` or ``preprocessing`` (a `common.preprocess.transform_description`)
    differ from the recorded ones. Checks whose argument is None are skipped.
    """
    return LatentCache(path, allow_incomplete=allow_incomplete, tokenizer_sha256=tokenizer_sha256,
                       image_size=image_size, preprocessing=preprocessing)
