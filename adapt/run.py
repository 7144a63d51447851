"""Adapt a tokenizer's decoder to a transplanted quantizer, or train a small tokenizer from scratch.

Adaptation (the default) freezes encoder and quantizer, streams images from WebDataset shards together with
their cached encoder latents (joined by sample key, so the encoder never runs), quantizes the latents with the
frozen new quantizer and fine-tunes decoder + post_quant_conv on ||x_hat - x||^2 + lambda_P LPIPS + lambda_G GAN.

    accelerate launch adapt/run.py --shards train.json --cache latents.zarr --tokenizer vae.pth \\
        --quantizer runs/mmd --out runs/mmd-adapted --epochs 5

From-scratch mode (`--from-scratch --preset demo`) trains encoder, native quantizer and decoder together, with
no cache, and saves the whole tokenizer as RUN/tokenizer.safetensors. It exists for demos and tests, where no
pretrained tokenizer can be downloaded.
"""

from __future__ import annotations

import itertools
import logging
import math
import sys
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object, set_seed
from torch import nn
from torchvision.utils import save_image
from tqdm.auto import tqdm

from adapt.checkpoint import save_adapted_decoder
from adapt.data import LatentJoin, endless_samples, image_batches, shuffle_buffer
from adapt.discriminator import DiscriminatorLossConfig, load_discriminator
from adapt.losses import GeneratorObjective, LossWeights
from adapt.perceptual import load_perceptual_loss
from adapt.training import MetricWindow, Trainer, read_training_state, restore_training_state, training_state
from common.config import config_to_dict, exit_on_input_error, parse_config
from common.preprocess import transform_description
from common.processes import end_processes
from common.quantize import FixedScaleQuantizer
from common.rundir import RunDir
from common.tokenizer import PRESETS, build_tokenizer, load_tokenizer, save_tokenizer
from common.weights import WeightFile, dino_vits16_file, lpips_vgg_file, require_weights, var_tokenizer_file
from shards.index import resolve_shards
from shards.read import SkipLog, shards_for_rank

log = logging.getLogger("adapt")

# lambda_G by quantizer layout (defaults of the VQ-transplant method).
GAN_WEIGHT_BY_LAYOUT = {"multiscale": 0.5, "fixed": 0.4}
ADAPT_EPOCHS = 5
# From-scratch defaults for the demo preset (260 images of 64 px). On 150 steps with batch 16, lr 1e-3 reached
# 16.4 dB eval PSNR against 15.5 dB for 3e-4 and 14.7 dB for 2e-3. The 400 default steps took 261 s on a shared
# 2-core CPU machine and ended at 20.2 dB training PSNR.
SCRATCH_LR = 1e-3
SCRATCH_BATCH = 16
SCRATCH_STEPS = 400


