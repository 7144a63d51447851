"""Load and save VAR-family tokenizers (the architecture itself is in `common.vqvae`).

Two formats load: VAR's own `.pth` checkpoints (a plain state dict, read with `weights_only=True` so a pickle
cannot run code) and this tool's `.safetensors` + `.json` pair. The architecture is read from the tensors; the
scale list and image size are options (VAR's defaults) because the weights do not determine them.
"""

from __future__ import annotations

import json
import logging
import pickle
import re
import zipfile
from dataclasses import replace
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from common.fileio import atomic_save_safetensors, atomic_write_json, sha256_file
from common.quantize import VAR_PATCH_NUMS
from common.vqvae import PRESETS, VAR_KEY_RENAMES, VQVAE, TokenizerConfig, build_tokenizer

log = logging.getLogger(__name__)

__all__ = ["PRESETS", "TokenizerConfig", "VQVAE", "CheckpointError", "build_tokenizer", "infer_config", "load_tokenizer", "save_tokenizer"]

FORMAT = "vq-transplant-tokenizer"
USAGE_BUFFER = "quantize.ema_vocab_hit_SV"
MAX_LISTED_KEYS = 5


class CheckpointError(ValueError):
    """A tokenizer checkpoint that cannot be used; the message names the file and the problem."""


def _check_file_kind(path: Path) -> None:
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer checkpoint not found: {path}")
    head = path.read_bytes()[:512] if path.stat().st_size < 4096 else path.open("rb").read(512)
    text = head.lstrip().lower()
    if text.startswith(b"version https://git-lfs"):
        raise CheckpointError(
            f"{path} is a Git LFS pointer ({path.stat().st_size} bytes), not the checkpoint: run `git lfs pull` "
            "or download the real file"
        )
    if text.startswith((b"<!doctype html", b"<html", b"<?xml", b"<head")):
        raise CheckpointError(
            f"{path} is an HTML page, not a checkpoint: the download probably hit a login or error page; "
            "download the file again"
        )


def _read_pth(path: Path) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        # torch 2.14 names a blocked class "Unsupported global"; other unpickling errors mean bytes that are no pickle
        if "Unsupported global" not in str(err):
            raise CheckpointError(f"{path} could not be read as a PyTorch checkpoint (truncated or corrupt "
                                  f"download?): {str(err).splitlines()[0]}") from None
        raise CheckpointError(
            f"{path} was rejected: loading it with weights_only=True failed because it contains objects other "
            f"than tensors (a pickle that could run code). Only plain state dicts are accepted. Detail: "
            f"{str(err).splitlines()[0]}"
        ) from None
    # torch's unpickler reports random bytes with assorted errors (AssertionError, KeyError, ...) in torch 2.14
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, AssertionError, LookupError, TypeError,
            ValueError) as err:
        raise CheckpointError(
            f"{path} could not be read as a PyTorch checkpoint (truncated or corrupt download?): "
            f"{str(err).splitlines()[0]}"
        ) from None
    if isinstance(obj, dict):
        for wrapper in ("state_dict", "model"):
            if isinstance(obj.get(wrapper), dict) and "encoder.conv_in.weight" not in obj:
                obj = obj[wrapper]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} does not hold a state dict of tensors (found {type(obj).__name__})")
    return obj


