"""Zarr v3 layout of the latent cache: creation, per-shard writes, written marks and completion.

Layout of the group (every array is readable with plain ``zarr``):

- ``latents`` (N_rows, C, h, w) float16 or float32, the tokenizer's ``z_e`` in its own channel order (NCHW).
  ``latents_hflip`` (same shape) contains the latents of the horizontally flipped images when the build asked for it.
- ``keys`` (N_rows,) str, the WebDataset sample key of each row ("" for padding rows).
- ``shard`` (N_rows,) int32, the index of the WebDataset shard each row came from (-1 for padding rows).
- ``counts`` (n_shards,) int64, samples stored per shard, and ``written`` (n_shards,) uint8, 1 once a shard is stored.
- ``skips`` (n_shards,) str, one JSON object per shard: ``{"counts": {reason: n}, "examples": [{"key", "reason",
  "error"}, ...]}`` (the first few skipped samples).

Shard-aligned storage: WebDataset shard ``i`` owns rows ``[i * slot, i * slot + counts[i])`` where ``slot`` is the
largest shard's sample count rounded up to the chunk size. The latents use Zarr's sharding codec with shard shape
``(slot, C, h, w)``, and ``keys``/``shard`` use one chunk of ``slot`` rows, so each WebDataset shard's rows live in
storage objects that no other shard touches. Zarr rewrites a whole shard object on a partial write (the last writer
wins), so every writer stores its whole slot in one call and two processes never share an object.

Only the main process creates the store and changes group attributes. Other processes write data objects only.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from typing import Any, Sequence

import fsspec
import numpy as np
import zarr
from zarr.codecs import BloscCodec
from zarr.core.sync import sync

FORMAT_NAME = "vq-transplant-latent-cache"
FORMAT_VERSION = 1
DTYPES = ("float16", "float32")
VIEWS = ("latents", "latents_hflip")
MAX_SKIP_EXAMPLES = 100  # skipped samples listed per shard (all of them are counted)
CHANNEL_ORDER = (
    "rows are samples in NCHW order, and channel c is channel c of the tokenizer's encoder output after quant_conv "
    "(z_e), exactly as tokenizer.encode returns it, with no reordering or normalisation"
)
DATA_ARRAYS = ("keys", "shard", "counts", "written", "skips")
# zarr's LocalStore writes `name` through a temporary `name` + "." + 32 hex digits + ".partial", then renames it
ORPHAN_PATTERN = re.compile(r"\.[0-9a-f]{32}\.partial$")


def tool_version() -> str:
    try:
        return version("vq-transplant")
    except PackageNotFoundError:
        return "unknown"


@dataclass(frozen=True)
class Layout:
    """Row layout shared by writers and readers, derived from the shard index and stored in the group attrs."""

    n_shards: int
    slot: int
    chunk_rows: int
    latent_shape: tuple[int, int, int]
    dtype: str
    views: tuple[str, ...]

    @property
    def n_rows(self) -> int:
        return self.n_shards * self.slot

    def rows(self, shard: int) -> slice:
        return slice(shard * self.slot, (shard + 1) * self.slot)

    def to_json(self) -> dict[str, Any]:
        return {
            "n_shards": self.n_shards,
            "slot": self.slot,
            "chunk_rows": self.chunk_rows,
            "latent_shape": list(self.latent_shape),
            "dtype": self.dtype,
            "views": list(self.views),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Layout":
        return cls(
            n_shards=int(data["n_shards"]),
            slot=int(data["slot"]),
            chunk_rows=int(data["chunk_rows"]),
            latent_shape=tuple(int(s) for s in data["latent_shape"]),  # type: ignore[arg-type]
            dtype=str(data["dtype"]),
            views=tuple(data["views"]),
        )


def plan_layout(
    shard_sizes: Sequence[int], latent_shape: Sequence[int], *, dtype: str = "float32", chunk_rows: int = 64,
    hflip: bool = False,
) -> Layout:
    """Size the per-shard slot from the index's sample counts (the largest, rounded up to whole chunks)."""
    if dtype not in DTYPES:
        raise ValueError(f"invalid latent dtype {dtype!r}, choose from {DTYPES}")
    if not shard_sizes:
        raise ValueError("the shard list is empty. Give at least one WebDataset shard")
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be at least 1, got {chunk_rows}")
    largest = max(max(int(n) for n in shard_sizes), 1)
    slot = math.ceil(largest / chunk_rows) * chunk_rows
    views = VIEWS if hflip else VIEWS[:1]
    return Layout(len(shard_sizes), slot, chunk_rows, tuple(int(s) for s in latent_shape), dtype, views)