@dataclass
class AdaptConfig:
    """Fine-tune a tokenizer's decoder to a frozen transplanted quantizer (or train a demo tokenizer from scratch)."""

    shards: tuple[str, ...] = field(metadata={
        "help": "training shards: shard-index JSONs, brace patterns such as 'train-{0000..0099}.tar', or shard URLs"})
    out: Path = field(metadata={"help": "run directory (resumed when it holds a checkpoint)"})
    cache: str | None = field(default=None, metadata={"help": "latent cache (Zarr) of the shards, built with the same tokenizer"})
    tokenizer: str | None = field(default=None, metadata={"help": "tokenizer checkpoint (VAR .pth or this tool's .safetensors)"})
    quantizer: str = field(default="native", metadata={"help": "substitution run directory or quantizer file; 'native' keeps the tokenizer's own"})
    from_scratch: bool = field(default=False, metadata={"help": "train encoder, native quantizer and decoder together (no cache)"})
    preset: str = field(default="demo", metadata={"help": "tokenizer architecture for --from-scratch", "choices": sorted(PRESETS)})
    epochs: float | None = field(default=None, metadata={"help": f"passes over the shards (default {ADAPT_EPOCHS} when adapting)"})
    steps: int | None = field(default=None, metadata={"help": f"optimisation steps, instead of --epochs (from-scratch default {SCRATCH_STEPS})"})
    batch_size: int | None = field(default=None, metadata={"help": f"images per process and step (default 32; from scratch {SCRATCH_BATCH})"})
    lr: float | None = field(default=None, metadata={"help": f"AdamW learning rate, constant (default 1e-5; from scratch {SCRATCH_LR})"})
    betas: tuple[float, ...] = field(default=(0.9, 0.95), metadata={"help": "AdamW betas"})
    weight_decay: float = field(default=1e-4, metadata={"help": "AdamW weight decay"})
    grad_clip: float = field(default=1.0, metadata={"help": "maximum gradient norm of the trained modules"})
    l2_weight: float = field(default=1.0, metadata={"help": "weight of ||x_hat - x||^2 (0 switches it off)"})
    lpips_weight: float = field(default=1.0, metadata={"help": "lambda_P, weight of LPIPS-VGG"})
    lpips: bool | None = field(default=None, metadata={"help": "use the LPIPS term (default: on when adapting, off from scratch)"})
    gan: bool | None = field(default=None, metadata={"help": "use the GAN term (default: on when adapting, off from scratch)"})
    gan_weight: float | None = field(default=None, metadata={"help": "lambda_G (default 0.5 for a multi-scale quantizer, 0.4 for fixed-scale)"})
    gan_start_step: int = field(default=0, metadata={"help": "step at which the GAN term and discriminator training start"})
    disc_lr: float = field(default=1e-4, metadata={"help": "AdamW learning rate of the discriminator heads"})
    disc_hidden: int = field(default=64, metadata={"help": "channels of each discriminator head"})
    lpips_weights: str | None = field(default=None, metadata={"help": "torchvision vgg16-397923af.pth (default: the torch hub cache)"})
    dino_weights: str | None = field(default=None, metadata={"help": "DINO ViT-S/16 weights (default: the Hugging Face cache)"})
    skip_missing_losses: bool = field(default=False, metadata={"help": "leave out LPIPS or the GAN term when its weights file is missing, with a warning naming the file, instead of stopping"})
    random_loss_backbones: bool = field(default=False, metadata={"help": "smoke tests only: random LPIPS and DINO backbones, no weight files; the losses are meaningless"})
    hflip: bool = field(default=False, metadata={"help": "mirror half the samples, taking their latents from the cache's flipped view"})
    workers: int = field(default=2, metadata={"help": "image-decoding worker processes per process"})
    shuffle_buffer: int = field(default=256, metadata={"help": "samples mixed across shards before batching (1 = off)"})
    log_every: int = field(default=20, metadata={"help": "steps between metric log lines"})
    checkpoint_every: int = field(default=500, metadata={"help": "steps between resumable checkpoints"})
    sample_count: int = field(default=8, metadata={"help": "images in the saved input/reconstruction grid"})
    seed: int = field(default=0, metadata={"help": "random seed (each process adds its rank)"})
    overwrite: bool = field(default=False, metadata={"help": "replace a run directory that holds files but no checkpoint"})


def resolve_defaults(cfg: AdaptConfig) -> AdaptConfig:
    """Fill the defaults that depend on the mode and reject contradictory options."""
    if cfg.epochs is not None and cfg.steps is not None:
        raise SystemExit("give --epochs or --steps, not both")
    if cfg.from_scratch:
        given = [flag for flag, on in (("--cache", cfg.cache), ("--tokenizer", cfg.tokenizer), ("--hflip", cfg.hflip),
                                       ("--quantizer", cfg.quantizer != "native")) if on]
        if given:
            raise SystemExit(f"--from-scratch trains its own tokenizer and reads no cache; drop {', '.join(given)}")
        steps = cfg.steps if cfg.epochs is not None or cfg.steps is not None else SCRATCH_STEPS
        return replace(cfg, lr=cfg.lr or SCRATCH_LR, batch_size=cfg.batch_size or SCRATCH_BATCH, steps=steps,
                       lpips=bool(cfg.lpips), gan=bool(cfg.gan))
    missing = [flag for flag, value in (("--cache", cfg.cache), ("--tokenizer", cfg.tokenizer)) if not value]
    if missing:
        raise SystemExit(f"adaptation needs {' and '.join(missing)} (or pass --from-scratch)")
    epochs = cfg.epochs if cfg.epochs is not None or cfg.steps is not None else ADAPT_EPOCHS
    return replace(cfg, lr=cfg.lr or 1e-5, batch_size=cfg.batch_size or 32, epochs=epochs,
                   lpips=cfg.lpips is not False, gan=cfg.gan is not False)


