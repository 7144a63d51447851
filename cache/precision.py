"""Measure how much float16 storage and faster encoder precisions change the quantizer indices of a cache.

    python -m cache.precision --shards data/train.json --tokenizer vae.pth --quantizer native runs/mmd [--limit 512]

The reference encodes in IEEE float32 and keeps float32 latents, which is what `cache/build.py` does by default.
Each variant changes one choice: float16 storage (`--dtype float16`), bfloat16 autocast (`--bf16`) and, on CUDA
devices only, TensorFloat-32 convolutions (`--tf32`). For every quantizer it prints the percentage of indices that
differ from the reference's, a bootstrap 95% interval over images, and the relative change of the quantization
error E.

A latent near the boundary between two codes changes index under a tiny perturbation. In a multi-scale quantizer
that change also alters the residual of every finer scale, so one flip at a coarse scale can move many indices.
Codebooks whose codes sit closer together (larger or better used ones) therefore flip more often.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from cache.build import load_frozen_tokenizer
from cache.encode import Encoder
from common.config import config_to_dict, exit_on_input_error, parse_config
from common.precision import float32_precision
from common.tokenizer import VQVAE
from shards.index import resolve_shards
from shards.read import SkipLog, iter_samples

log = logging.getLogger("cache.precision")


@dataclass
class PrecisionConfig:
    """Measure the share of quantizer indices that float16 storage and faster encoder precisions change."""

    shards: tuple[str, ...] = field(metadata={
        "help": "a shard-index JSON, brace patterns such as 'train-{0000..0099}.tar', or a list of shard URLs"})
    tokenizer: str = field(metadata={"help": "tokenizer checkpoint: VAR .pth, or this tool's .safetensors"})
    quantizer: tuple[str, ...] = field(default=("native",), metadata={
        "help": "quantizers to measure: 'native' for the tokenizer's own, or substitution run directories"})
    limit: int = field(default=512, metadata={
        "help": "images to encode, taken in shard order from the start; give a validation or shuffled shard set so "
                "they are a fair sample"})
    hflip: bool = field(default=False, metadata={
        "help": "also measure the horizontally flipped images, as a cache built with --hflip stores them; each "
                "encoder call then takes twice --batch-size images, and the bootstrap resamples an image together "
                "with its flip"})
    batch_size: int = field(default=32, metadata={"help": "images per encoder call"})
    device: str = field(default="auto", metadata={"help": "torch device; 'auto' takes CUDA when available"})
    resamples: int = field(default=2000, metadata={
        "help": "bootstrap resamples of the images for the 95% interval (at least 100)"})
    seed: int = field(default=0, metadata={"help": "seed of the bootstrap resampling"})
    json: str | None = field(default=None, metadata={"help": "also write the figures to this JSON file"})


def variants_for(device: torch.device) -> dict[str, dict[str, Any]]:
    """Return each variant's Encoder options and stored dtype. TensorFloat-32 exists only on CUDA devices."""
    variants = {
        "float16 storage": {"encoder": {"bf16": False, "tf32": False}, "dtype": torch.float16},
        "bf16 autocast encoder": {"encoder": {"bf16": True, "tf32": False}, "dtype": torch.float32},
    }
    if device.type == "cuda":
        variants["tf32 encoder"] = {"encoder": {"bf16": False, "tf32": True}, "dtype": torch.float32}
    return variants


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {name}: invalid device; use auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine; use --device cpu or auto")
    return device


def image_batches(cfg: PrecisionConfig, image_size: int, skips: SkipLog) -> Iterator[torch.Tensor]:
    """Yield batches (b, 3, R, R) of the first `cfg.limit` good images of the shard set."""
    urls = [shard.url for shard in resolve_shards(list(cfg.shards))]
    batch: list[torch.Tensor] = []
    count = 0
    for sample in iter_samples(urls, image_size, skips):
        batch.append(sample["image"])
        count += 1
        if len(batch) == cfg.batch_size or count == cfg.limit:
            yield with_flips(torch.stack(batch), cfg.hflip)
            batch = []
        if count == cfg.limit:
            return
    if batch:
        yield with_flips(torch.stack(batch), cfg.hflip)


