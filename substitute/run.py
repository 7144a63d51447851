"""Substitution: train a new quantizer on cached encoder latents, with encoder and decoder frozen.

    accelerate launch substitute/run.py --cache latents.zarr --quantizer mmd --layout multiscale \
        --codebook-size 8192 --out runs/mmd8192

Reads latents only from the cache (the encoder never runs), minimises the layout's VQ loss plus the codebook's
alignment term, and finishes with E and U over the evaluation cache, written to report.json. Also runs as plain
`python substitute/run.py ...`. Restarting on the same --out resumes from the last checkpoint.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
import yaml
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, set_seed
from tqdm.auto import tqdm

from cache import open_cache
from common.checkpoint import flatten_state, unflatten_state
from common.config import config_to_dict, exit_on_input_error, parse_config
from common.processes import end_processes
from common.quantize import VAR_PATCH_NUMS, QuantizerOutput, usage_counts
from common.rundir import RunDir
from substitute.data import LatentSource, PreloadedLatents, eval_batches, shard_sizes, steps_per_epoch, train_loader
from substitute.metrics import batch_error, format_stats, quantization_stats, usage_summary
from substitute.quantizers import (
    CODEBOOKS,
    LAYOUTS,
    ExternalQuantizer,
    build_external,
    build_quantizer,
    is_factory_spec,
    save_quantizer,
)
from substitute.quantizers.base import FeatureQueue


@dataclass
class SubstituteConfig:
    """Train a transplant quantizer on a latent cache."""

    cache: str = field(metadata={"help": "latent cache (Zarr store written by cache/build.py) to train on"})
    out: str = field(metadata={"help": "run directory; an existing run with a checkpoint is resumed"})
    quantizer: str = field(
        default="mmd",
        metadata={
            "help": f"codebook kind ({', '.join(sorted(CODEBOOKS))}), or MODULE:FACTORY (or FILE.py:FACTORY) for an "
            "outside quantizer built as FACTORY(codebook_size, dim, **quantizer_options); see substitute/README.md"
        },
    )
    layout: str = field(
        default="multiscale", metadata={"help": f"quantizer layout: {', '.join(LAYOUTS)}", "choices": list(LAYOUTS)}
    )
    codebook_size: int = field(default=8192, metadata={"help": "codes per codebook (K)"})
    quantizer_options: tuple[str, ...] = field(
        default=(),
        metadata={"help": "codebook (or outside factory) options as KEY=VALUE (YAML values), e.g. gamma=0.3 decay=0.9"},
    )
    patch_nums: tuple[int, ...] = field(
        default=VAR_PATCH_NUMS, metadata={"help": "multi-scale side lengths; the last must equal the latent side"}
    )
    groups: int = field(default=2, metadata={"help": "channel groups of the fixed-scale layout"})
    eval_cache: str | None = field(
        default=None, metadata={"help": "latent cache for the final E/U evaluation (default: the training cache)"}
    )
    eval_limit: int | None = field(default=None, metadata={"help": "evaluate on the first N keys only"})
    epochs: int = field(default=2, metadata={"help": "passes over the training cache (ignored when --steps is set)"})
    steps: int | None = field(default=None, metadata={"help": "total optimizer steps; overrides --epochs"})
    batch_size: int = field(default=32, metadata={"help": "latents per process per step"})
    eval_batch_size: int = field(default=64, metadata={"help": "latents per process per evaluation batch"})
    lr: float = field(default=1e-4, metadata={"help": "learning rate at the first step (linear schedule)"})
    lr_end: float = field(default=1e-5, metadata={"help": "learning rate at the last step"})
    codebook_lr: float | None = field(
        default=None, metadata={"help": "constant learning rate for the codebook, replacing the schedule"}
    )
    phi_lr: float | None = field(
        default=None, metadata={"help": "constant learning rate for the phi convolutions, replacing the schedule"}
    )
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay for all parameters"})
    log_every: int = field(default=50, metadata={"help": "steps between metric lines in metrics.jsonl"})
    checkpoint_every: int = field(default=1000, metadata={"help": "steps between resumable checkpoints"})
    workers: int = field(default=2, metadata={"help": "DataLoader worker processes reading the cache"})
    shuffle_window: int = field(
        default=4, metadata={"help": "shards whose rows are shuffled together before batching; each loader worker "
                             "holds up to two such windows in memory"}
    )
    preload: bool = field(
        default=False,
        metadata={"help": "read the whole training cache into memory first, in its stored dtype "
                          "(32 KiB per VAR latent in float32, 16 KiB in float16)"},
    )
    seed: int = field(default=0, metadata={"help": "seed of initialisation and data order"})
    overwrite: bool = field(default=False, metadata={"help": "replace an existing run directory without a checkpoint"})


def parse_options(pairs: tuple[str, ...]) -> dict[str, Any]:
    """Turn KEY=VALUE strings into codebook keyword arguments, reading each value as YAML (0.3, true, mean)."""
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"--quantizer-options {pair!r}: expected KEY=VALUE, for example gamma=0.3")
        options[key.replace("-", "_")] = yaml.safe_load(value)
    return options


def make_quantizer(cfg: SubstituteConfig, latent_shape: tuple[int, int, int]) -> nn.Module:
    """Build the quantizer for latents of shape (C, h, w), checking that the layout fits them."""
    channels, height, width = latent_shape
    if is_factory_spec(cfg.quantizer):
        # An outside quantizer: --layout, --patch-nums and --groups are its own business.
        try:
            return build_external(
                cfg.quantizer, codebook_size=cfg.codebook_size, dim=channels, latent_shape=latent_shape,
                **parse_options(cfg.quantizer_options),
            )
        except ValueError as error:
            raise SystemExit(f"cannot build the quantizer --quantizer {cfg.quantizer}: {error}") from None
    if cfg.quantizer not in CODEBOOKS:
        raise SystemExit(
            f"--quantizer {cfg.quantizer!r}: choose a codebook kind ({', '.join(sorted(CODEBOOKS))}) or give an "
            "outside quantizer as MODULE:FACTORY"
        )
    if height != width:
        raise SystemExit(
            f"latent cache {cfg.cache} contains {height}x{width} latents, but both layouts need a square grid"
        )
    if cfg.layout == "multiscale" and cfg.patch_nums[-1] != height:
        raise SystemExit(
            f"--patch-nums ends at {cfg.patch_nums[-1]} but the cached latents are {height}x{width}; "
            f"give --patch-nums ending at {height}"
        )
    try:
        return build_quantizer(
            cfg.quantizer, layout=cfg.layout, codebook_size=cfg.codebook_size, dim=channels,
            patch_nums=cfg.patch_nums, groups=cfg.groups, grid=height, **parse_options(cfg.quantizer_options),
        )
    except ValueError as error:
        raise SystemExit(f"cannot build the quantizer: {error}") from None


def has_unused_parameters(quantizer: nn.Module) -> bool:
    """Return whether some φ gets no gradient, which happens when fewer scales than φ's pick their nearest φ.

    An outside quantizer may leave any parameter unused, so DDP searches for unused ones there.
    """
    if isinstance(quantizer, ExternalQuantizer):
        return True
    phis = getattr(quantizer, "quant_resi", None)
    if phis is None:
        return False
    scales = len(quantizer.patch_nums)
    return len({phis.index_for(k, scales) for k in range(scales)}) < len(phis.qresi_ls)


def fixed_learning_rates(cfg: SubstituteConfig) -> dict[str, float | None]:
    """Map each parameter group to its constant lr override, or None where it follows the schedule."""
    return {"codebook": cfg.codebook_lr, "phi": cfg.phi_lr}


def make_optimizer(quantizer: nn.Module, cfg: SubstituteConfig) -> torch.optim.AdamW | None:
    """Build AdamW with one group for the codebooks and one for the φ's, or return None when nothing trains.

    For an outside quantizer the φ group contains every parameter outside its `codebooks()` (all of them without it).
    """
    codebook_params = [p for cb in quantizer.codebooks() for p in cb.parameters() if p.requires_grad]
    codebook_ids = {id(p) for p in codebook_params}
    phi_params = [p for p in quantizer.parameters() if p.requires_grad and id(p) not in codebook_ids]
    fixed = fixed_learning_rates(cfg)
    groups = [
        {"name": "codebook", "params": codebook_params, "fixed_lr": fixed["codebook"]},
        {"name": "phi", "params": phi_params, "fixed_lr": fixed["phi"]},
    ]
    groups = [g for g in groups if g["params"]]
    if not groups:
        return None
    return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


def set_learning_rates(optimizer: torch.optim.Optimizer, cfg: SubstituteConfig, step: int, total: int) -> None:
    """Set each group's lr to the linear schedule from --lr to --lr-end, unless the group has a fixed lr."""
    progress = step / max(total - 1, 1)
    scheduled = cfg.lr + (cfg.lr_end - cfg.lr) * progress
    for group in optimizer.param_groups:
        group["lr"] = group["fixed_lr"] if group["fixed_lr"] is not None else scheduled


