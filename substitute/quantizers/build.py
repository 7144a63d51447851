"""Build a transplant quantizer from a codebook kind and a layout; save and load it as safetensors + JSON."""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file

from common.fileio import atomic_save_safetensors, atomic_write_json
from common.quantize import VAR_PATCH_NUMS, VAR_SCALE_WEIGHTS, FixedScaleQuantizer, MultiScaleQuantizer
from substitute.quantizers.ema import EMACodebook
from substitute.quantizers.external import ExternalQuantizer, ExternalSpec, build_external_from_spec
from substitute.quantizers.mmd import MMDCodebook
from substitute.quantizers.online import OnlineCodebook
from substitute.quantizers.spec import JsonSpec
from substitute.quantizers.vanilla import VanillaCodebook
from substitute.quantizers.wasserstein import WassersteinCodebook

# Codebook kinds by name; the substitution CLI takes its --quantizer choices from here.
CODEBOOKS = {
    "vanilla": VanillaCodebook,
    "ema": EMACodebook,
    "online": OnlineCodebook,
    "wasserstein": WassersteinCodebook,
    "mmd": MMDCodebook,
}
LAYOUTS = ("multiscale", "fixed")
FILE_FORMAT = "vq-transplant-quantizer"
FILE_VERSION = 1


@dataclass
class QuantizerSpec(JsonSpec):
    """Specification that rebuilds a transplant quantizer, stored as JSON next to its weights."""

    tuple_fields: ClassVar[tuple[str, ...]] = ("patch_nums", "scale_weights")

    kind: str
    layout: str
    codebook_size: int
    dim: int
    patch_nums: tuple[int, ...]  # multi-scale scales; the last one is the latent grid side
    groups: int  # channel groups of the fixed-scale layout
    grid: int  # latent grid side the fixed-scale layout expects
    scale_weights: tuple[float, ...]  # per-scale VQ loss weights of the multi-scale layout
    num_phi: int
    phi_ratio: float
    beta: float  # commitment weight; acts only when the encoder trains
    codebook_args: dict[str, Any] = field(default_factory=dict)  # every constructor argument of the codebook


def _default_scale_weights(patch_nums: tuple[int, ...]) -> tuple[float, ...]:
    """Return VAR's weights 1,1,1,2,2,2,3,3,5,5 for its ten scales, or equal weights for any other scale list."""
    if tuple(patch_nums) == VAR_PATCH_NUMS:
        return tuple(float(w) for w in VAR_SCALE_WEIGHTS)
    return (1.0,) * len(patch_nums)


