"""Check a latent cache against its own layout (and optionally its shard set), and summarise what it stores.

    python -m cache.verify latents.zarr [--shards data/train.json] [--tokenizer-sha256 HASH] [--json]

Exit status 1 when any check fails. Every row of every shard is read once, so this takes as long as one pass
over the cache.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from typing import Any

import fsspec
import numpy as np
import zarr

from cache.store import Layout, cross_shard_duplicates, layout_of, open_store, skip_totals, written_marks
from common.config import exit_on_input_error
from shards.index import index_hash, resolve_shards
from shards.read import describe_error

REQUIRED_PROVENANCE = ("tokenizer", "preprocessing", "image_size", "dtype", "shard_index_sha256")


@dataclass
class VerifyReport:
    """Failed checks (errors), oddities that do not make the cache wrong (warnings), and the inspect summary."""

    path: str
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.errors


class ChannelStats:
    """Per-channel mean and standard deviation, accumulated in float64 over (rows, y, x)."""

    def __init__(self, channels: int):
        self.count = 0
        self.total = np.zeros(channels)
        self.squares = np.zeros(channels)

    def add(self, z: np.ndarray) -> None:  # z: (n, C, h, w)
        z = z.astype(np.float64)
        self.count += z.shape[0] * z.shape[2] * z.shape[3]
        self.total += z.sum(axis=(0, 2, 3))
        self.squares += (z * z).sum(axis=(0, 2, 3))

    def result(self) -> dict[str, list[float]]:
        n = max(self.count, 1)
        mean = self.total / n
        std = np.sqrt(np.maximum(self.squares / n - mean * mean, 0.0))
        return {"mean": [round(float(v), 6) for v in mean], "std": [round(float(v), 6) for v in std]}


def check_arrays(group: zarr.Group, layout: Layout, report: VerifyReport) -> None:
    """Check every array's shape, dtype and storage layout against the recorded layout."""
    C, h, w = layout.latent_shape
    for view in layout.views:
        array = group[view]
        if array.shape != (layout.n_rows, C, h, w) or str(array.dtype) != layout.dtype:
            report.errors.append(f"{view}: shape {array.shape} dtype {array.dtype}, expected "
                                 f"{(layout.n_rows, C, h, w)} {layout.dtype}")
        if array.shards != (layout.slot, C, h, w):
            report.errors.append(f"{view}: storage shard shape {array.shards}, expected one object per WebDataset "
                                 f"shard {(layout.slot, C, h, w)}")
    for name, shape in (("keys", (layout.n_rows,)), ("shard", (layout.n_rows,)), ("counts", (layout.n_shards,)),
                        ("written", (layout.n_shards,)), ("skips", (layout.n_shards,))):
        if group[name].shape != shape:
            report.errors.append(f"{name}: shape {group[name].shape}, expected {shape}")


def check_completion(group: zarr.Group, report: VerifyReport) -> np.ndarray:
    marks = written_marks(group)
    missing = [int(i) for i in np.flatnonzero(~marks)]
    if missing:
        more = " ..." if len(missing) > 20 else ""
        report.errors.append(f"{len(missing)} shards are not written: {missing[:20]}{more}")
    if not group.attrs.get("complete"):
        report.errors.append("the store's complete mark is not set")
    return marks


def check_shard_rows(group: zarr.Group, layout: Layout, shard: int, report: VerifyReport, stats: dict) -> list[str]:
    """Check one written shard's rows (keys, shard ids, finite latents, NaN padding) and return its keys."""
    count = int(group["counts"][shard])
    nsamples = int(group.attrs["shards"][shard]["nsamples"])
    rows = layout.rows(shard)
    keys = group["keys"][rows].tolist()
    shard_ids = np.asarray(group["shard"][rows])
    prefix = f"shard {shard}"
    if count > nsamples:
        report.errors.append(f"{prefix}: {count} rows stored but the shard index lists {nsamples} samples")
    skipped = sum(json.loads(str(group["skips"][shard])).get("counts", {}).values())
    if count + skipped < nsamples:
        # builds count samples missing from a tar as skips, so only a store from an older build gets here
        report.warnings.append(f"{prefix}: {count} rows stored and {skipped} skipped, but the shard index lists "
                               f"{nsamples} samples. The tar may be cut short: check {group.attrs['shards'][shard]['url']}")
    if any(k == "" for k in keys[:count]) or any(k != "" for k in keys[count:]):
        report.errors.append(f"{prefix}: keys do not fill exactly its first {count} rows")
    if len(set(keys[:count])) != count:
        report.errors.append(f"{prefix}: a key appears more than once within the shard")
    if not (shard_ids[:count] == shard).all() or not (shard_ids[count:] == -1).all():
        report.errors.append(f"{prefix}: the 'shard' column does not match the row layout")
    for view in layout.views:
        z = np.asarray(group[view][rows])  # (slot, C, h, w)
        live, padding = z[:count], z[count:]
        bad = int((~np.isfinite(live)).any(axis=(1, 2, 3)).sum())
        if bad:
            report.errors.append(f"{prefix}, {view}: {bad} stored rows contain NaN or inf (unwritten fill?)")
        if not np.isnan(padding).all():
            report.errors.append(f"{prefix}, {view}: padding rows after row {count} hold data")
        zero_rows = int((live == 0).all(axis=(1, 2, 3)).sum())
        if zero_rows:
            report.warnings.append(f"{prefix}, {view}: {zero_rows} rows are all zeros")
        stats[view].add(live[np.isfinite(live).all(axis=(1, 2, 3))])
    return keys[:count]


