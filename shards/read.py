"""Read WebDataset shards as preprocessed image samples, with an explicit policy for bad samples.

The pipeline is a chain of small generators over webdataset's tar reader. Splitting is explicit: the caller
passes the shards this process owns (see `shards_for_rank`), and loader workers split them further with
webdataset's `split_by_worker`. A bad sample (undecodable image, missing image member, non-integer label, key with a
dot, duplicate key, members not adjacent in the tar, truncated tar) never stops the stream: it becomes a *skip record* `{"skip": reason, "key", "url", "error"}`
that the consumer counts, logs and stores, so counts survive loader workers. Nothing sleeps on errors.
"""

from __future__ import annotations

import io
import logging
import re
from collections import Counter
from functools import partial
from collections.abc import Iterable, Iterator

import fsspec
import torch
import webdataset as wds
from PIL import Image, UnidentifiedImageError

from common.preprocess import var_transform
from shards.index import IMAGE_EXTENSIONS

log = logging.getLogger(__name__)


class SkipLog:
    """Counts skip records by reason and logs each with its shard and key; raises instead when strict."""

    def __init__(self, strict: bool = False, max_logged: int = 100):
        self.strict = strict
        self.counts: Counter[str] = Counter()
        self.examples: list[dict] = []
        self.max_logged = max_logged

    def record(self, skip: dict, count: int = 1) -> None:
        """Count `count` samples under the record's reason; one record may stand for several missing samples."""
        if self.strict:
            raise BadSampleError(f"bad sample in {skip['url']} key {skip['key']!r}: {skip['skip']} ({skip['error']}). "
                                 "Remove or fix it in the shard, or run without --strict to skip and count it")
        self.counts[skip["skip"]] += count
        total = sum(self.counts.values())
        if total <= self.max_logged:
            log.warning("skipped %s key %r: %s (%s)", skip["url"], skip["key"], skip["skip"], skip["error"])
            self.examples.append({k: skip[k] for k in ("url", "key", "skip", "error")})
        elif total == self.max_logged + 1:
            log.warning("more than %d bad samples; further skips are counted but not logged", self.max_logged)


class BadSampleError(ValueError):
    pass


def shards_for_rank(urls: list[str], rank: int, world_size: int) -> list[str]:
    """Deal shards to processes round-robin (shard i to rank i mod world); a rank may get none."""
    return urls[rank::world_size]


def _raw_samples(urls: list[str], split_workers: bool) -> Iterator[dict]:
    """Yield webdataset's raw samples (field name -> bytes), turning tar errors into skip records."""
    stages: list = [wds.SimpleShardList(urls)]
    if split_workers:
        stages.append(wds.split_by_worker)
    pending: list[dict] = []
    failed_urls: set[str | None] = set()

    current: dict[str, str | None] = {"url": None}  # the shard being read, for errors that do not name it

    def on_error(exn: Exception) -> bool:
        # webdataset reports one broken tar at more than one stage; one record per shard is enough.
        url = _url_of(exn) or current["url"]
        if url not in failed_urls:
            failed_urls.add(url)
            pending.append({"skip": "unreadable_tar", "key": None, "url": url, "error": describe_error(exn)})
        return True

    stages.append(partial(_open_shards, handler=on_error, current=current))
    stages.append(partial(wds.tariterators.tar_file_expander, handler=on_error))
    stages.append(partial(wds.tariterators.group_by_keys, handler=on_error))
    for sample in wds.DataPipeline(*stages):
        while pending:
            yield pending.pop(0)
        yield sample
    yield from pending


def _open_shards(sources: Iterable[dict], handler, current: dict) -> Iterator[dict]:
    """Open each shard URL with fsspec, so local paths, file://, s3://, memory:// and other schemes all work.

    webdataset 1.0.2's own opener handles only plain paths, file:, pipe: and http(s).
    """
    for source in sources:
        url = source["url"]
        current["url"] = url
        try:
            fs, path = fsspec.core.url_to_fs(url)
            stream = fs.open(path, "rb")
        except OSError as exn:
            exn.args = exn.args + (url,)
            if handler(exn):
                continue
            break
        try:
            yield {**source, "stream": stream}
        finally:
            # The tar reader has moved on to the next shard (or stopped) when control returns here.
            stream.close()


def describe_error(err: BaseException) -> str:
    """Return the error's type and message without memory addresses, at most 200 characters.

    Skip records are stored in the cache, and an address such as `<_io.BytesIO object at 0x7f...>` would make two
    builds of the same shards differ.
    """
    return re.sub(r" at 0x[0-9a-fA-F]+", "", f"{type(err).__name__}: {err}")[:200]


