"""The adapted decoder on disk: `decoder.safetensors` + `decoder.json` in an adaptation run directory.

The safetensors file contains the state dict of `tokenizer.decoder_modules()`, under the tokenizer's own key
names (`decoder.*` and `post_quant_conv.*`). Its header repeats the metadata of `decoder.json`: the sha256 of the
tokenizer checkpoint the decoder was adapted from, and the quantizer it was adapted to.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from common.fileio import atomic_save_safetensors, atomic_write_json

FORMAT = "vq-transplant-adapted-decoder"
WEIGHTS_NAME = "decoder.safetensors"
META_NAME = "decoder.json"
META_KEY = "vq_transplant_decoder"


class AdaptedDecoderError(ValueError):
    """An adapted decoder that cannot be put into the given tokenizer; the message names the file."""


def save_adapted_decoder(run_dir: str | Path, decoder_modules: nn.Module, meta: dict[str, Any]) -> Path:
    """Write the decoder's weights and metadata atomically; return the weights path."""
    run_dir = Path(run_dir)
    meta = {"format": FORMAT, **meta}
    weights = run_dir / WEIGHTS_NAME
    state = {k: v.detach().cpu() for k, v in decoder_modules.state_dict().items()}
    atomic_save_safetensors(weights, state, metadata={META_KEY: json.dumps(meta, default=str)})
    atomic_write_json(run_dir / META_NAME, meta)
    return weights


def read_adapted_decoder(run_dir: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Return the adapted decoder's state dict and metadata from a run directory (or its decoder.safetensors)."""
    path = Path(run_dir)
    weights = path if path.suffix == ".safetensors" else path / WEIGHTS_NAME
    if not weights.is_file():
        raise FileNotFoundError(f"adapted decoder not found: {weights}; run adapt/run.py with --out {path} first")
    with safe_open(str(weights), framework="pt") as f:
        meta = json.loads((f.metadata() or {}).get(META_KEY, "{}"))
        state = {key: f.get_tensor(key) for key in f.keys()}
    if meta.get("format") != FORMAT:
        raise AdaptedDecoderError(f"{weights} is not an adapted decoder (its metadata lacks format {FORMAT!r})")
    return state, meta


def load_adapted_decoder(tokenizer: nn.Module, run_dir: str | Path, check_sha256: bool = True) -> dict[str, Any]:
    """Put the adapted decoder + post_quant_conv weights of `run_dir` into `tokenizer` in place; return the metadata.

    With `check_sha256`, raises AdaptedDecoderError when the decoder was adapted from another tokenizer
    checkpoint than the one `tokenizer.sha256` names. The metadata's "quantizer" entry names the quantizer the
    decoder was adapted to ("native" or a substitution run), which evaluation should quantize with.
    """
    state, meta = read_adapted_decoder(run_dir)
    expected, found = meta.get("tokenizer_sha256"), getattr(tokenizer, "sha256", None)
    if check_sha256 and expected != found:
        raise AdaptedDecoderError(
            f"the decoder in {run_dir} was adapted from tokenizer sha256 {expected}, but the given tokenizer has "
            f"sha256 {found}; load the tokenizer named in {Path(run_dir) / META_NAME}, or pass check_sha256=False"
        )
    modules = tokenizer.decoder_modules()
    missing, unexpected = modules.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise AdaptedDecoderError(
            f"the decoder in {run_dir} does not fit this tokenizer: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}"
        )
    return meta