def create_store(
    path: str, shards: Sequence[tuple[str, int]], layout: Layout, provenance: dict[str, Any],
) -> zarr.Group:
    """Create and preallocate the whole store. Main process only, before any writer starts.

    ``shards`` is the shard index as (url, nsamples) pairs. Every array gets its final shape here because a
    resize rewrites array metadata, which only one process may do, and growing after a shrink brings back
    stale rows.
    """
    C, h, w = layout.latent_shape
    attrs = {
        "format": {"name": FORMAT_NAME, "version": FORMAT_VERSION},
        "complete": False,
        "layout": layout.to_json(),
        "channel_order": CHANNEL_ORDER,
        "shards": [{"url": url, "nsamples": int(n)} for url, n in shards],
        "provenance": provenance,
        "tool_version": tool_version(),
    }
    try:
        group = zarr.open_group(path, mode="w-", attributes=attrs, storage_options=storage_options(path))
    except (zarr.errors.ContainsGroupError, zarr.errors.ContainsArrayError, FileExistsError) as err:
        raise FileExistsError(f"--out {path} already contains other files and is not a latent cache; give a new "
                              "--out path or delete it") from err
    n, slot = layout.n_rows, layout.slot

    # one sharding-codec object per WebDataset shard, and a NaN fill that marks rows never written
    itemsize = np.dtype(layout.dtype).itemsize
    for view in layout.views:
        group.create_array(
            view, shape=(n, C, h, w), dtype=layout.dtype, chunks=(layout.chunk_rows, C, h, w),
            shards=(slot, C, h, w), fill_value=np.nan, dimension_names=("row", "channel", "y", "x"),
            compressors=BloscCodec(cname="zstd", clevel=5, shuffle="shuffle", typesize=itemsize),
        )

    # one chunk per WebDataset shard for the row metadata, one per shard for the per-shard records
    group.create_array("keys", shape=(n,), dtype=str, chunks=(slot,), fill_value="", dimension_names=("row",))
    group.create_array("shard", shape=(n,), dtype="int32", chunks=(slot,), fill_value=-1, dimension_names=("row",))
    group.create_array("counts", shape=(layout.n_shards,), dtype="int64", chunks=(1,), fill_value=0,
                       dimension_names=("shard",))
    group.create_array("written", shape=(layout.n_shards,), dtype="uint8", chunks=(1,), fill_value=0,
                       dimension_names=("shard",))
    group.create_array("skips", shape=(layout.n_shards,), dtype=str, chunks=(1,), fill_value="",
                       dimension_names=("shard",))
    return group


def storage_options(path: str) -> dict[str, Any] | None:
    """Return the fsspec options zarr needs for ``path``: None for a plain path, which zarr opens as a LocalStore.

    On ``file://`` zarr uses an FsspecStore, which fails to write an object whose folder does not exist yet unless
    ``auto_mkdir`` is set. zarr raises when storage options come with a plain path, so those get None.
    """
    protocol = fsspec.core.split_protocol(str(path))[0]
    return {"auto_mkdir": True} if protocol in ("file", "local") else None


def remove_orphans(path: str) -> list[str]:
    """Delete the temporary files that writers killed mid-write left inside the store. Returns the deleted paths.

    Readers ignore these files, but each can be as large as a storage object and a killed build can leave many.
    Only names of the form ``<object>.<32 hex digits>.partial`` below ``path`` are touched. Call this from the main
    process while no writer runs, because a live writer's temporary file has the same form.
    """
    fs, root = fsspec.core.url_to_fs(str(path))
    if not fs.isdir(root):
        return []
    orphans = [name for name in fs.find(root) if ORPHAN_PATTERN.search(name)]
    for name in orphans:
        fs.rm_file(name)
    return orphans