def _url_of(exn: Exception) -> str | None:
    """Find the shard URL in a webdataset error, whose message or arguments name the file being read."""
    match = re.search(r"([^\s'\"<>]+\.tar)\b", repr(exn))
    return match.group(1) if match else None


def _decode(samples: Iterable[dict], image_size: int) -> Iterator[dict]:
    transform = var_transform(image_size)
    # fields of each key seen so far in the current shard; shards are read one after another, so one shard suffices
    shard_url: str | None = None
    fields_of: dict[str, set[str]] = {}
    for sample in samples:
        if "skip" in sample:
            yield sample
            continue
        key, url = sample["__key__"], sample.get("__url__")
        if url != shard_url:
            shard_url, fields_of = url, {}
        fields = [k for k in sample if not k.startswith("__")]
        if any("." in f for f in fields):
            # webdataset splits a member name at its first dot, so a key "a.b" shows up as fields "b.jpg" etc.
            yield {"skip": "key_with_dot", "key": f"{key}.{fields[0].split('.')[0]}", "url": url, "error": f"fields {fields}"}
            continue
        if key in fields_of:
            yield _repeated_key(key, url, fields_of[key], fields)
            continue
        fields_of[key] = set(fields)
        ext = next((e for e in IMAGE_EXTENSIONS if e in sample), None)
        if ext is None:
            yield {"skip": "missing_image", "key": key, "url": url, "error": f"no image member among {fields}"}
            continue
        try:
            with Image.open(io.BytesIO(sample[ext])) as img:
                image = transform(img)
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
            yield {"skip": "undecodable_image", "key": key, "url": url, "error": describe_error(err)}
            continue
        try:
            cls = int(sample["cls"].decode().strip()) if "cls" in sample else -1
        except (UnicodeDecodeError, ValueError) as err:
            yield {"skip": "invalid_label", "key": key, "url": url, "error": describe_error(err)}
            continue
        yield {"key": key, "image": image, "cls": cls, "url": url}


def _repeated_key(key: str, url: str | None, earlier: set[str], fields: list[str]) -> dict:
    """Return the skip record for a key that comes back after other keys in the same shard.

    webdataset groups only adjacent members into a sample. Disjoint fields mean one sample's members were spread
    through the tar (as `tar cf shard.tar *.cls *.jpg` writes them), rather than two samples sharing a key.
    """
    if earlier.isdisjoint(fields):
        return {"skip": "split_sample", "key": key, "url": url,
                "error": f"members {sorted(earlier)} and {sorted(fields)} are not adjacent in the tar; webdataset "
                         "reads a sample's members only when they follow each other, so rewrite the shard with "
                         "each sample's files together, for example with GNU tar's --sort=name"}
    return {"skip": "duplicate_key", "key": key, "url": url, "error": "key appears twice in the shard"}


class ImageSamples(torch.utils.data.IterableDataset):
    """Preprocessed samples `{"key", "image" (3, R, R) in [−1, 1], "cls", "url"}` plus skip records.

    Safe in DataLoader workers: each worker reads its own share of `urls`.
    """

    def __init__(self, urls: list[str], image_size: int, split_workers: bool = True):
        super().__init__()
        self.urls = list(urls)
        self.image_size = image_size
        self.split_workers = split_workers

    def __iter__(self) -> Iterator[dict]:
        return _decode(_raw_samples(self.urls, self.split_workers), self.image_size)


def iter_samples(urls: list[str], image_size: int, skips: SkipLog | None = None) -> Iterator[dict]:
    """Yield good samples of `urls` in order, recording bad ones in `skips` (a fresh SkipLog if None)."""
    skips = skips if skips is not None else SkipLog()
    for sample in ImageSamples(urls, image_size, split_workers=False):
        if "skip" in sample:
            skips.record(sample)
        else:
            yield sample


def collate_samples(samples: list[dict]) -> dict:
    """Collate good samples into a batch and pass skip records through as a list."""
    good = [s for s in samples if "skip" not in s]
    batch = {
        "key": [s["key"] for s in good],
        "url": [s["url"] for s in good],
        "cls": torch.tensor([s["cls"] for s in good], dtype=torch.long),
        "image": torch.stack([s["image"] for s in good]) if good else torch.empty(0),
        "skips": [s for s in samples if "skip" in s],
    }
    return batch