def _resolve_codebook_args(kind: str, size: int, dim: int, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Bind the kind-specific options to its constructor and fill in the defaults."""
    signature = inspect.signature(CODEBOOKS[kind])
    try:
        bound = signature.bind(size, dim, **kwargs)
    except TypeError as error:
        options = [p for p in signature.parameters if p not in ("size", "dim")]
        raise ValueError(
            f"invalid options {sorted(kwargs)} for quantizer kind {kind!r} ({error}); it accepts {options}"
        ) from None
    bound.apply_defaults()
    return {k: v for k, v in bound.arguments.items() if k not in ("size", "dim")}


def build_quantizer(
    kind: str,
    *,
    layout: str = "multiscale",
    codebook_size: int,
    dim: int = 32,
    patch_nums: tuple[int, ...] = VAR_PATCH_NUMS,
    groups: int = 2,
    grid: int | None = None,
    scale_weights: tuple[float, ...] | None = None,
    num_phi: int = 4,
    phi_ratio: float = 0.5,
    beta: float | None = None,
    **codebook_kwargs: Any,
) -> nn.Module:
    """Build a freshly initialised quantizer of codebook `kind` in the given layout.

    "multiscale" is VAR's residual pyramid over `patch_nums` with one codebook and new φ's. "fixed" splits the
    `dim` channels into `groups` groups, and each group is quantized by its own codebook at full resolution
    (`grid`, by default the last patch size). Options of the codebook kind (gamma, decay, ...) go in
    `codebook_kwargs`.
    The returned module is a `common.quantize` layout with a `spec` attribute that `save_quantizer` stores.
    """
    if kind not in CODEBOOKS:
        raise ValueError(f"unknown quantizer kind {kind!r}; choose one of {sorted(CODEBOOKS)}")
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose one of {list(LAYOUTS)}")
    if layout == "fixed" and dim % groups:
        raise ValueError(f"dim {dim} does not split into {groups} equal channel groups")
    patch_nums = tuple(int(p) for p in patch_nums)
    spec = QuantizerSpec(
        kind=kind,
        layout=layout,
        codebook_size=int(codebook_size),
        dim=int(dim),
        patch_nums=patch_nums,
        groups=int(groups),
        grid=int(grid if grid is not None else patch_nums[-1]),
        scale_weights=tuple(float(w) for w in (scale_weights or _default_scale_weights(patch_nums))),
        num_phi=int(num_phi),
        phi_ratio=float(phi_ratio),
        beta=float(CODEBOOKS[kind].default_beta if beta is None else beta),
        codebook_args={},
    )
    codebook_dim = dim if layout == "multiscale" else dim // groups
    spec.codebook_args = _resolve_codebook_args(kind, spec.codebook_size, codebook_dim, codebook_kwargs)
    return build_from_spec(spec)


def build_from_spec(spec: QuantizerSpec) -> nn.Module:
    """Build a freshly initialised quantizer from a spec (weights are random until loaded)."""
    cls = CODEBOOKS[spec.kind]
    if spec.layout == "multiscale":
        codebook = cls(spec.codebook_size, spec.dim, **spec.codebook_args)
        quantizer = MultiScaleQuantizer(
            codebook,
            patch_nums=spec.patch_nums,
            num_phi=spec.num_phi,
            phi_ratio=spec.phi_ratio,
            scale_weights=spec.scale_weights,
            beta=spec.beta,
        )
    else:
        codebooks = [cls(spec.codebook_size, spec.dim // spec.groups, **spec.codebook_args) for _ in range(spec.groups)]
        quantizer = FixedScaleQuantizer(codebooks, grid=spec.grid, beta=spec.beta)
    quantizer.spec = spec
    return quantizer


def _prefix_of(path: str | Path) -> Path:
    """Map a run directory, a prefix, or either file of a saved quantizer to the path prefix without suffix."""
    path = Path(path)
    if path.is_dir():
        return path / "quantizer"
    if path.suffix in (".safetensors", ".json"):
        return path.with_suffix("")
    return path


def save_quantizer(
    quantizer: nn.Module,
    path_prefix: str | Path,
    stats: dict[str, Any] | None = None,
    provenance: dict[str, Any] | None = None,
) -> Path:
    """Write `<prefix>.safetensors` (weights and buffers) and `<prefix>.json` (spec, stats, provenance), atomically.

    `provenance["tokenizer_sha256"]`, when given, names the tokenizer whose latents the quantizer was trained on;
    `check_quantizer_tokenizer` compares it when the quantizer is used with a tokenizer later.

    Returns the .safetensors path. The quantizer must come from `build_quantizer`, `build_external` or
    `load_quantizer`. For an outside quantizer the JSON contains its factory and arguments, and the weights are the
    outside module's own state dict.
    """
    spec = getattr(quantizer, "spec", None)
    if not isinstance(spec, (QuantizerSpec, ExternalSpec)):
        raise ValueError(
            "save_quantizer needs a quantizer made by build_quantizer, build_external or load_quantizer (no .spec found)"
        )
    prefix = Path(path_prefix)
    document = {
        "format": FILE_FORMAT,
        "version": FILE_VERSION,
        "spec": spec.to_json(),
        "stats": stats or {},
        "provenance": provenance or {},
    }
    weights = prefix.with_name(prefix.name + ".safetensors")
    module = quantizer.module if isinstance(quantizer, ExternalQuantizer) else quantizer
    state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    atomic_save_safetensors(weights, state, metadata={"format": FILE_FORMAT, "spec": json.dumps(document["spec"])})
    atomic_write_json(prefix.with_name(prefix.name + ".json"), document)
    return weights


def load_quantizer(path: str | Path, map_location: str = "cpu") -> nn.Module:
    """Load a quantizer saved by `save_quantizer` from a run directory, a path prefix, or either of its files.

    An outside quantizer comes back wrapped in `ExternalQuantizer`; its factory must be importable here too.
    """
    prefix = _prefix_of(path)
    meta_path = prefix.with_name(prefix.name + ".json")
    weights_path = prefix.with_name(prefix.name + ".safetensors")
    for required in (meta_path, weights_path):
        if not required.is_file():
            raise FileNotFoundError(
                f"quantizer file {required} not found; pass a run directory containing quantizer.safetensors and "
                "quantizer.json, or the path prefix given to save_quantizer"
            )
    try:
        document = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{meta_path} is not valid JSON ({error}); save the quantizer again or give another run "
                         "directory") from None
    found = document.get("format") if isinstance(document, dict) else None
    if found != FILE_FORMAT:
        raise ValueError(f"{meta_path} is not a saved quantizer (format {found!r}, expected {FILE_FORMAT!r})")
    if not isinstance(document.get("spec"), dict):
        raise ValueError(f"{meta_path} has no quantizer spec; save the quantizer again or give another run directory")
    try:
        state = load_file(str(weights_path), device=map_location)
    except SafetensorError as error:
        raise ValueError(f"{weights_path} is not a readable safetensors file ({error}); save the quantizer again or "
                         "give another run directory") from None
    try:
        if "factory" in document["spec"]:
            # An outside quantizer: import its factory again and load the weights into the outside module.
            quantizer = build_external_from_spec(ExternalSpec.from_json(document["spec"]))
            quantizer.module.load_state_dict(state, strict=True)
        else:
            quantizer = build_from_spec(QuantizerSpec.from_json(document["spec"]))
            quantizer.load_state_dict(state, strict=True)
    except (KeyError, TypeError, RuntimeError) as error:
        # a missing spec field, or weights whose names or shapes differ from the spec's quantizer
        details = " ".join(line.strip() for line in str(error).splitlines() if line.strip())
        raise ValueError(f"{weights_path} does not match the quantizer described in {meta_path}: {details}") from None
    quantizer.saved_stats = document.get("stats", {})
    quantizer.provenance = document.get("provenance", {})
    return quantizer


def check_quantizer_tokenizer(quantizer: nn.Module, tokenizer_sha256: str | None, source: str) -> None:
    """Raise if the quantizer was trained on the latents of a tokenizer other than the given one."""
    trained_on = getattr(quantizer, "provenance", {}).get("tokenizer_sha256")
    if trained_on and tokenizer_sha256 and trained_on != tokenizer_sha256:
        raise ValueError(
            f"quantizer {source} was trained on latents of tokenizer sha256 {trained_on}, but the tokenizer given "
            f"has sha256 {tokenizer_sha256}; use the tokenizer whose latent cache trained it"
        )


def resolve_quantizer(source: str, tokenizer: nn.Module, flag: str = "--quantizer") -> nn.Module:
    """Return the tokenizer's own quantizer for "native", else load `source` and check its tokenizer provenance."""
    if source == "native":
        return tokenizer.quantizer
    quantizer = load_quantizer(source)
    check_quantizer_tokenizer(quantizer, getattr(tokenizer, "sha256", None), f"{flag} {source}")
    return quantizer
