"""Encode a WebDataset shard set once with the frozen tokenizer encoder and store the latents in a Zarr v3 cache.

    accelerate launch cache/build.py --shards 'data/train-{0000..0099}.tar' --tokenizer vae.pth --out latents.zarr

Also runs as plain `python cache/build.py ...`. Each process encodes whole shards and writes each one in a single
call, so processes never share a storage object. Rerunning the same command resumes: shards already marked
written are kept and only the others are encoded.

The encoder computes in IEEE float32 (TensorFloat-32 is turned off on GPUs) and the latents are stored as
float32 by default, because float16 storage, `--bf16` and `--tf32` each move some multi-scale indices to
another code. `python -m cache.precision` measures by how much.

NOTE: convolutions can round differently with another device or CPU thread count, so a shard redone on resume
may differ in the last bit from what the first run would have stored.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fsspec
import torch
import zarr
from accelerate import Accelerator
from torch.utils.data import DataLoader
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from cache.encode import Encoder, ShardBatches, ShardBuffer
from cache.store import (
    DTYPES, Layout, create_store, cross_shard_duplicates, layout_of, mark_complete, open_store, pending_shards,
    plan_layout, provenance_differences, remove_orphans, write_shard,
)
from common.config import config_to_dict, exit_on_input_error, parse_config
from common.preprocess import transform_description
from common.processes import end_processes
from common.tokenizer import VQVAE, load_tokenizer
from shards.index import ShardInfo, index_hash, resolve_shards
from shards.read import shards_for_rank

log = logging.getLogger("cache.build")


@dataclass
class BuildConfig:
    """Encode WebDataset shards with a frozen tokenizer encoder into a Zarr v3 latent cache."""

    shards: tuple[str, ...] = field(metadata={
        "help": "a shard-index JSON, brace patterns such as 'train-{0000..0099}.tar', or a list of shard URLs"})
    tokenizer: str = field(metadata={"help": "tokenizer checkpoint: VAR .pth, or this tool's .safetensors"})
    out: str = field(metadata={"help": "Zarr store to create, or to resume when it contains an unfinished build"})
    dtype: str = field(default="float32", metadata={
        "help": "stored latent dtype. float16 halves the disk but moves some multi-scale indices; measure it on your "
                "data with python -m cache.precision", "choices": DTYPES})
    batch_size: int = field(default=32, metadata={
        "help": "images per encoder call, per process (a different batch size may change the latents' last bits)"})
    workers: int = field(default=2, metadata={"help": "DataLoader worker processes decoding images, per process"})
    hflip: bool = field(default=False, metadata={"help": "also store latents of horizontally flipped images"})
    strict: bool = field(default=False, metadata={"help": "stop at the first bad sample instead of skipping it"})
    image_size: int | None = field(default=None, metadata={
        "help": "side R of the preprocessed images in pixels (default: the tokenizer's own image size)"})
    chunk_rows: int = field(default=64, metadata={"help": "latents per Zarr chunk (the unit of a random read)"})
    bf16: bool = field(default=False, metadata={"help": "encode under bfloat16 autocast (changes the latents)"})
    tf32: bool = field(default=False, metadata={
        "help": "let GPU convolutions use TensorFloat-32 instead of IEEE float32 (changes the latents)"})
    channels_last: bool = field(default=False, metadata={
        "help": "run the encoder in channels_last memory format (may change the latents' last bits)"})


def load_frozen_tokenizer(path: str) -> VQVAE:
    """Load the tokenizer, checking first that the file exists, because every process would fail on it."""
    if "://" not in path and Path(path).is_dir():
        raise IsADirectoryError(f"--tokenizer {path} is a folder. Give the path of the checkpoint file inside it")
    if "://" not in path and not Path(path).is_file():
        raise FileNotFoundError(f"--tokenizer {path}: file not found. Give the path of the tokenizer checkpoint")
    return load_tokenizer(path)


def resolve_image_size(cfg: BuildConfig, tokenizer: VQVAE) -> int:
    size = tokenizer.image_size if cfg.image_size is None else cfg.image_size
    downsample = tokenizer.config.downsample
    if size < downsample or size % downsample:
        raise ValueError(
            f"--image-size {size} is not a positive multiple of the tokenizer's downsampling factor {downsample}. "
            f"Pick one, or leave the option out to use the tokenizer's own {tokenizer.image_size}"
        )
    if size != tokenizer.image_size:
        # the multi-scale quantizers' finest scale is the tokenizer's own latent side
        log.warning("--image-size %d gives %dx%d latents, but the tokenizer's quantizers expect %dx%d from %d-pixel "
                    "images", size, size // downsample, size // downsample, tokenizer.image_size // downsample,
                    tokenizer.image_size // downsample, tokenizer.image_size)
    return size


def encode_precision(cfg: BuildConfig, device_type: str) -> str:
    """Return the precision the encoder really runs in on this device: TensorFloat-32 exists only on CUDA."""
    if cfg.bf16:
        return "bf16-autocast"
    if cfg.tf32 and device_type == "cuda":
        return "tf32"
    return "ieee-float32"


def describe_build(cfg: BuildConfig, tokenizer: VQVAE, shards: list[ShardInfo], image_size: int,
                   device_type: str) -> dict[str, Any]:
    """Return the provenance attrs: everything that determines the stored latents, compared when resuming."""
    return {
        "tokenizer": {"sha256": tokenizer.sha256, "config": tokenizer.config.to_json()},
        "preprocessing": transform_description(image_size),
        "image_size": image_size,
        "dtype": cfg.dtype,
        "encode_precision": encode_precision(cfg, device_type),
        "shard_index_sha256": index_hash(shards),
    }


def store_exists(path: str) -> bool:
    fs, root = fsspec.core.url_to_fs(path)
    return fs.exists(f"{root.rstrip('/')}/zarr.json")


# build options that change the stored latents or the layout, which a resumed build must repeat
RESUME_OPTIONS = ("dtype", "image_size", "chunk_rows", "hflip", "bf16", "tf32")
# options that may change only the latents' last float bits: a resume with other values warns instead of failing
ROUNDING_OPTIONS = ("batch_size", "channels_last")


def resume_hint(attrs: dict, cfg: BuildConfig) -> str:
    """Return how to resume the stored build: the options of its first run that this run gives differently."""
    if attrs.get("provenance", {}).get("encode_precision") == "float32":
        # written before the precision was pinned, when GPU convolutions could silently run in TensorFloat-32
        return ("It was started by an older version that did not record whether the encoder used TensorFloat-32, "
                "so it cannot be resumed.")
    first, flags = attrs.get("build_config", {}), []
    for name in RESUME_OPTIONS:
        if name not in first or first[name] == getattr(cfg, name):
            continue
        flag, value = "--" + name.replace("_", "-"), first[name]
        if isinstance(value, bool):
            flags.append(flag if value else "--no-" + flag[2:])
        elif value is None:
            flags.append(f"no {flag}")
        else:
            flags.append(f"{flag} {value}")
    if attrs.get("complete"):
        # nothing is left to resume, so the hint only lists the options it was built with
        built_with = ", ".join(flags) if flags else "another tokenizer or shard set"
        return f"It is complete and was built with {built_with}."
    if flags:
        return f"To resume it, rerun with {', '.join(flags)}."
    return "To resume it, rerun with the tokenizer and shards it was built from."


def create_or_resume(cfg: BuildConfig, shards: list[ShardInfo], layout: Layout, provenance: dict) -> zarr.Group:
    """Create the store, or reopen an earlier build of the same inputs.

    Raises ValueError when the store at --out was built from other inputs.
    """
    if not store_exists(cfg.out):
        group = create_store(cfg.out, [(s.url, s.nsamples) for s in shards], layout, provenance)
        group.attrs["build_config"] = config_to_dict(cfg)
        return group
    group = open_store(cfg.out, mode="r+")
    stored_urls = [entry["url"] for entry in group.attrs["shards"]]
    differences = provenance_differences(group.attrs["provenance"], provenance)
    differences += provenance_differences({"layout": group.attrs["layout"]}, {"layout": layout.to_json()})
    if differences:
        lines = "\n  ".join(differences)
        raise ValueError(
            f"--out {cfg.out} contains a latent cache built from different inputs (stored -> requested):\n  {lines}\n"
            f"{resume_hint(group.attrs, cfg)} To build anew, give a new --out path or delete the store."
        )

    first = group.attrs.get("build_config", {})
    for name in ROUNDING_OPTIONS:
        if name in first and first[name] != getattr(cfg, name):
            log.warning("--%s %s differs from the %s that wrote this store's first shards. The latents of the shards "
                        "left keep their values but may differ in the last bits from an uninterrupted build's",
                        name.replace("_", "-"), getattr(cfg, name), first[name])

    # the shard-index hash covers file names and counts only, so moved shards resume from their new location
    if stored_urls != [s.url for s in shards]:
        group.attrs["shards"] = [{"url": s.url, "nsamples": s.nsamples} for s in shards]

    # writers killed mid-write leave temporary files behind. No writer runs yet, so every such file is an orphan
    orphans = remove_orphans(cfg.out)
    if orphans:
        log.info("removed %d temporary files left by an interrupted build (first: %s)", len(orphans), orphans[0])
    return group


def encode_shards(
    cfg: BuildConfig, group: zarr.Group, encoder: Encoder, shards: list[tuple[int, str]], progress: tqdm | None,
) -> int:
    """Encode this process's shards, writing each one whole and then marking it. Returns the number of latents."""
    dataset = ShardBatches(shards, encoder_image_size(group), cfg.batch_size)
    loader = DataLoader(dataset, batch_size=None, num_workers=cfg.workers, pin_memory=encoder.device.type == "cuda")
    urls = dict(shards)
    buffers: dict[int, ShardBuffer] = {}
    written = 0
    for item in loader:
        shard = item["shard"]
        buffer = buffers.setdefault(shard, ShardBuffer(cfg.strict))
        latents = encoder(item["images"]) if item["keys"] else {}
        buffer.add(item["keys"], latents, item["skips"])
        if progress is not None:
            progress.update(len(item["keys"]) + len(item["skips"]))
        if item["last"]:
            written += store_shard(group, shard, urls[shard], buffers.pop(shard))
    return written


