"""One optimisation step of adaptation (generator, then discriminator), metric windows and resumable state."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from adapt.discriminator import DiscriminatorLossConfig, DinoDiscriminator, discriminator_loss
from adapt.losses import GeneratorObjective
from common.checkpoint import flatten_state, unflatten_state

# forward(model, batch) -> (x_hat (B, 3, R, R), extra loss (scalar), extra stats)
ForwardFn = Callable[[nn.Module, dict], tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]]


@dataclass
class Trainer:
    """Everything a step needs; `model` and `disc` may be DDP-wrapped, `last_layer` is the decoder's conv_out.weight."""

    accelerator: Any
    model: nn.Module
    forward: ForwardFn
    optimizer: torch.optim.Optimizer
    objective: GeneratorObjective
    last_layer: torch.Tensor
    grad_clip: float
    disc: nn.Module | None = None
    disc_optimizer: torch.optim.Optimizer | None = None
    disc_config: DiscriminatorLossConfig = field(default_factory=DiscriminatorLossConfig)
    gan_start_step: int = 0

    def step(self, batch: dict, step: int) -> dict[str, torch.Tensor]:
        """Update the generator on one batch, then the discriminator; return this step's metrics."""
        x = batch["image"].to(self.accelerator.device)  # (B, 3, R, R) in [-1, 1]
        gan_active = self.disc is not None and step >= self.gan_start_step

        # Generator: reconstruction terms, the adaptively weighted GAN term, and the quantizer loss when it trains.
        with self.accelerator.autocast():
            x_hat, extra_loss, extra_stats = self.forward(self.model, batch)
            loss, metrics = self.objective(x_hat, x, self.last_layer, gan_active=gan_active)
            loss = loss + extra_loss
        self.accelerator.backward(loss)
        grad_norm = self.accelerator.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        # Metrics stay on the device as detached tensors; MetricWindow reads them once per log step, so a step
        # never waits for the device to finish.
        metrics.update({k: torch.as_tensor(v).detach() for k, v in extra_stats.items()})
        metrics["grad_norm"] = torch.as_tensor(grad_norm).detach()
        with torch.no_grad():
            metrics["mse"] = F.mse_loss(x_hat.detach().float().clamp(-1, 1), x)

        # Discriminator: its heads also received gradients from the generator loss above; drop them first.
        if gan_active:
            self.disc_optimizer.zero_grad(set_to_none=True)
            with self.accelerator.autocast():
                d_loss, d_stats = discriminator_loss(self.disc, x, x_hat.detach(), self.disc_config)
            self.accelerator.backward(d_loss)
            self.disc_optimizer.step()
            self.disc_optimizer.zero_grad(set_to_none=True)
            metrics.update(d_stats)
        return metrics


class MetricWindow:
    """Running means of per-step metrics between two log steps, averaged across processes when read."""

    def __init__(self):
        self.sums: dict[str, torch.Tensor | float] = defaultdict(float)
        self.steps = 0

    def add(self, metrics: dict[str, torch.Tensor | float]) -> None:
        """Add one step's metrics; tensors are summed on their device, without a host sync."""
        for key, value in metrics.items():
            self.sums[key] = self.sums[key] + (value.detach().double() if isinstance(value, torch.Tensor) else value)
        self.steps += 1

    def reduce(self, accelerator) -> dict[str, float]:
        """Return the window's means over steps and processes, then start a new window (a collective call)."""
        keys = sorted(self.sums)
        if not keys:
            return {}
        local = torch.stack([torch.as_tensor(self.sums[k], dtype=torch.float64).to(accelerator.device) for k in keys])
        local = local / max(self.steps, 1)
        means = accelerator.reduce(local, reduction="mean").tolist()
        self.sums.clear()
        self.steps = 0
        result = dict(zip(keys, means))
        if "mse" in result:
            result["psnr"] = 10 * math.log10(4.0 / max(result["mse"], 1e-12))  # peak-to-peak range of [-1, 1] is 2
        return result


def trainable_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """Return the state dict without the frozen discriminator backbone and normalisation constants."""
    frozen = ("backbone.", "mean", "std")
    return {k: v for k, v in module.state_dict().items() if not k.startswith(frozen)}


def training_state(trainer: Trainer, step: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Flatten model, optimisers and discriminator state into (tensors, JSON skeleton) for RunDir.save_checkpoint."""
    unwrap = trainer.accelerator.unwrap_model
    state: dict[str, Any] = {"model": unwrap(trainer.model).state_dict(), "optimizer": trainer.optimizer.state_dict()}
    if trainer.disc is not None:
        state["disc"] = trainable_state(unwrap(trainer.disc))
        state["disc_optimizer"] = trainer.disc_optimizer.state_dict()
    tensors, skeleton = flatten_state(state)
    return tensors, {"step": step, "state": skeleton}


def read_training_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    """Rebuild the nested state of a checkpoint written by `training_state`, or raise if another stage wrote it."""
    state = unflatten_state(tensors, meta["state"]) if "state" in meta else {}
    if not isinstance(state, dict) or "model" not in state or "optimizer" not in state:
        raise ValueError("--out contains a checkpoint that adapt/run.py did not write (no model and optimizer "
                         "state), probably another stage's run; give the adaptation its own --out")
    return state


def restore_training_state(trainer: Trainer, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> int:
    """Load a checkpoint written by `training_state` into the trainer; return the step to continue from."""
    state = read_training_state(tensors, meta)
    unwrap = trainer.accelerator.unwrap_model
    unwrap(trainer.model).load_state_dict(state["model"], strict=True)
    trainer.optimizer.load_state_dict(state["optimizer"])
    if trainer.disc is not None:
        if "disc" not in state:
            raise ValueError("the checkpoint to resume was written without the GAN term: resume with --no-gan, or "
                             "start a new run directory")
        disc: DinoDiscriminator = unwrap(trainer.disc)
        missing, unexpected = disc.load_state_dict(state["disc"], strict=False)
        stray = [k for k in missing if not k.startswith(("backbone.", "mean", "std"))]
        if stray or unexpected:
            raise ValueError(f"discriminator state in the checkpoint does not match the discriminator (missing "
                             f"{stray[:5]}, unexpected {unexpected[:5]}): resume with the same --disc-hidden")
        trainer.disc_optimizer.load_state_dict(state["disc_optimizer"])
    return int(meta["step"])