def feature_queues(quantizer: nn.Module) -> list[tuple[FeatureQueue, int]]:
    """Return the feature queue of every codebook that keeps one, with the codebook's vector dimension."""
    return [(cb.queue, cb.dim) for cb in quantizer.codebooks() if isinstance(getattr(cb, "queue", None), FeatureQueue)]


def resume_state(accelerator: Accelerator, quantizer: nn.Module) -> dict[str, Any]:
    """Gather what an exact resume needs beyond the weights: every process's feature queues and the RNG state.

    A collective, so every process must call it. Only the main process's RNG is kept, because the codebooks
    broadcast its random draws to the other processes.
    """
    queues, positions = [], []
    for queue, dim in feature_queues(quantizer):
        data, where = queue.state(dim, accelerator.device)  # (capacity, d)
        queues.append(accelerator.gather(data.unsqueeze(0).contiguous()).cpu())  # (P, capacity, d)
        where = torch.tensor([[where["next"], where["filled"]]], device=accelerator.device)
        positions.append(accelerator.gather(where).cpu())  # (P, 2)
    rng = {"cpu": torch.get_rng_state()}
    if accelerator.device.type == "cuda":
        rng["device"] = torch.cuda.get_rng_state(accelerator.device)
    return {"queues": queues, "queue_positions": positions, "rng": rng}