def store_shard(group: zarr.Group, shard: int, url: str, buffer: ShardBuffer) -> int:
    """Write a whole shard and its mark, unless its tar file failed to read. Returns the latents written."""
    if buffer.tar_errors:
        log.error("shard %d (%s) not written because its tar file could not be read: %s. Replace the file and "
                  "rerun the same command to encode the missing shards", shard, url, buffer.tar_errors[0])
        return 0
    check_sample_count(shard, url, int(group.attrs["shards"][shard]["nsamples"]), buffer)
    layout = layout_of(group)
    write_shard(group, shard, buffer.keys, buffer.views(layout.views, layout.latent_shape), buffer.skip_record())
    log.info("shard %d written: %d latents, skips %s", shard, len(buffer.keys), dict(buffer.skips.counts))
    return len(buffer.keys)


def check_sample_count(shard: int, url: str, nsamples: int, buffer: ShardBuffer) -> None:
    """Compare the samples read from the tar with the shard index's count, which sized the store.

    More good samples than the index lists cannot be stored. Fewer samples and skips than it lists mean the tar
    ends early at a member boundary, which reads as a valid tar: the missing ones are counted as skips.
    """
    read = len(buffer.keys) + sum(buffer.skips.counts.values())
    if len(buffer.keys) > nsamples:
        raise ValueError(
            f"shard {shard} ({url}) contains {len(buffer.keys)} samples but the shard index lists {nsamples}. Rebuild "
            "the index with python -m shards.index, then build into a new --out"
        )
    if read < nsamples:
        buffer.skips.record({
            "skip": "missing_samples", "key": None, "url": url,
            "error": f"{nsamples - read} of the {nsamples} samples the shard index lists are not in the tar; the "
                     "file may have been cut short. Replace it and build into a new --out",
        }, count=nsamples - read)


