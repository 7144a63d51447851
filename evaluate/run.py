"""Score a tokenizer's reconstructions: E, U, PSNR, SSIM, LPIPS, r-FID and r-IS on a WebDataset shard set.

    accelerate launch evaluate/run.py --shards 'val-{0000..0063}.tar' --tokenizer vae.pth --out runs/eval-var
    accelerate launch evaluate/run.py --shards val.json --tokenizer vae.pth --cache val.zarr \
        --quantizer runs/mmd8192 --decoder runs/adapt-mmd8192 --out runs/eval-mmd8192-adapted

Also runs as plain `python evaluate/run.py ...`. The quantizer is the tokenizer's own (`native`) or a substitution
run. `--decoder` puts an adapted decoder into the tokenizer. With `--cache`, the latents are read by key from a
latent cache and the encoder never runs. The run directory gets report.json (written atomically), config.json
and reconstructions.png (inputs above reconstructions).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from tqdm import tqdm

from common.config import config_to_dict, exit_on_input_error, parse_config
from common.precision import float32_precision
from common.preprocess import to_uint8, transform_description
from common.processes import end_processes
from common.rundir import RunDir
from common.tokenizer import VQVAE, load_tokenizer
from common.weights import WeightFile, inception_file, lpips_vgg_file, require_weights
from evaluate.compare import format_table
from evaluate.data import eval_batches, plan_samples
from evaluate.fidelity import FEATURE_EXTRACTOR, ISC_SPLITS, load_inception
from evaluate.grid import GridSamples, compose_grid, save_png
from evaluate.scoring import ReconstructionScores
from shards.index import resolve_shards
from shards.read import SkipLog, shards_for_rank

log = logging.getLogger("evaluate.run")

GRID_FILE = "reconstructions.png"


@dataclass
class EvalConfig:
    """Score a tokenizer's reconstructions (E, U, PSNR, SSIM, LPIPS, r-FID, r-IS) on a WebDataset shard set."""

    shards: tuple[str, ...] = field(metadata={
        "help": "a shard-index JSON, brace patterns such as 'val-{0000..0063}.tar', or a list of shard URLs"})
    tokenizer: str = field(metadata={"help": "tokenizer checkpoint: VAR .pth, or this tool's .safetensors"})
    out: str = field(metadata={"help": "run directory for report.json, config.json and the reconstruction grid"})
    quantizer: str = field(default="native", metadata={
        "help": "'native' for the tokenizer's own quantizer, or a substitution run directory"})
    decoder: str | None = field(default=None, metadata={
        "help": "adaptation run directory whose decoder replaces the tokenizer's"})
    cache: str | None = field(default=None, metadata={
        "help": "latent cache (Zarr) of these shards: latents are read by key and the encoder never runs"})
    name: str | None = field(default=None, metadata={"help": "label of this run in reports; default: the --out folder name"})
    inception_weights: str | None = field(default=None, metadata={
        "help": "torch-fidelity Inception-v3 weights file; default: the torch hub cache. Missing: no r-FID / r-IS"})
    lpips_weights: str | None = field(default=None, metadata={
        "help": "torchvision vgg16-397923af.pth for LPIPS; default: the torch hub cache. Missing: no LPIPS"})
    require_weights: bool = field(default=False, metadata={
        "help": "stop at start-up when a weights file is missing, instead of leaving its metrics out"})
    max_samples: int | None = field(default=None, metadata={
        "help": "score only the first N samples of the shard set (in shard order); default: all"})
    batch_size: int = field(default=32, metadata={"help": "images per batch, per process"})
    workers: int = field(default=2, metadata={"help": "DataLoader worker processes decoding images, per process"})
    grid_images: int = field(default=8, metadata={"help": "samples shown in the grid: the first N in key order"})
    isc_splits: int = field(default=ISC_SPLITS, metadata={"help": "splits of the Inception Score (torch-fidelity's default)"})
    overwrite: bool = field(default=False, metadata={"help": "replace an existing --out directory"})
    strict: bool = field(default=False, metadata={"help": "stop at the first bad sample instead of skipping it"})


def missing_reason(weight_file: WeightFile) -> str:
    return f"{weight_file.name} not found at {weight_file.path}; {weight_file.hint}"


def load_metric_networks(cfg: EvalConfig, device: torch.device) -> tuple[Any, Any, dict[str, str]]:
    """Load LPIPS and Inception from local files; return (perceptual, inception, reasons for left-out metrics)."""
    vgg, inception_weights = lpips_vgg_file(cfg.lpips_weights), inception_file(cfg.inception_weights)
    if cfg.require_weights:
        require_weights(vgg, inception_weights)
    left_out: dict[str, str] = {}
    perceptual = inception = None
    if vgg.exists():
        from adapt.perceptual import PerceptualLoss

        perceptual = PerceptualLoss(vgg.path).to(device)
    else:
        left_out["LPIPS"] = missing_reason(vgg)
    if inception_weights.exists():
        inception = load_inception(inception_weights.path, device)
    else:
        left_out["r-FID"] = left_out["r-IS"] = missing_reason(inception_weights)
    return perceptual, inception, left_out


