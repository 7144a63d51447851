"""Shard lists and webdataset's shard-index JSON (`"__kind__": "wids-shard-index-v1"`).

A shard set is named by an index file, a brace pattern (`imagenet-train-{0000..1023}.tar`), a comma list or a
single URL; any fsspec URL works (local paths, `file://`, `s3://`, `memory://`, ...). When a set arrives without an
index, `build_index` counts samples by reading the tar headers only.
"""

from __future__ import annotations

import hashlib
import json
import os
import tarfile
from dataclasses import dataclass
from pathlib import PurePosixPath

import fsspec
from braceexpand import braceexpand

INDEX_KIND = "wids-shard-index-v1"
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


@dataclass(frozen=True)
class ShardInfo:
    url: str
    nsamples: int
    filesize: int


def expand_urls(spec: str | list[str]) -> list[str]:
    """Expand brace patterns and lists into a flat list of URLs.

    A string is split at commas and spaces. The items of a list (one command-line argument each) are split at
    commas only, so paths that contain spaces survive. Commas inside braces, as in 'shard-{a,b}.tar', belong to
    the brace pattern and do not split.
    """
    items = [spec] if isinstance(spec, str) else spec
    separators = ", " if isinstance(spec, str) else ","
    parts = [part for item in items for part in _split_outside_braces(item, separators) if part]
    return [url for part in parts for url in braceexpand(part)]


def _split_outside_braces(text: str, separators: str) -> list[str]:
    """Split `text` at any character of `separators` that is not inside {...}."""
    parts, current, depth = [], [], 0
    for char in text:
        depth += (char == "{") - (char == "}")
        if char in separators and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return parts


def sample_key(member_name: str) -> tuple[str, str]:
    """Split a tar member name into (key, field) at the first dot of its base name, as webdataset does."""
    path = PurePosixPath(member_name)
    stem, _, field = path.name.partition(".")
    parent = str(path.parent)
    return (stem if parent == "." else f"{parent}/{stem}"), field


def count_samples(url: str) -> ShardInfo:
    """Count the samples of one tar shard from its member headers (no member data is decoded)."""
    keys: set[str] = set()
    fs, path = fsspec.core.url_to_fs(url)
    if not fs.isfile(path):
        raise FileNotFoundError(f"shard {url}: not found or not a file; check the shard pattern or list")
    try:
        with fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r|*") as tar:
            for member in tar:
                if member.isfile():
                    keys.add(sample_key(member.name)[0])
    except tarfile.TarError as error:
        raise ValueError(f"shard {url} is not a readable tar file ({error}); rewrite it or drop it from the list") from None
    size = fs.size(path)
    return ShardInfo(url, len(keys), int(size))


def build_index(urls: list[str]) -> list[ShardInfo]:
    return [count_samples(url) for url in urls]


def write_index(shards: list[ShardInfo], path: str, relative_to: str | None = None) -> None:
    """Write the shard-index JSON; URLs under `relative_to` are stored relative to it, as webdataset's own tools do."""
    entries = []
    for info in shards:
        url = info.url
        if relative_to and url.startswith(relative_to.rstrip("/") + "/"):
            url = url[len(relative_to.rstrip("/")) + 1 :]
        entries.append({"url": url, "nsamples": info.nsamples, "filesize": info.filesize})
    with fsspec.open(path, "w") as f:
        json.dump({"__kind__": INDEX_KIND, "wids_version": 1, "shardlist": entries}, f, indent=1)


def load_index(url: str) -> list[ShardInfo]:
    """Read a shard-index JSON; relative shard URLs are resolved against the index's own location."""
    fs, path = fsspec.core.url_to_fs(url)
    if not fs.isfile(path):
        hint = " Give several indexes as separate arguments or separated by commas." if " " in url else ""
        raise FileNotFoundError(f"shard index {url}: not found or not a file; give an index JSON written by "
                                f"`python -m shards.index`.{hint}")
    with fs.open(path, "r") as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as error:
            raise ValueError(f"shard index {url} is not valid JSON ({error}); rebuild it with `python -m shards.index`") from None
    if not isinstance(data, dict) or data.get("__kind__") != INDEX_KIND or "shardlist" not in data:
        raise ValueError(f"{url} is not a webdataset shard index: expected '__kind__': '{INDEX_KIND}' and a 'shardlist'")
    base = url.rsplit("/", 1)[0] if "/" in url else "."
    shards = []
    for entry in data["shardlist"]:
        shard_url = entry["url"]
        if "://" not in shard_url and not shard_url.startswith("/"):
            shard_url = f"{base}/{shard_url}"
        shards.append(ShardInfo(shard_url, int(entry["nsamples"]), int(entry.get("filesize", 0))))
    return shards


def resolve_shards(spec: str | list[str]) -> list[ShardInfo]:
    """Turn a shard spec (index JSONs, brace patterns or a list) into ShardInfos, counting samples if needed.

    Index JSONs in the list contribute their shards in their place, so several indexes can be given together.
    """
    urls = expand_urls(spec)
    indexes = {url: load_index(url) for url in urls if url.endswith(".json")}
    _reject_repeated_shards(urls, indexes)
    missing = [u for u in urls if u not in indexes and not _exists(u)]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        hint = " Give several shards or indexes as separate arguments or separated by commas." if " " in missing[0] else ""
        raise FileNotFoundError(f"shard not found: {missing[0]}{more}.{hint}")
    shards: list[ShardInfo] = []
    for url in urls:
        shards.extend(indexes[url] if url in indexes else build_index([url]))
    return shards


def _reject_repeated_shards(urls: list[str], indexes: dict[str, list[ShardInfo]]) -> None:
    """Raise if a shard appears twice in the list, which would encode or read every one of its samples twice."""
    seen: set[str] = set()
    for url in urls:
        for shard in indexes[url] if url in indexes else [ShardInfo(url, 0, 0)]:
            # local paths are compared in absolute, normalised form, so "a/./x.tar" and "a/x.tar" are one shard
            name = shard.url if "://" in shard.url else os.path.abspath(shard.url)
            if name in seen:
                raise ValueError(f"shard {shard.url} appears more than once in the shard list; give each shard or "
                                 "index once")
            seen.add(name)


def index_hash(shards: list[ShardInfo]) -> str:
    """Return a sha256 over shard file names, sample counts and file sizes, which survive moving the shards."""
    names = [{"name": PurePosixPath(s.url).name, "nsamples": s.nsamples, "filesize": s.filesize} for s in shards]
    return hashlib.sha256(json.dumps(names, sort_keys=True).encode()).hexdigest()


def _exists(url: str) -> bool:
    fs, path = fsspec.core.url_to_fs(url)
    return fs.exists(path)


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description="Build a shard-index JSON for a foreign shard set.")
    parser.add_argument("shards", help="brace pattern or list of shard URLs, e.g. 'data/train-{0000..0099}.tar'")
    parser.add_argument("--out", required=True, help="where to write the index JSON")
    args = parser.parse_args(argv)
    shards = build_index(expand_urls(args.shards))
    write_index(shards, args.out, relative_to=args.out.rsplit("/", 1)[0] if "/" in args.out else None)
    print(f"wrote {args.out}: {len(shards)} shards, {sum(s.nsamples for s in shards)} samples")


if __name__ == "__main__":
    from common.config import exit_on_input_error

    with exit_on_input_error():
        main()