def check_skips(group: zarr.Group, report: VerifyReport) -> None:
    """Check that the recorded skip totals equal the per-shard counts plus keys repeated across shards."""
    repeats = cross_shard_duplicates(group)
    expected = skip_totals(group)
    if repeats:
        expected["duplicate_key"] = expected.get("duplicate_key", 0) + len(repeats)
        report.warnings.append(f"{len(repeats)} keys appear in more than one shard (first: {repeats[0][0]!r}), and "
                               "readers use each key's first shard")
    recorded = group.attrs.get("skips")
    if recorded is not None and {k: v for k, v in recorded.items() if v} != {k: v for k, v in expected.items() if v}:
        report.errors.append(f"recorded skip totals {recorded} differ from the per-shard records {expected}")


def check_provenance(group: zarr.Group, layout: Layout, tokenizer_sha256: str | None, report: VerifyReport) -> None:
    provenance = group.attrs.get("provenance", {})
    missing = [name for name in REQUIRED_PROVENANCE if name not in provenance]
    if missing:
        report.errors.append(f"provenance lacks {missing}")
        return
    if provenance["dtype"] != layout.dtype:
        report.errors.append(f"provenance dtype {provenance['dtype']} differs from the stored {layout.dtype}")
    if not provenance["tokenizer"].get("sha256"):
        report.errors.append("provenance has no tokenizer sha256")
    if tokenizer_sha256 and provenance["tokenizer"].get("sha256") != tokenizer_sha256:
        report.errors.append(f"built with tokenizer sha256 {provenance['tokenizer'].get('sha256')}, "
                             f"expected {tokenizer_sha256}")


def check_shard_set(group: zarr.Group, spec: str | list[str], report: VerifyReport) -> None:
    """Compare the store with a shard set: same index hash, and every shard's sample count."""
    shards = resolve_shards(spec)
    spec = spec if isinstance(spec, str) else " ".join(spec)
    if index_hash(shards) != group.attrs["provenance"]["shard_index_sha256"]:
        report.errors.append(f"--shards {spec}: the index hash of this shard set differs from the cache's")
    stored = [int(s["nsamples"]) for s in group.attrs["shards"]]
    if [s.nsamples for s in shards] != stored:
        report.errors.append(f"--shards {spec}: sample counts {[s.nsamples for s in shards]} differ from the "
                             f"cache's {stored}")


def storage_summary(path: str, group: zarr.Group, layout: Layout, stored_rows: int) -> dict[str, Any]:
    """Return size on disk, bytes per stored latent and the compression ratio of each view."""
    fs, root = fsspec.core.url_to_fs(path)
    root = root.rstrip("/")
    summary: dict[str, Any] = {"total_bytes": int(fs.du(root))}
    raw_per_latent = int(np.prod(layout.latent_shape)) * np.dtype(layout.dtype).itemsize
    for view in layout.views:
        stored = int(fs.du(f"{root}/{view}"))
        per_latent = stored / max(stored_rows, 1)
        summary[view] = {
            "bytes": stored,
            "bytes_per_latent": round(per_latent, 1) if stored_rows else None,
            "raw_bytes_per_latent": raw_per_latent,
            "compression_ratio": round(raw_per_latent / per_latent, 3) if stored_rows else None,
            "compressors": [c.to_dict()["name"] for c in group[view].compressors],
        }
    return summary


