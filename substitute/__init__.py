"""Substitution: train a new quantizer on cached encoder latents (quantizers, losses, metrics, trainer)."""