def check_checkpoint_file(path: str | Path) -> None:
    """Raise CheckpointError naming `path` when it is a Git LFS pointer or an HTML page instead of weights."""
    _check_file_kind(Path(path))


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a foreign .pth state dict with weights_only=True; any unreadable file raises CheckpointError naming it."""
    path = Path(path)
    _check_file_kind(path)
    return _read_pth(path)


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    meta_path = path.with_suffix(".json")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{path} could not be read as safetensors (truncated or corrupt?): {err}") from None
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    return tensors, meta


def _count(state: dict, pattern: str) -> int:
    regex = re.compile(pattern)
    return len({m.group(1) for k in state if (m := regex.match(k))})


def infer_config(state: dict[str, torch.Tensor], path: Path) -> TokenizerConfig:
    """Read width, channel multipliers, block count, latent channels, vocabulary and φ count off the tensors."""
    required = ["encoder.conv_in.weight", "encoder.conv_out.weight", "quantize.embedding.weight"]
    missing = [k for k in required if k not in state]
    if missing:
        sample = sorted(state)[:MAX_LISTED_KEYS]
        raise CheckpointError(
            f"{path} is not a VAR-family tokenizer: missing {missing}; its first keys are {sample}"
        )
    ch = state["encoder.conv_in.weight"].shape[0]
    levels = _count(state, r"encoder\.down\.(\d+)\.")
    ch_mult = tuple(state[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] // ch for i in range(levels))
    last = levels - 1
    return TokenizerConfig(
        ch=ch,
        ch_mult=ch_mult,
        num_res_blocks=_count(state, r"encoder\.down\.0\.block\.(\d+)\."),
        z_channels=state["encoder.conv_out.weight"].shape[0],
        vocab_size=state["quantize.embedding.weight"].shape[0],
        num_phi=max(1, _count(state, r"quantize\.quant_resi\.qresi_ls\.(\d+)\.")),
        attn_resolutions=f"encoder.down.{last}.attn.0.qkv.weight" in state,
        mid_attn="encoder.mid.attn_1.qkv.weight" in state,
    )


def _load_strict(model: VQVAE, state: dict[str, torch.Tensor], path: Path) -> None:
    state = {VAR_KEY_RENAMES.get(k, k): v for k, v in state.items()}
    expected = model.state_dict()
    usage = state.get(USAGE_BUFFER)
    if usage is not None and usage.shape != expected[USAGE_BUFFER].shape:
        # Code-usage statistics from training, not weights: a different scale count only loses the statistics.
        log.warning(
            "%s: %s has shape %s but the model has %s scales; the usage statistics are reset",
            path, USAGE_BUFFER, tuple(usage.shape), len(model.config.patch_nums),
        )
        state[USAGE_BUFFER] = expected[USAGE_BUFFER]
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{path} does not match the VAR tokenizer architecture inferred from it: "
            f"{len(missing)} missing keys (first: {missing[:MAX_LISTED_KEYS]}), "
            f"{len(unexpected)} unexpected keys (first: {unexpected[:MAX_LISTED_KEYS]})"
        )
    for key, tensor in state.items():
        if tensor.shape != expected[key].shape:
            raise CheckpointError(
                f"{path}: tensor {key} has shape {tuple(tensor.shape)}, the model expects {tuple(expected[key].shape)}"
            )
    model.load_state_dict(state, strict=True)


def load_tokenizer(
    path: str | Path,
    *,
    patch_nums: tuple[int, ...] | None = None,
    image_size: int | None = None,
) -> VQVAE:
    """Load a VAR-family tokenizer, inferring its architecture from the checkpoint's tensors.

    Raises FileNotFoundError for a missing file and CheckpointError (one line naming the file) for an HTML page,
    a Git LFS pointer, a truncated file, a pickle holding code, or tensors of another model.
    """
    path = Path(path)
    _check_file_kind(path)
    meta: dict = {}
    if path.suffix == ".safetensors":
        state, meta = _read_safetensors(path)
    else:
        state = _read_pth(path)

    config = infer_config(state, path)
    saved = meta.get("config", {})
    patch_nums = tuple(patch_nums or saved.get("patch_nums") or VAR_PATCH_NUMS)
    image_size = image_size or saved.get("image_size") or patch_nums[-1] * config.downsample
    config = replace(config, patch_nums=patch_nums, image_size=int(image_size), beta=saved.get("beta", config.beta))
    if config.latent_shape[1] != patch_nums[-1]:
        raise CheckpointError(
            f"{path}: image size {image_size} gives a {config.latent_shape[1]}x{config.latent_shape[1]} latent grid "
            f"but the last scale of patch_nums is {patch_nums[-1]}; pass matching image_size and patch_nums"
        )

    model = VQVAE(config)
    _load_strict(model, state, path)
    model.sha256 = sha256_file(path)
    return model.eval()


def save_tokenizer(model: VQVAE, prefix: str | Path, extra: dict | None = None) -> Path:
    """Write `prefix.safetensors` (VAR key names) and `prefix.json` (architecture); return the weights path."""
    prefix = Path(prefix)
    weights = prefix.with_suffix(".safetensors")
    atomic_save_safetensors(weights, model.var_state_dict())
    atomic_write_json(prefix.with_suffix(".json"), {"format": FORMAT, "config": model.config.to_json(), **(extra or {})})
    return weights