def drop_losses_without_weights(cfg: AdaptConfig) -> tuple[AdaptConfig, dict[str, str]]:
    """Switch off LPIPS / GAN terms whose weights file is missing; return the new config and why each was dropped."""
    if not cfg.skip_missing_losses or cfg.random_loss_backbones:
        return cfg, {}
    left_out = {}
    for term, flag, weights in (("lpips", "--lpips-weights", lpips_vgg_file(cfg.lpips_weights)),
                                ("gan", "--dino-weights", dino_vits16_file(cfg.dino_weights))):
        if getattr(cfg, term) and not weights.exists():
            left_out[term] = f"{weights.name} not found at {weights.path}; {weights.hint}"
            log.warning("%s term left out: %s", term.upper(), left_out[term])
            cfg = replace(cfg, **{term: False})
    return cfg, left_out


def required_weights(cfg: AdaptConfig) -> list[WeightFile]:
    """List the pretrained files this run reads: tokenizer, and the loss backbones that are switched on."""
    files = [] if cfg.from_scratch else [var_tokenizer_file(cfg.tokenizer)]
    if not cfg.random_loss_backbones:
        if cfg.lpips and cfg.lpips_weight > 0:
            files.append(lpips_vgg_file(cfg.lpips_weights))
        if cfg.gan and (cfg.gan_weight is None or cfg.gan_weight > 0):
            files.append(dino_vits16_file(cfg.dino_weights))
    return files


class DecoderStage(nn.Module):
    """post_quant_conv + decoder of a tokenizer (shared, not copied): z_q (B, C, h, w) -> x_hat (B, 3, R, R)."""

    def __init__(self, tokenizer: nn.Module):
        super().__init__()
        self.post_quant_conv = tokenizer.post_quant_conv
        self.decoder = tokenizer.decoder

    def forward(self, z_q: torch.Tensor) -> torch.Tensor:
        # Same as tokenizer.decode(z_q, clamp=False): clamping would cut the gradient of saturated pixels.
        return self.decoder(self.post_quant_conv(z_q))


def open_run(cfg: AdaptConfig, accelerator: Accelerator) -> RunDir:
    """Open the run directory: every process checks it first, then only the main process creates it."""
    probe = RunDir(cfg.out, overwrite=cfg.overwrite, create=False)
    accelerator.wait_for_everyone()
    run = RunDir(cfg.out, overwrite=cfg.overwrite) if accelerator.is_main_process else probe
    accelerator.wait_for_everyone()
    return run


def load_frozen_quantizer(cfg: AdaptConfig, tokenizer: nn.Module) -> nn.Module:
    """Load the quantizer the decoder adapts to, frozen, and check it fits the tokenizer's latents."""
    from substitute.quantizers import resolve_quantizer

    quantizer = resolve_quantizer(cfg.quantizer, tokenizer).eval().requires_grad_(False)
    try:
        quantizer.quantize(torch.zeros(1, *tokenizer.latent_shape))
    except ValueError as err:
        raise SystemExit(f"--quantizer {cfg.quantizer} does not fit the tokenizer's latents "
                         f"{tuple(tokenizer.latent_shape)}: {err}") from None
    return quantizer


def layout_of(quantizer: nn.Module) -> str:
    return "fixed" if isinstance(quantizer, FixedScaleQuantizer) else "multiscale"