def with_flips(images: torch.Tensor, hflip: bool) -> torch.Tensor:
    """Append the horizontally flipped images (b, 3, R, R) to the batch when `hflip` is set."""
    return torch.cat([images, images.flip(-1)]) if hflip else images


class IndexChanges:
    """Per-image share of indices that differ from the reference, and the E sums of both runs.

    With `views` = 2 each batch contains b images followed by their b flips, as `with_flips` builds it. An image and
    its flip are not independent samples, so they count as one image whose share is the mean over both views.
    """

    def __init__(self, views: int = 1) -> None:
        self.views = views
        self.per_image: list[np.ndarray] = []
        self.squared_error = {"reference": 0.0, "variant": 0.0}

    def update(self, reference: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
               variant: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> None:
        """Add one batch given as (z_e, z_q, indices) of the reference and of the variant."""
        (z_ref, q_ref, idx_ref), (z_var, q_var, idx_var) = reference, variant
        changed = (idx_ref != idx_var).reshape(self.views, idx_ref.shape[0] // self.views, -1).double()
        changed = changed.mean(dim=(0, 2))
        self.per_image.append(changed.cpu().numpy())
        self.squared_error["reference"] += float((q_ref.double() - z_ref.double()).square().sum())
        self.squared_error["variant"] += float((q_var.double() - z_var.double()).square().sum())

    def summary(self, resamples: int, rng: np.random.Generator) -> dict[str, float]:
        per_image = np.concatenate(self.per_image)
        low, high = bootstrap_interval(per_image, resamples, rng)
        e_ref, e_var = self.squared_error["reference"], self.squared_error["variant"]
        return {
            "changed_percent": 100 * float(per_image.mean()),
            # one image gives no spread to resample
            "interval_percent": [100 * low, 100 * high] if per_image.size > 1 else None,
            "images_with_changes": int((per_image > 0).sum()),
            "E_change_percent": 100 * (e_var - e_ref) / e_ref if e_ref else 0.0,
        }


def bootstrap_interval(values: np.ndarray, resamples: int, rng: np.random.Generator) -> tuple[float, float]:
    """Return the 2.5 and 97.5 percentiles of the mean of `values` over bootstrap resamples."""
    if resamples < 1 or values.size < 2:
        return float(values.mean()), float(values.mean())
    means = []
    # blocks of resamples keep the index matrix small for large image counts
    for start in range(0, resamples, 100):
        picks = rng.integers(0, values.size, size=(min(100, resamples - start), values.size))
        means.append(values[picks].mean(axis=1))
    low, high = np.percentile(np.concatenate(means), [2.5, 97.5])
    return float(low), float(high)


def measure(cfg: PrecisionConfig) -> dict[str, Any]:
    """Encode the images once per precision, quantize every version and compare the indices."""
    if cfg.limit < 1:
        raise ValueError(f"--limit {cfg.limit}: give at least 1")
    if cfg.batch_size < 1:
        raise ValueError(f"--batch-size {cfg.batch_size}: give at least 1")
    if cfg.resamples < 100:
        raise ValueError(f"--resamples {cfg.resamples}: too few for a 95% interval; give at least 100")
    if cfg.seed < 0:
        raise ValueError(f"--seed {cfg.seed}: give 0 or more (numpy seeds are non-negative)")
    device = resolve_device(cfg.device)
    tokenizer: VQVAE = load_frozen_tokenizer(cfg.tokenizer)
    from substitute.quantizers import resolve_quantizer

    quantizers = {source: resolve_quantizer(source, tokenizer).to(device).eval() for source in cfg.quantizer}
    reference_encoder = Encoder(tokenizer, device, hflip=False, bf16=False, channels_last=False)
    variants = variants_for(device)
    # a variant that only stores differently reuses the reference encoding, so it gets no encoder of its own
    encoders = {name: Encoder(tokenizer, device, hflip=False, channels_last=False, **variant["encoder"])
                for name, variant in variants.items() if any(variant["encoder"].values())}

    views = 2 if cfg.hflip else 1
    changes = {(source, name): IndexChanges(views) for source in quantizers for name in variants}
    largest_change = dict.fromkeys(variants, 0.0)
    skips = SkipLog()
    images_seen = 0  # flipped views included
    for images in image_batches(cfg, tokenizer.image_size, skips):
        images_seen += images.shape[0]
        raw = torch.from_numpy(reference_encoder(images)["latents"])  # (b, C, h, w) float32
        reference = raw.to(device)
        versions = {}
        for name, variant in variants.items():
            latents = torch.from_numpy(encoders[name](images)["latents"]) if name in encoders else raw
            versions[name] = latents.to(variant["dtype"]).float().to(device)
        for name, latents in versions.items():
            largest_change[name] = max(largest_change[name], float((latents - reference).abs().max()))
        # the quantizers always look up in IEEE float32, so only the latents differ between the runs
        with torch.no_grad(), float32_precision("ieee"):
            for source, quantizer in quantizers.items():
                ref = (reference, *quantizer.quantize(reference))
                for name, latents in versions.items():
                    changes[source, name].update(ref, (latents, *quantizer.quantize(latents)))
    if images_seen == 0:
        raise ValueError(f"--shards {' '.join(cfg.shards)}: no readable images; skipped {dict(skips.counts) or 'none'}")

    rng = np.random.default_rng(cfg.seed)
    return {
        "config": config_to_dict(cfg),
        "images": images_seen,
        "device": str(device),
        "skipped": dict(skips.counts),
        "largest_latent_change": largest_change,
        "quantizers": {
            source: {name: changes[source, name].summary(cfg.resamples, rng) for name in variants}
            for source in quantizers
        },
    }


def print_report(report: dict[str, Any]) -> None:
    if report["config"]["hflip"]:
        images = f"{report['images'] // 2} images and their flips (counted together)"
    else:
        images = f"{report['images']} images"
    print(f"indices changed against IEEE float32 encoding and float32 storage, {images} on {report['device']}")
    width = max(len("quantizer"), *(len(source) for source in report["quantizers"]))
    print(f"{'quantizer':<{width}} {'variant':<24} {'changed':>9} {'95% interval':>18} {'images changed':>14} "
          f"{'E change':>9}")
    for source, by_variant in report["quantizers"].items():
        for name, row in by_variant.items():
            interval = "n/a (1 image)"
            if row["interval_percent"] is not None:
                low, high = row["interval_percent"]
                interval = f"[{low:.3f}, {high:.3f}]%"
            print(f"{source:<{width}} {name:<24} {row['changed_percent']:>8.3f}% {interval:>18} "
                  f"{row['images_with_changes']:>14} {row['E_change_percent']:>+8.2f}%")
    for name, change in report["largest_latent_change"].items():
        print(f"largest latent change, {name}: {change:.3g}")
    if report["skipped"]:
        print(f"skipped samples by reason: {report['skipped']}")


def main(cfg: PrecisionConfig) -> dict[str, Any]:
    # a missing output folder fails now rather than after the whole measurement
    if cfg.json and not Path(cfg.json).resolve().parent.is_dir():
        raise FileNotFoundError(f"--json {cfg.json}: folder {Path(cfg.json).parent} not found; create it first")
    if cfg.json and Path(cfg.json).is_dir():
        raise IsADirectoryError(f"--json {cfg.json} is a folder; give the path of the JSON file to write")
    report = measure(cfg)
    print_report(report)
    if cfg.json:
        with open(cfg.json, "w") as f:
            json.dump(report, f, indent=2)
    return report


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    with exit_on_input_error():
        main(parse_config(PrecisionConfig))