def save_state(
    run: RunDir, quantizer: nn.Module, optimizer: torch.optim.Optimizer | None, step: int, extra: dict[str, Any]
) -> None:
    state = {"quantizer": quantizer.state_dict(), "optimizer": optimizer.state_dict() if optimizer else None, **extra}
    tensors, skeleton = flatten_state(state)
    run.save_checkpoint("last", tensors, {"step": step, "state": skeleton, "spec": quantizer.spec.to_json()})


def restore_resume_state(accelerator: Accelerator, quantizer: nn.Module, state: dict[str, Any]) -> None:
    """Put back this process's feature queues and the RNG state saved by `resume_state`."""
    queues = feature_queues(quantizer)
    saved = state.get("queues", [])
    if len(saved) != len(queues) or any(s.shape[0] != accelerator.num_processes for s in saved):
        # Another process count (or a checkpoint without queues): the queues refill within a few steps.
        accelerator.print("note: the checkpoint's feature queues do not match this run's processes, so they start empty")
    else:
        rank = accelerator.process_index
        for (queue, _), data, where in zip(queues, saved, state["queue_positions"]):
            next_row, filled = where[rank].tolist()
            queue.load_state(data[rank].to(accelerator.device), {"next": next_row, "filled": filled})
    rng = state.get("rng", {})
    if "cpu" in rng:
        torch.set_rng_state(rng["cpu"])
    if "device" in rng and accelerator.device.type == "cuda":
        torch.cuda.set_rng_state(rng["device"], accelerator.device)


def describe_spec(spec: dict[str, Any]) -> str:
    """Name a saved quantizer spec in one line, for error messages."""
    if "factory" in spec:
        return f"{spec['factory']}, K={spec['codebook_size']}, options {spec['options']}"
    return f"{spec['kind']}, {spec['layout']}, K={spec['codebook_size']}"


def check_resumable(run: RunDir) -> None:
    """Raise before anything is written if the run directory's checkpoint is not a substitution checkpoint."""
    loaded = run.load_checkpoint("last") if run.resume else None
    if loaded is not None and "spec" not in loaded[1]:
        raise ValueError(
            f"--out {run.path} contains a checkpoint of another stage (not a substitution run); choose another --out"
        )