@dataclass
class Setup:
    """Parts that differ between the two modes: trained model, its forward, data, and the files saved at the end."""

    model: nn.Module
    forward: Any
    last_layer: torch.Tensor
    batches: Any
    samples_per_pass: int
    layout: str
    provenance: dict[str, Any]
    save_result: Any
    dropped: Counter = field(default_factory=Counter)  # samples left out of training, by reason


def build_adaptation(cfg: AdaptConfig, accelerator: Accelerator, urls: list[str], skips: SkipLog,
                     data_seed: int, total_samples: int) -> Setup:
    """Load the frozen tokenizer and quantizer, and set up the trainable decoder stage and cache-joined batches."""
    from cache import open_cache

    tokenizer = load_tokenizer(cfg.tokenizer).requires_grad_(False).eval()
    cache = open_cache(cfg.cache, tokenizer_sha256=tokenizer.sha256, image_size=tokenizer.image_size,
                       preprocessing=transform_description(tokenizer.image_size))
    if tuple(cache.latent_shape) != tuple(tokenizer.latent_shape):
        raise SystemExit(f"latent cache {cfg.cache} contains latents of shape {cache.latent_shape}, but the tokenizer "
                         f"makes {tuple(tokenizer.latent_shape)}")
    quantizer = load_frozen_quantizer(cfg, tokenizer).to(accelerator.device)
    stage = DecoderStage(tokenizer).requires_grad_(True).train()

    def forward(model: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor, dict]:
        z_q, _ = quantizer.quantize(batch["latents"].to(accelerator.device))  # (B, C, h, w), no gradient
        x_hat = model(z_q)
        return x_hat, x_hat.new_zeros(()), {}

    join = LatentJoin(cache, cfg.hflip, data_seed + accelerator.process_index)
    # Two passes without one cached key (a pass may end and the next start on uncached shards) mean --shards and
    # --cache do not belong together.
    samples = join.filter(endless_samples(urls, tokenizer.image_size, cfg.workers, data_seed, skips),
                          max_misses=2 * max(total_samples, 1))
    samples = shuffle_buffer(samples, cfg.shuffle_buffer, data_seed + accelerator.process_index)
    batches = (join.attach(b) for b in image_batches(samples, cfg.batch_size))

    provenance = {"tokenizer": cfg.tokenizer, "tokenizer_sha256": tokenizer.sha256, "quantizer": cfg.quantizer,
                  "cache": cfg.cache, "layout": layout_of(quantizer)}

    def save_result(run: RunDir, meta: dict) -> dict[str, str]:
        path = save_adapted_decoder(run.path, tokenizer.decoder_modules(), {**provenance, **meta})
        return {"decoder": str(path)}

    return Setup(stage, forward, stage.decoder.conv_out.weight, batches, len(cache), layout_of(quantizer),
                 provenance, save_result, join.dropped)


@torch.no_grad()
def init_codebook_from_latents(tokenizer: nn.Module, images: torch.Tensor) -> None:
    """Set every code to a random encoder latent vector of `images` (B, 3, R, R).

    With nn.Embedding's N(0, 1) codes, a fresh encoder's small latents reach only a handful of codes. On the demo
    preset (lr 1e-3, 150 steps) this start used 160 codes instead of 12 and gave 0.5 dB more PSNR.
    """
    codebook = tokenizer.quantizer.codebook
    vectors = tokenizer.encode(images).permute(0, 2, 3, 1).reshape(-1, codebook.dim)  # (B·h·w, C)
    picks = torch.randint(0, vectors.shape[0], (codebook.size,))
    codebook.embedding.weight.copy_(vectors[picks])