def check_all_written(cfg: BuildConfig, group: zarr.Group) -> None:
    """Exit with an error, leaving the store incomplete, when some shard could not be encoded."""
    missing = pending_shards(group)
    if missing:
        urls = [group.attrs["shards"][i]["url"] for i in missing[:5]]
        raise SystemExit(
            f"{len(missing)} shards were not written (first: {urls}). The errors above say why. Fix them and rerun "
            f"the same command: it encodes only the missing shards of {cfg.out}"
        )


def encoder_image_size(group: zarr.Group) -> int:
    return int(group.attrs["provenance"]["image_size"])


def finish_store(cfg: BuildConfig, group: zarr.Group) -> dict[str, int]:
    """Count keys repeated across shards (readers keep the first) and set the complete mark. Main process only."""
    repeats = cross_shard_duplicates(group)
    for key, first, later in repeats[:20]:
        log.warning("key %r of shard %d repeats a key of shard %d, so readers ignore the copy in shard %d",
                    key, later, first, later)
    if repeats and cfg.strict:
        raise ValueError(
            f"{len(repeats)} keys appear in more than one shard (first: {repeats[0][0]!r}). Remove the repeats from "
            "the shards, or rerun without --strict to keep each key's first shard"
        )
    return mark_complete(group, {"duplicate_key": len(repeats)} if repeats else None)