def load_models(cfg: EvalConfig, device: torch.device) -> tuple[VQVAE, torch.nn.Module, dict[str, Any]]:
    """Load the tokenizer, the quantizer to evaluate and the optional adapted decoder; return them and their provenance."""
    if "://" not in cfg.tokenizer and not Path(cfg.tokenizer).is_file():
        raise FileNotFoundError(f"--tokenizer {cfg.tokenizer}: file not found; give the path of the tokenizer checkpoint")
    tokenizer = load_tokenizer(cfg.tokenizer)
    provenance: dict[str, Any] = {"tokenizer": {"path": cfg.tokenizer, "sha256": tokenizer.sha256}}

    from substitute.quantizers import resolve_quantizer

    quantizer = resolve_quantizer(cfg.quantizer, tokenizer)
    provenance["quantizer"] = {"source": cfg.quantizer, "class": type(quantizer).__name__,
                               "codebook_size": quantizer.codebook_size,
                               "segments": [s.name for s in quantizer.segments]}

    if cfg.decoder is not None:
        from adapt.checkpoint import load_adapted_decoder

        meta = load_adapted_decoder(tokenizer, cfg.decoder)
        provenance["decoder"] = {"source": cfg.decoder, **meta}
        adapted_to = meta.get("quantizer")
        if adapted_to is not None and not _same_source(str(adapted_to), cfg.quantizer):
            log.warning("the decoder in %s was adapted to quantizer %s but is evaluated with --quantizer %s",
                        cfg.decoder, adapted_to, cfg.quantizer)
    return tokenizer.to(device).eval(), quantizer.to(device).eval(), provenance


def _same_source(a: str, b: str) -> bool:
    if "native" in (a, b):
        return a == b
    return Path(a).resolve() == Path(b).resolve()


def open_latent_cache(cfg: EvalConfig, tokenizer: VQVAE):
    """Open the latent cache, which raises if it was built by another tokenizer or at another image size."""
    from cache import open_cache

    cache = open_cache(cfg.cache, tokenizer_sha256=tokenizer.sha256, image_size=tokenizer.image_size,
                       preprocessing=transform_description(tokenizer.image_size))
    return cache


@torch.no_grad()
def reconstruct(tokenizer: VQVAE, quantizer, images: torch.Tensor, keys: list[str], cache=None):
    """Return (z_e, z_q, indices, x_hat) for a batch of images (B, 3, R, R) in [-1, 1]."""
    # IEEE float32 as in cache/build.py, so indices from images match those from a cache of the same images
    with float32_precision("ieee"):
        if cache is not None:
            z_e = cache.latents(keys).to(images.device)  # (B, C, h, w), looked up by key
        else:
            z_e = tokenizer.encode(images)
        z_q, indices = quantizer.quantize(z_e)
    return z_e, z_q, indices, tokenizer.decode(z_q)


def score_batches(batches, models, scores: ReconstructionScores, grid: GridSamples,
                  device: torch.device, progress: tqdm | None, cache=None) -> list[str]:
    """Reconstruct and score every batch of this process; return the keys it scored."""
    tokenizer, quantizer = models
    keys_scored: list[str] = []
    for batch in batches:
        keys, images = batch["key"], batch["image"].to(device)
        z_e, z_q, indices, x_hat = reconstruct(tokenizer, quantizer, images, keys, cache)
        originals, reconstructions = to_uint8(images), to_uint8(x_hat)  # (B, 3, R, R) uint8
        scores.update(keys, z_e, z_q, indices, originals, reconstructions)
        grid.update(keys, originals, reconstructions)
        keys_scored.extend(keys)
        if progress is not None:
            progress.update(len(keys))
    return keys_scored


def count_shared_keys(keys: list[str], accelerator: Accelerator) -> int:
    """Count keys scored by more than one process; E, U and r-FID would count such samples more than once."""
    if accelerator.num_processes == 1:
        return 0
    owners: dict[str, int] = {}
    for part in gather_object([sorted(keys)]):
        for key in part:
            owners[key] = owners.get(key, 0) + 1
    return sum(1 for count in owners.values() if count > 1)


METRIC_DEFINITIONS = {
    "E": "per-element MSE between quantized and encoder latents, summed over the set then divided",
    "U": "fraction of codes used at least once over the set, all segments pooled per codebook",
    "PSNR": "dB on [0, 1] after uint8 rounding, per image (capped at 100 dB), then averaged",
    "SSIM": "per RGB channel, Gaussian window 11 and sigma 1.5, valid region, float64, averaged over channels and images",
    "LPIPS": "LPIPS-VGG v0.1 on uint8-rounded images mapped to [-1, 1], per image, then averaged",
    "r-FID": "FID between reconstructions and inputs (uint8), 2048-d Inception pool features",
    "r-IS": "Inception Score of the reconstructions (uint8), torch-fidelity's splits and seed",
}