def build_scratch(cfg: AdaptConfig, accelerator: Accelerator, urls: list[str], skips: SkipLog,
                  data_seed: int, samples_per_pass: int) -> Setup:
    """Build a random tokenizer of the preset to train whole on images (quantizer loss with commitment included)."""
    tokenizer = build_tokenizer(cfg.preset).train()

    def forward(model: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor, dict]:
        x_hat, quantized = model(batch["image"].to(accelerator.device))
        return x_hat, quantized.loss, quantized.stats

    samples = endless_samples(urls, tokenizer.image_size, cfg.workers, data_seed, skips)
    samples = shuffle_buffer(samples, cfg.shuffle_buffer, data_seed + accelerator.process_index)
    batches = image_batches(samples, cfg.batch_size)
    first = next(batches)
    init_codebook_from_latents(tokenizer, first["image"])
    batches = itertools.chain([first], batches)

    def save_result(run: RunDir, meta: dict) -> dict[str, str]:
        path = save_tokenizer(tokenizer, run.path / "tokenizer", extra={"trained_by": "adapt/run.py --from-scratch", **meta})
        return {"tokenizer": str(path)}

    return Setup(tokenizer, forward, tokenizer.decoder.conv_out.weight, batches, samples_per_pass, "multiscale",
                 {"preset": cfg.preset}, save_result)


def build_objective(cfg: AdaptConfig, layout: str, device: torch.device) -> tuple[GeneratorObjective, nn.Module | None]:
    """Build the generator objective and, when the GAN term is on, the discriminator."""
    gan_weight = cfg.gan_weight if cfg.gan_weight is not None else GAN_WEIGHT_BY_LAYOUT[layout]
    weights = LossWeights(l2=cfg.l2_weight, perceptual=cfg.lpips_weight if cfg.lpips else 0.0,
                          gan=gan_weight if cfg.gan else 0.0)
    random = cfg.random_loss_backbones
    perceptual = load_perceptual_loss(cfg.lpips_weights, random).to(device) if weights.perceptual > 0 else None
    disc = load_discriminator(cfg.dino_weights, random, cfg.disc_hidden).to(device) if weights.gan > 0 else None
    return GeneratorObjective(weights, perceptual, disc), disc


def total_steps(cfg: AdaptConfig, samples_per_pass: int, world_size: int) -> int:
    """Return the run's step count: --steps, or --epochs passes of `samples_per_pass` samples over all processes."""
    if cfg.steps is not None:
        return cfg.steps
    per_pass = math.ceil(samples_per_pass / (cfg.batch_size * world_size))
    return max(1, round(cfg.epochs * per_pass))


@torch.no_grad()
def save_samples(setup: Setup, batch: dict, path: Path) -> None:
    """Save a grid: inputs in the top row, reconstructions below (unwrapped model, main process only)."""
    model = setup.model
    was_training = model.training
    model.eval()
    x_hat, _, _ = setup.forward(model, batch)
    model.train(was_training)
    images = torch.cat([batch["image"].to(x_hat.device), x_hat.clamp(-1, 1)])
    save_image((images + 1) / 2, path, nrow=len(batch["image"]))


