"""Write a folder of images as WebDataset tar shards plus the shard-index JSON.

Images directly in the folder get no label; images in sub-folders get `cls` = the sub-folder's position in the
sorted list of sub-folder names, and every sample gets a `json` member with its source path and class name.
Keys are the relative paths with separators and dots replaced, because webdataset splits member names at the
first dot.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import webdataset as wds

from shards.index import ShardInfo, write_index

SUFFIX_TO_FIELD = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png", ".webp": "webp"}


def _key_for(relative: Path) -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", str(relative.with_suffix("")))


def list_images(folder: Path) -> list[tuple[Path, str | None]]:
    """Return (image path, class name or None) for every image under `folder`, sorted by path."""
    items = []
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.suffix.lower() in SUFFIX_TO_FIELD:
            relative = path.relative_to(folder)
            items.append((path, relative.parts[0] if len(relative.parts) > 1 else None))
    return items


def write_shards(folder: str | Path, out_dir: str | Path, prefix: str = "shard", maxcount: int = 1000) -> list[ShardInfo]:
    """Write `folder`'s images to `out_dir/prefix-000000.tar`, ... and `out_dir/prefix.json`; return the index."""
    folder, out_dir = Path(folder), Path(out_dir)
    if maxcount < 1:
        raise ValueError(f"--maxcount {maxcount}: give at least 1 sample per shard")
    if not folder.is_dir():
        raise NotADirectoryError(f"{folder} is not a folder; give the folder of images to write as shards")
    items = list_images(folder)
    if not items:
        raise FileNotFoundError(f"no images ({', '.join(SUFFIX_TO_FIELD)}) found under {folder}")
    classes = sorted({c for _, c in items if c is not None})
    class_index = {name: i for i, name in enumerate(classes)}
    out_dir.mkdir(parents=True, exist_ok=True)
    stale = sorted(out_dir.glob(f"{prefix}-*.tar"))
    if stale:
        raise FileExistsError(f"{out_dir} already contains shards named {prefix}-*.tar ({stale[0].name}, ...); choose another folder or prefix")

    keys: set[str] = set()
    with wds.ShardWriter(str(out_dir / f"{prefix}-%06d.tar"), maxcount=maxcount, verbose=0) as sink:
        for path, class_name in items:
            key = _key_for(path.relative_to(folder))
            if key in keys:
                raise ValueError(f"two images map to the same shard key {key!r} (one is {path}); rename one of them")
            keys.add(key)
            sample = {"__key__": key, SUFFIX_TO_FIELD[path.suffix.lower()]: path.read_bytes()}
            meta = {"source": str(path.relative_to(folder))}
            if class_name is not None:
                sample["cls"] = class_index[class_name]
                meta["class_name"] = class_name
            sample["json"] = json.dumps(meta).encode()
            sink.write(sample)

    shards = []
    for i, tar in enumerate(sorted(out_dir.glob(f"{prefix}-*.tar"))):
        count = min(maxcount, len(items) - i * maxcount)
        shards.append(ShardInfo(str(tar), count, tar.stat().st_size))
    write_index(shards, str(out_dir / f"{prefix}.json"), relative_to=str(out_dir))
    return shards


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write a folder of images (class sub-folders optional) as WebDataset shards.")
    parser.add_argument("folder", help="folder of images; sub-folder names become class labels")
    parser.add_argument("out_dir", help="folder for the shards and the index JSON")
    parser.add_argument("--prefix", default="shard", help="shard file name prefix (default: shard)")
    parser.add_argument("--maxcount", type=int, default=1000, help="samples per shard (default: 1000)")
    args = parser.parse_args(argv)
    shards = write_shards(args.folder, args.out_dir, args.prefix, args.maxcount)
    print(f"wrote {len(shards)} shards with {sum(s.nsamples for s in shards)} samples and {args.out_dir}/{args.prefix}.json")


if __name__ == "__main__":
    from common.config import exit_on_input_error

    with exit_on_input_error():
        main()