def build_report(cfg: EvalConfig, results: dict, provenance: dict, extra: dict) -> dict[str, Any]:
    fidelity = None
    if results["fidelity"] is not None:
        fidelity = {
            "backend": f"torch-fidelity {_torch_fidelity_version()}, feature extractor {FEATURE_EXTRACTOR}",
            "reference": "the preprocessed input images of the same samples, rounded to uint8",
            "n": results["fidelity"]["n"],
            "r_is_std": results["fidelity"]["r_is_std"],
            "isc_splits": cfg.isc_splits,
            "weights": str(inception_file(cfg.inception_weights).path),
        }
    return {
        "label": cfg.name or Path(cfg.out).name,
        "n": results["n"],
        "metrics": results["metrics"],
        "left_out": results["left_out"],
        "utilization": results["utilization"],
        "per_sample": results["per_sample"],
        "fidelity": fidelity,
        "metric_definitions": METRIC_DEFINITIONS,
        **provenance,
        **extra,
        "config": config_to_dict(cfg),
    }


def _torch_fidelity_version() -> str:
    import torch_fidelity

    return torch_fidelity.__version__


def main(cfg: EvalConfig) -> dict[str, Any] | None:
    # one process per device; the main process alone writes the run directory
    accelerator = Accelerator()
    rank, world = accelerator.process_index, accelerator.num_processes
    logging.basicConfig(level=logging.INFO, format=f"[rank {rank}] %(levelname)s %(name)s: %(message)s")
    # An evaluation has no checkpoint, so a folder with one is another stage's run that would lose its config.
    # Every process checks the folder before the main process writes into it, so no process reads a half-made run.
    if RunDir(cfg.out, overwrite=cfg.overwrite, create=False).resume:
        raise FileExistsError(f"--out {cfg.out} contains a training run (checkpoints/last.safetensors); "
                              "give the evaluation its own --out")
    accelerator.wait_for_everyone()
    run = RunDir(cfg.out, overwrite=cfg.overwrite) if accelerator.is_main_process else None
    if run is not None:
        run.save_config(cfg)

    # check and load the pretrained networks once, leaving out the metrics whose weights are missing
    perceptual, inception, left_out = load_metric_networks(cfg, accelerator.device)
    if accelerator.is_main_process:
        for metric, reason in left_out.items():
            log.warning("%s left out: %s", metric, reason)

    # models: frozen tokenizer, the quantizer under test, and the adapted decoder if given
    tokenizer, quantizer, provenance = load_models(cfg, accelerator.device)
    cache = open_latent_cache(cfg, tokenizer) if cfg.cache else None

    # the evaluation set is fixed by the shard list and --max-samples; processes deal its shards round-robin
    plan = plan_samples(resolve_shards(list(cfg.shards)), cfg.max_samples)
    mine = shards_for_rank(plan, rank, world)
    skips = SkipLog(strict=cfg.strict)
    batches = eval_batches(mine, tokenizer.image_size, cfg.batch_size, cfg.workers, skips)

    # reconstruct and score this process's share
    scores = ReconstructionScores(quantizer, perceptual, inception, left_out, cfg.isc_splits)
    grid = GridSamples(cfg.grid_images)
    # the bar counts the main process's images only, so it stops near 1/world of the set
    progress = tqdm(unit="img", desc="evaluate (main process)") if accelerator.is_main_process else None
    start = time.perf_counter()
    keys = score_batches(batches, (tokenizer, quantizer), scores, grid, accelerator.device, progress, cache)
    if progress is not None:
        progress.close()

    # every process joins each reduction in the same order; only the main process writes
    results = scores.compute(accelerator)
    grid_keys, originals, reconstructions = grid.compute(accelerator)
    shared = count_shared_keys(keys, accelerator)
    skipped = gather_object([dict(skips.counts)])
    seconds = time.perf_counter() - start
    end_processes(accelerator)
    if run is None:
        return None

    if shared:
        log.warning("%d sample keys were scored by more than one process; E, U and r-FID counted them more "
                    "than once (per-image metrics and r-IS did not)", shared)
    save_png(compose_grid([originals, reconstructions]), run.path / GRID_FILE)
    extra = {
        "preprocessing": transform_description(tokenizer.image_size),
        "latents_from": cfg.cache or "encoder",
        "grid": {"file": GRID_FILE, "keys": grid_keys, "tile": tokenizer.image_size},
        "skipped_samples": _sum_counts(skipped),
        "keys_scored_by_several_processes": shared,
        "processes": world,
        "seconds": round(seconds, 2),
    }
    report = build_report(cfg, results, provenance, extra)
    run.write_report(report)
    print(format_table([report]))
    return report


def _sum_counts(parts: list[dict[str, int]]) -> dict[str, int]:
    total: dict[str, int] = {}
    for part in parts:
        for reason, count in part.items():
            total[reason] = total.get(reason, 0) + count
    return total


if __name__ == "__main__":
    with exit_on_input_error():
        main(parse_config(EvalConfig))