def main(cfg: AdaptConfig) -> dict[str, Any]:
    """Run adaptation (or from-scratch training) and return the report."""

    # Resolve mode defaults and check every pretrained file before anything heavy loads.
    cfg = resolve_defaults(cfg)
    cfg, left_out = drop_losses_without_weights(cfg)
    require_weights(*required_weights(cfg))

    # Processes, seeds, run directory.
    accelerator = Accelerator()
    set_seed(cfg.seed + accelerator.process_index)
    run = open_run(cfg, accelerator)

    # A resumed run reads its checkpoint first, so its data stream gets a seed of its own and does not replay
    # the first samples of the interrupted run. The check comes before save_config so that pointing --out at
    # another stage's run does not replace that run's config.json.
    checkpoint = run.load_checkpoint("last") if run.resume else None
    if checkpoint is not None:
        read_training_state(*checkpoint)
    if accelerator.is_main_process:
        run.save_config(cfg)
    start = int(checkpoint[1]["step"]) if checkpoint is not None else 0
    data_seed = cfg.seed + 1_000_003 * start

    # Shards of this process and the model being trained with its data.
    shard_infos = resolve_shards(cfg.shards)
    urls = shards_for_rank([s.url for s in shard_infos], accelerator.process_index, accelerator.num_processes)
    skips = SkipLog()
    if cfg.from_scratch:
        setup = build_scratch(cfg, accelerator, urls, skips, data_seed, sum(s.nsamples for s in shard_infos))
    else:
        setup = build_adaptation(cfg, accelerator, urls, skips, data_seed, sum(s.nsamples for s in shard_infos))
    steps = total_steps(cfg, setup.samples_per_pass, accelerator.num_processes)

    # Losses and optimisers; accelerate wraps the trained modules for DDP and mixed precision.
    objective, disc = build_objective(cfg, setup.layout, accelerator.device)
    optimizer = torch.optim.AdamW([p for p in setup.model.parameters() if p.requires_grad], lr=cfg.lr,
                                  betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
    model, optimizer = accelerator.prepare(setup.model.to(accelerator.device), optimizer)
    trainer = Trainer(accelerator, model, setup.forward, optimizer, objective, setup.last_layer, cfg.grad_clip,
                      gan_start_step=cfg.gan_start_step, disc_config=DiscriminatorLossConfig())
    if disc is not None:
        disc_optimizer = torch.optim.AdamW(disc.heads.parameters(), lr=cfg.disc_lr, betas=tuple(cfg.betas),
                                           weight_decay=cfg.weight_decay)
        trainer.disc, trainer.disc_optimizer = accelerator.prepare(disc, disc_optimizer)

    # Resume from the last checkpoint when the run directory contains one.
    if checkpoint is not None:
        restore_training_state(trainer, *checkpoint)
        log.info("resuming %s at step %d of %d", cfg.out, start, steps)

    # Train, logging window means and writing resumable checkpoints.
    first_batch = None
    window = MetricWindow()
    last_metrics: dict[str, float] = {}
    progress = tqdm(total=steps, initial=start, disable=not accelerator.is_main_process, desc="adapt")
    started = time.perf_counter()
    for step in range(start, steps):
        batch = next(setup.batches)
        if first_batch is None:
            first_batch = {k: v[: cfg.sample_count] for k, v in batch.items()}
        window.add(trainer.step(batch, step))
        progress.update(1)
        done = step + 1
        if done % cfg.log_every == 0 or done == steps:
            last_metrics = window.reduce(accelerator)
            if accelerator.is_main_process:
                run.log_metrics(done, last_metrics)
                progress.set_postfix({k: f"{last_metrics[k]:.4g}" for k in ("l2", "lpips", "gan", "psnr") if k in last_metrics})
        if (done % cfg.checkpoint_every == 0 or done == steps) and accelerator.is_main_process:
            run.save_checkpoint("last", *training_state(trainer, done))
    progress.close()
    elapsed = time.perf_counter() - started

    # Results: the adapted decoder (or whole tokenizer), a sample grid and the report.
    report = {"mode": "from_scratch" if cfg.from_scratch else "adapt", "steps": steps, "resumed_from": start,
              "epochs": steps * cfg.batch_size * accelerator.num_processes / max(setup.samples_per_pass, 1),
              "seconds": round(elapsed, 2),
              "images_per_second": round((steps - start) * cfg.batch_size * accelerator.num_processes / max(elapsed, 1e-9), 2),
              "final_metrics": last_metrics, "left_out": left_out, "provenance": setup.provenance,
              "config": config_to_dict(cfg)}
    skip_counts = gather_object([dict(skips.counts + setup.dropped)])  # one dict per process
    report["skipped"] = {k: sum(c.get(k, 0) for c in skip_counts) for c in skip_counts for k in c}
    if accelerator.is_main_process:
        report["outputs"] = setup.save_result(run, {"steps": steps, "final_metrics": last_metrics})
        if first_batch is not None:
            save_samples(setup, first_batch, run.path / "samples.png")
            report["outputs"]["samples"] = str(run.path / "samples.png")
        run.write_report(report)

    # The DDP wrappers keep the process group alive, so they go before the group is torn down.
    del model, optimizer, trainer
    end_processes(accelerator)
    return report


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    with exit_on_input_error():
        main(parse_config(AdaptConfig, sys.argv[1:]))
