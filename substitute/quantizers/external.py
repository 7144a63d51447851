"""Bring your own quantizer: wrap an outside module so substitution, adaptation and evaluation can use it.

An outside quantizer is any `nn.Module` with `quantize(z) -> (z_q, idx)`, made by a factory that this module
imports from a spec string `MODULE:FACTORY` (`mypkg.myvq:build`) or `FILE.py:FACTORY`, and calls as
`factory(codebook_size, dim, **options)`. To be trainable by substitution, its `forward(z)` returns one of

- a `common.quantize.QuantizerOutput`,
- a tuple `(z_q, indices, loss)`,
- a dict with keys `z_q`, `indices`, `loss` and optionally `stats` (a dict of scalar tensors or floats),

where z_q carries a gradient (straight-through or otherwise) and loss is a scalar tensor. `segments`,
`codebook_size` and `codebooks()` are optional. Without `segments`, utilization treats all tokens as one segment
of one codebook. Without `codebook_size`, the K given to the factory is the codebook size.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar

import torch
import torch.nn as nn

from common.quantize import QuantizerOutput, Segment
from substitute.quantizers.spec import JsonSpec


def is_factory_spec(text: str) -> bool:
    """Return whether `text` names an outside quantizer factory (`MODULE:FACTORY`) rather than a built-in kind."""
    module_part, sep, attr = text.rpartition(":")
    return bool(sep and module_part and attr) and "/" not in attr


@dataclass
class ExternalSpec(JsonSpec):
    """Recipe of an outside quantizer: its factory, the factory's arguments and the latent shape it expects."""

    label: ClassVar[str] = "outside quantizer spec"
    tuple_fields: ClassVar[tuple[str, ...]] = ("latent_shape",)

    factory: str  # MODULE:FACTORY or FILE.py:FACTORY
    codebook_size: int
    dim: int
    latent_shape: tuple[int, int, int]  # (C, h, w) of the latents it was built for
    options: dict[str, Any] = field(default_factory=dict)  # keyword arguments of the factory, JSON values only


def _import_module(module_part: str, spec_text: str):
    """Import a module by dotted name, or load it from a .py file path."""
    if module_part.endswith(".py"):
        path = Path(module_part).resolve()
        if not path.is_file():
            raise ValueError(f"quantizer factory {spec_text!r}: file {path} not found")
        name = f"vqt_external_{path.stem}_{abs(hash(str(path))):x}"
        if name in sys.modules:
            return sys.modules[name]
        module_spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[name] = module  # dataclasses defined in the file look their module up in sys.modules
        module_spec.loader.exec_module(module)
        return module
    try:
        return importlib.import_module(module_part)
    except ModuleNotFoundError as error:
        raise ValueError(
            f"quantizer factory {spec_text!r}: cannot import {module_part!r} ({error}); install the package or add "
            "its folder to PYTHONPATH, or give FILE.py:FACTORY"
        ) from None


def import_factory(spec_text: str) -> Callable[..., nn.Module]:
    """Return the callable that `MODULE:FACTORY` or `FILE.py:FACTORY` names (FACTORY may be dotted, `Class.build`)."""
    module_part, sep, attr = spec_text.rpartition(":")
    if not sep or not module_part or not attr:
        raise ValueError(f"quantizer factory {spec_text!r}: expected MODULE:FACTORY, for example mypkg.myvq:build")
    target: Any = _import_module(module_part, spec_text)
    for name in attr.split("."):
        if not hasattr(target, name):
            raise ValueError(f"quantizer factory {spec_text!r}: {module_part} has no attribute {attr!r}")
        target = getattr(target, name)
    if not callable(target):
        raise ValueError(f"quantizer factory {spec_text!r}: {attr} is not callable")
    return target


def _as_tensor(value: Any, like: torch.Tensor) -> torch.Tensor:
    return value.detach() if torch.is_tensor(value) else torch.tensor(float(value), device=like.device)