def open_store(path: str, mode: str = "r") -> zarr.Group:
    """Open a latent cache group, raising a clear error when the path is not one (or its creation was cut short)."""
    try:
        group = zarr.open_group(path, mode=mode, storage_options=storage_options(path))
    except FileNotFoundError as err:
        fs, root = fsspec.core.url_to_fs(path)
        if fs.isfile(root):
            raise FileNotFoundError(f"{path} is a file, not a latent cache: give the cache's folder") from err
        raise FileNotFoundError(f"no latent cache at {path}: build one with cache/build.py --out {path}") from err
    except json.JSONDecodeError as err:
        raise ValueError(f"latent cache {path} has a corrupt zarr.json ({err}); delete {path} and rebuild it") from err
    fmt = group.attrs.get("format", {})
    if fmt.get("name") != FORMAT_NAME:
        raise ValueError(f"{path} is a Zarr group but not a vq-transplant latent cache (attrs['format'] = {fmt!r})")
    if fmt.get("version") != FORMAT_VERSION:
        raise ValueError(
            f"latent cache {path} has format version {fmt.get('version')}, this tool reads version "
            f"{FORMAT_VERSION}. Rebuild the cache with this tool version"
        )
    layout = Layout.from_json(group.attrs["layout"])
    present = set(group.array_keys())
    missing = [name for name in (*layout.views, *DATA_ARRAYS) if name not in present]
    if missing:
        raise ValueError(
            f"latent cache {path} lacks arrays {missing}: its creation was interrupted. Delete {path} and rebuild"
        )
    return group


def layout_of(group: zarr.Group) -> Layout:
    return Layout.from_json(group.attrs["layout"])


def provenance_differences(stored: dict[str, Any], expected: dict[str, Any]) -> list[str]:
    """List the provenance fields whose values differ, as 'field: stored -> expected' lines."""
    # compare through JSON so tuples and lists, or ints and floats from YAML, count as equal
    stored = json.loads(json.dumps(stored))
    expected = json.loads(json.dumps(expected))
    return _differences(stored, expected, prefix="")


def _differences(stored: Any, expected: Any, prefix: str) -> list[str]:
    """Walk nested dicts so that a line names the innermost differing field, such as 'tokenizer.sha256'."""
    if isinstance(stored, dict) and isinstance(expected, dict):
        lines = []
        for field in sorted(set(stored) | set(expected)):
            lines += _differences(stored.get(field), expected.get(field), f"{prefix}{field}.")
        return lines
    if stored == expected:
        return []
    return [f"{prefix.rstrip('.')}: {_short(stored)} -> {_short(expected)}"]


def _short(value: Any, limit: int = 120) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def written_marks(group: zarr.Group) -> np.ndarray:
    """Return the per-shard written marks as a bool array of length n_shards."""
    return np.asarray(group["written"][:], dtype=bool)


def pending_shards(group: zarr.Group) -> list[int]:
    return [int(i) for i in np.flatnonzero(~written_marks(group))]


def write_shard(
    group: zarr.Group,
    shard: int,
    keys: Sequence[str],
    views: dict[str, np.ndarray],
    skips: dict[str, Any] | None = None,
) -> None:
    """Store one WebDataset shard's rows in one call per array, then set its written mark.

    ``views`` maps each of the layout's views to its latents, (n, C, h, w) with n = len(keys). The whole slot
    is written (padding rows as NaN / "" / -1), so an earlier interrupted attempt leaves nothing behind. The
    written mark goes last: a reader or a resumed build never trusts a shard whose data may be partial.
    """
    layout = layout_of(group)
    rows = layout.rows(shard)
    n = len(keys)
    _check_shard_input(layout, shard, keys, views)
    padded = {view: np.full((layout.slot, *layout.latent_shape), np.nan, dtype=layout.dtype) for view in layout.views}
    for view in layout.views:
        padded[view][:n] = _cast_finite(views[view], layout.dtype, shard, view)

    # zarr decodes an existing shard object even when a write covers all of it, and on stores that write in place
    # (fsspec) a killed writer can leave that object truncated, so the old objects go first
    _delete_shard_objects(group, shard)

    # latents first, one whole-slot write per view: a single writer per storage object
    for view in layout.views:
        group[view][rows] = padded[view]

    # row metadata and per-shard records, each in objects that only this shard uses
    key_column = np.full(layout.slot, "", dtype=object)
    key_column[:n] = list(keys)
    group["keys"][rows] = key_column.astype(str)
    shard_column = np.full(layout.slot, -1, dtype="int32")
    shard_column[:n] = shard
    group["shard"][rows] = shard_column
    group["counts"][shard] = n
    group["skips"][shard] = json.dumps(skips or {"counts": {}, "examples": []})

    # NOTE: zarr 3.1.6 LocalStore writes each object to a temporary file and renames it, so a killed writer leaves whole
    # objects (plus an orphan temporary file, see remove_orphans). FsspecStore writes in place and can leave a
    # truncated object, which the mark set last keeps out of reads. Neither fsyncs, so a power loss right after the
    # mark could still lose data.
    group["written"][shard] = 1