def load_state(
    accelerator: Accelerator,
    run: RunDir,
    quantizer: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    cfg: SubstituteConfig,
) -> int:
    """Restore quantizer, optimizer, feature queues and RNG from the run's last checkpoint and return its step."""
    loaded = run.load_checkpoint("last")
    if loaded is None:
        return 0
    tensors, meta = loaded
    if meta["spec"] != quantizer.spec.to_json():
        raise SystemExit(
            f"{run.path} contains a checkpoint of a different quantizer ({describe_spec(meta['spec'])}); choose "
            "another --out or rerun with the same quantizer options"
        )
    state = unflatten_state(tensors, meta["state"])
    quantizer.load_state_dict(state["quantizer"], strict=True)
    restore_resume_state(accelerator, quantizer, state)
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
        # load_state_dict restores the saved group options too, so apply this run's lr overrides again.
        fixed = fixed_learning_rates(cfg)
        for group in optimizer.param_groups:
            group["fixed_lr"] = fixed[group["name"]]
    return int(meta["step"])


def step_metrics(
    accelerator: Accelerator,
    quantizer: nn.Module,
    out: QuantizerOutput,
    z: torch.Tensor,
    optimizer: torch.optim.Optimizer | None,
) -> dict[str, float]:
    """Return loss terms, batch E, U and perplexity, with losses averaged and code counts summed over processes."""
    losses = torch.stack([out.loss.detach(), out.stats["vq_loss"], out.stats["codebook_loss"], batch_error(out.z_q, z)])
    losses = accelerator.reduce(losses.float(), reduction="mean")
    counts = accelerator.reduce(usage_counts(quantizer, out.indices), reduction="sum")
    metrics = dict(zip(("loss", "vq_loss", "codebook_loss", "E_batch"), losses.tolist()))
    metrics.update({f"{k}_batch": v for k, v in usage_summary(quantizer, counts).items()})
    for group in optimizer.param_groups if optimizer else []:
        metrics[f"lr/{group['name']}"] = group["lr"]
    return metrics


def train(
    accelerator: Accelerator,
    model: nn.Module,
    quantizer: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    source: LatentSource,
    run: RunDir,
    cfg: SubstituteConfig,
    start: int,
    total: int,
    per_epoch: int,
) -> int:
    """Run optimizer steps `start` to `total`, logging and checkpointing on the way, and return the last step.

    `model` is the quantizer as prepared by accelerate (DDP-wrapped when distributed). Each epoch gets its own
    loader, so a resumed run continues the same data order mid-epoch.
    """
    quantizer.train()
    progress = tqdm(
        total=total, initial=start, disable=not accelerator.is_main_process, unit="step", dynamic_ncols=True
    )
    step, started = start, time.perf_counter()
    while step < total:
        epoch, within = divmod(step, per_epoch)
        loader = train_loader(
            source, batch_size=cfg.batch_size, seed=cfg.seed, epoch=epoch, start=within, steps=per_epoch,
            rank=accelerator.process_index, world_size=accelerator.num_processes, window=cfg.shuffle_window,
            workers=0 if cfg.preload else cfg.workers,  # in-memory reads need no worker processes
        )
        for z in loader:
            z = z.to(accelerator.device, non_blocking=True)  # (B, C, h, w)
            if optimizer is not None:
                set_learning_rates(optimizer, cfg, step, total)
            out = model(z)
            if optimizer is not None:
                accelerator.backward(out.loss)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            step += 1
            progress.update(1)

            # The metric reductions are collectives, so every process must take this branch.
            if step % cfg.log_every == 0 or step == total:
                # step_metrics waits for the device, so the rate below counts finished steps only.
                metrics = step_metrics(accelerator, quantizer, out, z, optimizer)
                elapsed = time.perf_counter() - started
                metrics["samples_per_s"] = (step - start) * cfg.batch_size * accelerator.num_processes / elapsed
                if accelerator.is_main_process:
                    run.log_metrics(step, metrics)
                    progress.set_postfix(loss=f"{metrics['loss']:.4f}", E=f"{metrics['E_batch']:.4f}")
            if step % cfg.checkpoint_every == 0 or step == total:
                extra = resume_state(accelerator, quantizer)  # a collective, so every process gathers
                if accelerator.is_main_process:
                    save_state(run, quantizer, optimizer, step, extra)
            if step >= total:
                break
        if step < total and step % per_epoch != 0:
            raise RuntimeError(
                f"the loader of epoch {epoch} ended at step {step}, before the epoch's last step; the cache "
                f"{cfg.cache} returned fewer rows than its shard counts promise"
            )
    progress.close()
    return step