def verify_store(path: str, shards: str | list[str] | None = None, tokenizer_sha256: str | None = None) -> VerifyReport:
    """Run every check on the store at ``path`` and collect the inspect summary."""
    report = VerifyReport(path)
    group = open_store(path, mode="r")
    layout = layout_of(group)

    # structure, completion and provenance
    check_arrays(group, layout, report)
    marks = check_completion(group, report)
    check_provenance(group, layout, tokenizer_sha256, report)
    if shards:
        check_shard_set(group, shards, report)

    # every written shard's rows, once
    stats = {view: ChannelStats(layout.latent_shape[0]) for view in layout.views}
    stored_rows = 0
    for shard in np.flatnonzero(marks):
        try:
            stored_rows += len(check_shard_rows(group, layout, int(shard), report, stats))
        except Exception as error:  # a damaged object fails to decode in zarr or its codecs, each in its own way
            report.errors.append(f"shard {shard}: its stored objects cannot be read ({describe_error(error)}). "
                                 "Rebuild the cache into a new --out")
    try:
        check_skips(group, report)
    except Exception as error:
        report.errors.append(f"the skip records or keys cannot be read ({describe_error(error)}). Rebuild the "
                             "cache into a new --out")
    if stored_rows == 0:
        report.warnings.append("no latents are stored: every sample was skipped or no shard is written (see skips)")

    # the inspect summary
    report.summary = {
        "shards": layout.n_shards,
        "written_shards": int(marks.sum()),
        "stored_latents": stored_rows,
        "latent_shape": list(layout.latent_shape),
        "dtype": layout.dtype,
        # stores built before the encode precision was recorded have none
        "encode_precision": group.attrs["provenance"].get("encode_precision"),
        "rows_per_shard_slot": layout.slot,
        "chunk_rows": layout.chunk_rows,
        "skips": group.attrs.get("skips", {}),
        "storage": storage_summary(path, group, layout, stored_rows),
        "channel_stats": {view: s.result() for view, s in stats.items()} if stored_rows else {},
        "tokenizer_sha256": group.attrs["provenance"]["tokenizer"].get("sha256"),
        "tool_version": group.attrs.get("tool_version"),
    }
    return report


def format_report(report: VerifyReport) -> str:
    s = report.summary
    lines = [f"latent cache {report.path}: {'OK' if report.ok else 'FAILED'}"]
    lines.append(f"  {s['written_shards']}/{s['shards']} shards written, {s['stored_latents']} latents of "
                 f"{'x'.join(map(str, s['latent_shape']))} {s['dtype']}, skips {s['skips'] or 'none'}")
    lines.append(f"  encoded in {s['encode_precision'] or 'an unrecorded precision'}")
    lines.append(f"  size on disk {s['storage']['total_bytes'] / 2**20:.2f} MiB")
    for view, stats in s["channel_stats"].items():
        storage = s["storage"][view]
        codecs = "+".join(storage["compressors"])
        lines.append(f"  {view}: {storage['bytes_per_latent']} bytes per latent "
                     f"(raw {storage['raw_bytes_per_latent']}, ratio {storage['compression_ratio']}, {codecs})")
        mean, std = np.array(stats["mean"]), np.array(stats["std"])
        lines.append(f"    channel mean in [{mean.min():.4f}, {mean.max():.4f}], "
                     f"std in [{std.min():.4f}, {std.max():.4f}]")
    lines += [f"  ERROR: {e}" for e in report.errors]
    lines += [f"  warning: {w}" for w in report.warnings]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Check a latent cache and summarise its contents.")
    parser.add_argument("store", help="path or URL of the Zarr store written by cache/build.py")
    parser.add_argument("--shards", nargs="+",
                        help="shard set the cache should match: index JSONs, brace patterns or shard URLs")
    parser.add_argument("--tokenizer-sha256", help="sha256 of the tokenizer checkpoint the cache should come from")
    parser.add_argument("--json", action="store_true", help="print the report as JSON instead of text")
    args = parser.parse_args(argv)
    report = verify_store(args.store, shards=args.shards, tokenizer_sha256=args.tokenizer_sha256)
    if args.json:
        result = {"ok": report.ok, "errors": report.errors, "warnings": report.warnings, **report.summary}
        print(json.dumps(result, indent=1))
    else:
        print(format_report(report))
    return 0 if report.ok else 1


if __name__ == "__main__":
    with exit_on_input_error():
        sys.exit(main())