class ExternalQuantizer(nn.Module):
    """An outside quantizer behind the interface of the `common.quantize` layouts.

    Provides `quantize`, `forward` (returning a QuantizerOutput with `vq_loss` and `codebook_loss` stats),
    `segments`, `codebook_size`, `codebooks()` and `spec`. The outside module is `self.module`; its own
    state dict is what `save_quantizer` writes.
    """

    def __init__(self, module: nn.Module, spec: ExternalSpec):
        super().__init__()
        if not isinstance(module, nn.Module) or not callable(getattr(module, "quantize", None)):
            raise ValueError(
                f"quantizer factory {spec.factory!r} returned {type(module).__name__}, not an nn.Module with "
                "quantize(z) -> (z_q, idx)"
            )
        self.module = module
        self.spec = spec
        self.codebook_size = int(getattr(module, "codebook_size", spec.codebook_size))
        segments = getattr(module, "segments", None)
        if segments is None:
            segments = [Segment("all", self._probe_tokens(), 0)]
        self.segments = list(segments)

    @property
    def trainable(self) -> bool:
        """Whether the outside module defines forward(z), which substitution needs to train it."""
        return type(self.module).forward is not nn.Module.forward

    def _probe_tokens(self) -> int:
        """Quantize one zero latent to learn how many index columns the module produces per latent."""
        probe = torch.zeros(1, *self.spec.latent_shape)  # (1, C, h, w)
        device = next(iter(self.module.parameters()), probe).device
        with torch.no_grad():
            _, indices = self.module.quantize(probe.to(device))
        return indices.reshape(1, -1).shape[1]

    def codebooks(self) -> list[nn.Module]:
        own = getattr(self.module, "codebooks", None)
        return list(own()) if callable(own) else []

    def _flat_indices(self, indices: torch.Tensor, batch: int) -> torch.Tensor:
        """Return indices as (B, T) int64, flattening any spatial dimensions the module kept."""
        flat = indices.reshape(batch, -1).long()
        expected = sum(s.tokens for s in self.segments)
        if flat.shape[1] != expected:
            raise ValueError(
                f"outside quantizer {self.spec.factory!r} returned {flat.shape[1]} indices per latent, but its "
                f"segments cover {expected}; the latents must have the shape it was built for {self.spec.latent_shape}"
            )
        return flat

    def quantize(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z_q, indices = self.module.quantize(z)  # (B, C, h, w), (B, ...)
        return z_q, self._flat_indices(indices, z.shape[0])

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        if not self.trainable:
            raise TypeError(
                f"outside quantizer {self.spec.factory!r} defines no forward(z), so it cannot be trained; "
                "give --steps 0 to evaluate it as it is"
            )
        out = self.module(z)
        if isinstance(out, QuantizerOutput):
            z_q, indices, loss, stats = out.z_q, out.indices, out.loss, dict(out.stats)
        elif isinstance(out, dict) and {"z_q", "indices", "loss"} <= set(out):
            z_q, indices, loss, stats = out["z_q"], out["indices"], out["loss"], dict(out.get("stats", {}))
        elif isinstance(out, (tuple, list)) and len(out) == 3:
            (z_q, indices, loss), stats = out, {}
        else:
            raise TypeError(
                f"forward of outside quantizer {self.spec.factory!r} returned {type(out).__name__}; return a "
                "QuantizerOutput, a tuple (z_q, indices, loss) or a dict with keys z_q, indices, loss"
            )
        loss = torch.as_tensor(loss, device=z.device)
        stats = {k: _as_tensor(v, loss) for k, v in stats.items()}
        stats.setdefault("vq_loss", loss.detach())
        stats.setdefault("codebook_loss", torch.zeros_like(loss.detach()))
        return QuantizerOutput(z_q, self._flat_indices(indices, z.shape[0]), loss, stats)


def build_external(
    factory: str, *, codebook_size: int, dim: int, latent_shape: tuple[int, int, int], **options: Any
) -> ExternalQuantizer:
    """Import `factory` (MODULE:FACTORY), call it as factory(codebook_size, dim, **options) and wrap the result."""
    try:
        json.dumps(options)
    except TypeError as error:
        raise ValueError(f"options of quantizer factory {factory!r} must be JSON values to be saved: {error}") from None
    spec = ExternalSpec(factory, int(codebook_size), int(dim), tuple(int(s) for s in latent_shape), dict(options))
    return build_external_from_spec(spec)


def build_external_from_spec(spec: ExternalSpec) -> ExternalQuantizer:
    """Rebuild a freshly initialised outside quantizer from its spec (weights are the factory's until loaded)."""
    make = import_factory(spec.factory)
    try:
        module = make(spec.codebook_size, spec.dim, **spec.options)
    except TypeError as error:
        raise ValueError(
            f"quantizer factory {spec.factory!r} rejected (codebook_size={spec.codebook_size}, dim={spec.dim}, "
            f"options {sorted(spec.options)}): {error}"
        ) from None
    return ExternalQuantizer(module, spec)