def _delete_shard_objects(group: zarr.Group, shard: int) -> None:
    """Delete the storage objects that hold only this shard's rows (its written mark stays)."""
    for name in (*layout_of(group).views, "keys", "shard", "counts", "skips"):
        array = group[name]
        chunk_key = array.metadata.encode_chunk_key((shard,) + (0,) * (array.ndim - 1))
        sync(group.store.delete(f"{array.path}/{chunk_key}"))


def _check_shard_input(layout: Layout, shard: int, keys: Sequence[str], views: dict[str, np.ndarray]) -> None:
    if not 0 <= shard < layout.n_shards:
        raise IndexError(f"shard {shard} is out of range for a store of {layout.n_shards} shards")
    if len(keys) > layout.slot:
        raise ValueError(
            f"shard {shard} has {len(keys)} samples but the store reserves {layout.slot} rows per shard: the shard "
            "index under-counts this shard. Rebuild the index (shards.index) and the store"
        )
    if len(set(keys)) != len(keys):
        raise ValueError(f"shard {shard}: duplicate keys in one write. Drop duplicates before writing")
    expected = set(layout.views)
    if set(views) != expected:
        raise ValueError(f"shard {shard}: views {sorted(views)} given, but the store has views {sorted(expected)}")
    for view, array in views.items():
        if tuple(array.shape) != (len(keys), *layout.latent_shape):
            raise ValueError(
                f"shard {shard}, {view}: latents of shape {tuple(array.shape)}, expected "
                f"{(len(keys), *layout.latent_shape)}"
            )


def _cast_finite(array: np.ndarray, dtype: str, shard: int, view: str) -> np.ndarray:
    # overflow to inf is expected here and reported below with a fix, so numpy's own warning is noise
    with np.errstate(over="ignore"):
        cast = np.asarray(array).astype(dtype)
    if not np.isfinite(cast).all():
        bad = int((~np.isfinite(cast)).any(axis=(1, 2, 3)).sum())
        hint = " (values beyond float16 range: rebuild with --dtype float32)" if dtype == "float16" else ""
        raise ValueError(f"shard {shard}, {view}: {bad} latents contain NaN or inf after casting to {dtype}{hint}")
    return cast


def shard_skips(group: zarr.Group) -> list[dict[str, Any]]:
    """Return every shard's skip record, {"counts": {reason: n}, "examples": [...]}, empty for unwritten shards."""
    empty = {"counts": {}, "examples": []}
    return [json.loads(text) if text else empty for text in group["skips"][:].tolist()]


def skip_totals(group: zarr.Group) -> dict[str, int]:
    """Sum the written shards' skip counts by reason."""
    totals: dict[str, int] = {}
    for record, written in zip(shard_skips(group), written_marks(group)):
        if not written:
            continue
        for reason, count in record["counts"].items():
            totals[reason] = totals.get(reason, 0) + int(count)
    return dict(sorted(totals.items()))


def mark_complete(group: zarr.Group, extra_skips: dict[str, int] | None = None) -> dict[str, int]:
    """Record the merged skip counts and set the store's complete mark. Main process only, after all writers.

    ``extra_skips`` adds skips found only after every shard was written (keys repeated across shards).
    """
    missing = pending_shards(group)
    if missing:
        raise RuntimeError(f"cannot mark the store complete: shards {missing} are not written")
    totals = skip_totals(group)
    for reason, count in (extra_skips or {}).items():
        totals[reason] = totals.get(reason, 0) + int(count)
    group.attrs.update({"skips": totals, "complete": True})
    return totals


def cross_shard_duplicates(group: zarr.Group) -> list[tuple[str, int, int]]:
    """Find keys stored by more than one shard, as (key, first shard, later shard). Readers keep the first."""
    layout = layout_of(group)
    counts = np.asarray(group["counts"][:])
    marks = written_marks(group)
    first_shard: dict[str, int] = {}
    repeats = []
    for shard in range(layout.n_shards):
        if not marks[shard]:
            continue
        start = shard * layout.slot
        for key in group["keys"][start : start + int(counts[shard])].tolist():
            if key in first_shard:
                repeats.append((key, first_shard[key], shard))
            else:
                first_shard[key] = shard
    return repeats
