"""Speed of one adaptation step, term by term: L2 only, + LPIPS-VGG, + GAN (generator and discriminator).

Times full optimisation steps (adapt.training.Trainer) of a random tokenizer's decoder on synthetic images and
latents, with randomly initialised LPIPS and DINO backbones (the timing does not depend on their weights, so the
benchmark runs offline). Prints images per second and milliseconds per step for each loss set.

    python benchmarks/bench_adapt.py [--preset var] [--batch-size 4] [--steps 3] [--device cuda] [--bf16]
"""

from __future__ import annotations

import argparse
import time

import torch
from accelerate import Accelerator

from adapt.discriminator import load_discriminator
from adapt.losses import GeneratorObjective, LossWeights
from adapt.perceptual import load_perceptual_loss
from adapt.run import DecoderStage
from adapt.training import Trainer
from common.tokenizer import build_tokenizer

LOSS_SETS = {"l2": (False, False), "l2+lpips": (True, False), "l2+lpips+gan": (True, True)}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_trainer(accelerator: Accelerator, preset: str, lpips: bool, gan: bool) -> Trainer:
    """Build a trainer for the decoder of a random tokenizer of `preset` with the chosen loss terms."""
    device = accelerator.device
    tokenizer = build_tokenizer(preset)
    stage = DecoderStage(tokenizer).to(device).train()
    perceptual = load_perceptual_loss(random_backbone=True).to(device) if lpips else None
    disc = load_discriminator(random_backbone=True).to(device) if gan else None
    objective = GeneratorObjective(LossWeights(perceptual=1.0 if lpips else 0.0, gan=0.5 if gan else 0.0),
                                   perceptual, disc)
    optimizer = torch.optim.AdamW(stage.parameters(), lr=1e-5, betas=(0.9, 0.95), weight_decay=1e-4)

    def forward(model: torch.nn.Module, batch: dict):
        x_hat = model(batch["latents"].to(device))
        return x_hat, x_hat.new_zeros(()), {}

    trainer = Trainer(accelerator, stage, forward, optimizer, objective, stage.decoder.conv_out.weight, 1.0)
    if disc is not None:
        trainer.disc = disc
        trainer.disc_optimizer = torch.optim.AdamW(disc.heads.parameters(), lr=1e-4, betas=(0.9, 0.95))
    return trainer


def time_steps(trainer: Trainer, batch: dict, steps: int) -> float:
    """Return seconds per step after one warm-up step."""
    device = trainer.accelerator.device
    trainer.step(batch, 0)
    sync(device)
    start = time.perf_counter()
    for step in range(steps):
        trainer.step(batch, step + 1)
    sync(device)
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="demo", choices=["demo", "var"], help="tokenizer architecture")
    parser.add_argument("--batch-size", type=int, default=8, help="images per step")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per loss set (after one warm-up step)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--bf16", action="store_true", help="bfloat16 autocast, as accelerate's --mixed_precision bf16")
    args = parser.parse_args()

    accelerator = Accelerator(cpu=args.device == "cpu", mixed_precision="bf16" if args.bf16 else "no")
    device = accelerator.device
    tokenizer = build_tokenizer(args.preset)
    size, latent_shape = tokenizer.image_size, tokenizer.latent_shape
    batch = {"image": torch.rand(args.batch_size, 3, size, size, device=device) * 2 - 1,
             "latents": torch.randn(args.batch_size, *latent_shape, device=device)}
    print(f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}, preset {args.preset} "
          f"({size} px), batch {args.batch_size}, bf16 {args.bf16}")

    for name, (lpips, gan) in LOSS_SETS.items():
        seconds = time_steps(build_trainer(accelerator, args.preset, lpips, gan), batch, args.steps)
        print(f"  {name:14s} {1000 * seconds:9.1f} ms/step   {args.batch_size / seconds:8.2f} img/s")


if __name__ == "__main__":
    main()