def evaluate(accelerator: Accelerator, quantizer: nn.Module, source: LatentSource, cfg: SubstituteConfig) -> dict:
    """Compute E and U over the evaluation cache, with each key quantized by exactly one process."""
    quantizer.eval()
    batches = eval_batches(
        source, batch_size=cfg.eval_batch_size, rank=accelerator.process_index,
        world_size=accelerator.num_processes, limit=cfg.eval_limit,
    )
    return quantization_stats(
        quantizer, batches, device=accelerator.device, reduce=lambda t: accelerator.reduce(t, reduction="sum")
    )


def main(cfg: SubstituteConfig) -> dict:

    # Latents come only from the caches, so the encoder never runs here.
    if cfg.shuffle_window < 1:
        raise SystemExit(f"--shuffle-window {cfg.shuffle_window}: give at least 1 shard")
    train_source = open_cache(cfg.cache)
    tokenizer_sha256 = train_source.tokenizer_sha256
    eval_source = open_cache(cfg.eval_cache, tokenizer_sha256=tokenizer_sha256) if cfg.eval_cache else train_source
    if cfg.preload:
        train_source = PreloadedLatents(train_source)
    latent_shape = tuple(train_source.latents(train_source.keys[:1]).shape[1:])  # (C, h, w)

    # Every process seeds the same before building, so the initial weights agree.
    set_seed(cfg.seed)
    quantizer = make_quantizer(cfg, latent_shape)

    # Decide once whether the run is distributed.
    ddp_options = DistributedDataParallelKwargs(find_unused_parameters=has_unused_parameters(quantizer))
    accelerator = Accelerator(kwargs_handlers=[ddp_options])
    quantizer = quantizer.to(accelerator.device)

    # Run directory: every process checks it first, so a bad --out stops all of them at once. Then the main
    # process creates (or resumes) it before the others open it.
    check_resumable(RunDir(cfg.out, overwrite=cfg.overwrite, create=False))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        run = RunDir(cfg.out, overwrite=cfg.overwrite)
        run.save_config(cfg)
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        # The main process has already checked the folder and written config.json, so only read the resume state.
        run = RunDir(cfg.out, overwrite=True, create=False)

    # Optimizer and the step to start from.
    optimizer = make_optimizer(quantizer, cfg)
    start = load_state(accelerator, run, quantizer, optimizer, cfg) if run.resume else 0
    sizes = shard_sizes(train_source)
    per_epoch = steps_per_epoch(sizes, cfg.batch_size, accelerator.num_processes)
    if per_epoch == 0:
        raise SystemExit(
            f"latent cache {cfg.cache} has {len(train_source.keys)} samples in {sum(n > 0 for n in sizes)} shards, "
            f"too few for one batch of {cfg.batch_size} on each of {accelerator.num_processes} processes (each "
            "process reads whole shards); lower --batch-size or use fewer processes"
        )
    total = cfg.steps if cfg.steps is not None else cfg.epochs * per_epoch
    if total > start and isinstance(quantizer, ExternalQuantizer) and not quantizer.trainable:
        raise SystemExit(
            f"--quantizer {cfg.quantizer} defines no forward(z) returning a loss, so it cannot be trained; give "
            "--steps 0 to evaluate it as it is, or see 'Bring your own quantizer' in substitute/README.md"
        )
    model = accelerator.prepare(quantizer) if optimizer is not None else quantizer
    if optimizer is not None:
        optimizer = accelerator.prepare(optimizer)

    # Train, then wait until every process has finished its last step.
    step = train(accelerator, model, quantizer, optimizer, train_source, run, cfg, start, total, per_epoch)
    accelerator.wait_for_everyone()

    # Final evaluation over the whole evaluation cache, then the quantizer and report.
    stats = evaluate(accelerator, quantizer, eval_source, cfg)
    report = {
        "quantizer": quantizer.spec.to_json(),
        "cache": cfg.cache,
        "eval_cache": cfg.eval_cache or cfg.cache,
        "steps": step,
        "epochs": step / per_epoch,
        "eval": stats,
        "config": config_to_dict(cfg),
    }
    if accelerator.is_main_process:
        provenance = {"tokenizer_sha256": tokenizer_sha256, "cache": cfg.cache}
        save_quantizer(quantizer, run.path / "quantizer", stats=stats, provenance=provenance)
        run.write_report(report)
    accelerator.print(f"substitution done after {step} steps: {format_stats(stats)}")

    # The DDP wrapper keeps the process group alive, so it goes before the group is torn down.
    del model, optimizer
    end_processes(accelerator)
    return report


if __name__ == "__main__":
    with exit_on_input_error():
        main(parse_config(SubstituteConfig))