def print_summary(cfg: BuildConfig, group: zarr.Group, encoded: int, seconds: float, totals: dict[str, int]) -> None:
    layout = layout_of(group)
    stored = int(group["counts"][:].sum())
    shape = "x".join(map(str, layout.latent_shape))
    print(f"latent cache {cfg.out}: complete, {layout.n_shards} shards, {stored} latents of {shape} {layout.dtype}, "
          f"views {list(layout.views)}")
    print(f"this run encoded {encoded} images in {seconds:.1f} s ({encoded / max(seconds, 1e-9):.1f} images/s)")
    print(f"skipped samples by reason: {totals or 'none'}")
    print(f"check it and see its size and channel statistics with: python -m cache.verify {cfg.out}")


def main(cfg: BuildConfig) -> None:
    # a batch size below 1 would never fill a batch and encode each whole shard in one call
    if cfg.batch_size < 1:
        raise ValueError(f"--batch-size {cfg.batch_size}: give at least 1")
    if cfg.workers < 0:
        raise ValueError(f"--workers {cfg.workers}: give 0 (decode in the main process) or more")
    if cfg.chunk_rows < 1:
        raise ValueError(f"--chunk-rows {cfg.chunk_rows}: give at least 1")
    if cfg.bf16 and cfg.tf32:
        raise ValueError("--bf16 and --tf32 exclude each other: choose one encoder precision")

    # one process per device, and only the main process creates the store and changes its attributes
    accelerator = Accelerator()
    rank, world = accelerator.process_index, accelerator.num_processes
    logging.basicConfig(level=logging.INFO, format=f"[rank {rank}] %(levelname)s %(name)s: %(message)s")
    if cfg.tf32 and accelerator.device.type != "cuda":
        log.warning("--tf32 has no effect without a CUDA device: this build encodes in IEEE float32")

    # every process loads the frozen encoder, but only the main process resolves the shard set and creates the store
    tokenizer = load_frozen_tokenizer(cfg.tokenizer)
    image_size = resolve_image_size(cfg, tokenizer)
    if accelerator.is_main_process:
        shards = resolve_shards(list(cfg.shards))
        C, _, _ = tokenizer.latent_shape
        side = image_size // tokenizer.config.downsample
        layout = plan_layout([s.nsamples for s in shards], (C, side, side), dtype=cfg.dtype,
                             chunk_rows=cfg.chunk_rows, hflip=cfg.hflip)
        provenance = describe_build(cfg, tokenizer, shards, image_size, accelerator.device.type)
        create_or_resume(cfg, shards, layout, provenance)
    accelerator.wait_for_everyone()

    # deal the unwritten shards round-robin. The second barrier keeps a fast process's new marks out of the plan
    group = open_store(cfg.out, mode="r+")
    urls = [entry["url"] for entry in group.attrs["shards"]]
    mine = shards_for_rank(pending_shards(group), rank, world)
    accelerator.wait_for_everyone()
    if not mine:
        log.info("no unwritten shards for this process, waiting for the others")

    # encode and write whole shards (the progress bar counts the main process's own images)
    encoder = Encoder(tokenizer, accelerator.device, hflip=cfg.hflip, bf16=cfg.bf16, channels_last=cfg.channels_last,
                      tf32=cfg.tf32)
    expected = sum(group.attrs["shards"][i]["nsamples"] for i in mine)
    progress = tqdm(total=expected, unit="img", desc="encode") if accelerator.is_main_process else None
    start = time.perf_counter()
    with logging_redirect_tqdm():
        encoded = encode_shards(cfg, group, encoder, [(i, urls[i]) for i in mine], progress)
    if progress is not None:
        progress.close()

    # after every process has marked its shards, the main process merges skip counts and marks the store complete
    accelerator.wait_for_everyone()
    encoded = int(accelerator.reduce(torch.tensor(encoded, device=accelerator.device), reduction="sum").item())
    seconds = time.perf_counter() - start
    if accelerator.is_main_process:
        check_all_written(cfg, group)
        totals = finish_store(cfg, group)
        print_summary(cfg, group, encoded, seconds, totals)
    end_processes(accelerator)


def check_out_outlives_process(out: str) -> None:
    """Reject an in-memory --out on the command line, where the store would vanish when the build exits."""
    if out.startswith("memory://"):
        raise ValueError(f"--out {out}: an in-memory store is lost when this command exits, and other processes "
                         "cannot see it. Give a path or a URL of persistent storage")


if __name__ == "__main__":
    with exit_on_input_error():
        config = parse_config(BuildConfig)
        check_out_outlives_process(config.out)
        main(config)
