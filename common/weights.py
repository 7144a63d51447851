"""Locations of the pretrained weights a run needs, and one start-up check that names every missing file.

Nothing here downloads. Each file is taken from an explicit path (a flag or config entry) or from the standard
cache directory the owning library would use, so a file placed there by hand, or by an earlier online run,
is found offline.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class WeightFile:
    name: str  # what the weights are, for messages
    path: Path  # where this run looks for them
    hint: str  # how to get them there

    def exists(self) -> bool:
        return self.path.is_file()


class MissingWeightsError(FileNotFoundError):
    pass


def torch_hub_checkpoints() -> Path:
    home = os.environ.get("TORCH_HOME") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "torch"
    return Path(home) / "hub" / "checkpoints"


def lpips_vgg_file(override: str | Path | None = None) -> WeightFile:
    name = "vgg16-397923af.pth"
    return WeightFile(
        "LPIPS VGG-16 backbone (torchvision)",
        Path(override) if override else torch_hub_checkpoints() / name,
        f"download https://download.pytorch.org/models/{name} to {torch_hub_checkpoints()}/ or pass --lpips-weights",
    )


def dino_vits16_file(override: str | Path | None = None) -> WeightFile:
    default = _hf_snapshot_file("timm/vit_small_patch16_224.dino", "model.safetensors")
    return WeightFile(
        "DINO ViT-S/16 discriminator backbone (timm vit_small_patch16_224.dino)",
        Path(override) if override else default,
        "download model.safetensors of the Hugging Face model timm/vit_small_patch16_224.dino and pass "
        "--dino-weights PATH (or place it in the Hugging Face hub cache)",
    )


def inception_file(override: str | Path | None = None) -> WeightFile:
    name = "weights-inception-2015-12-05-6726825d.pth"
    return WeightFile(
        "Inception-v3 for r-FID / r-IS (torch-fidelity)",
        Path(override) if override else torch_hub_checkpoints() / name,
        f"download torch-fidelity's {name} (from its GitHub releases) to {torch_hub_checkpoints()}/ "
        "or pass --inception-weights",
    )


def var_tokenizer_file(path: str | Path) -> WeightFile:
    return WeightFile(
        "VAR tokenizer checkpoint",
        Path(path),
        "download vae_ch160v4096z32.pth from the Hugging Face model FoundationVision/var and pass --tokenizer PATH",
    )


def _hf_snapshot_file(repo: str, filename: str) -> Path:
    hub = Path(os.environ.get("HF_HUB_CACHE") or Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface")) / "hub")
    snapshots = hub / f"models--{repo.replace('/', '--')}" / "snapshots"
    found = sorted(snapshots.glob(f"*/{filename}")) if snapshots.is_dir() else []
    return found[-1] if found else snapshots / "<revision>" / filename


def require_weights(*files: WeightFile) -> None:
    """Raise MissingWeightsError listing every missing file with where to put it; return if all exist."""
    missing = [f for f in files if not f.exists()]
    if missing:
        lines = [f"  - {f.name}: not found at {f.path}; {f.hint}" for f in missing]
        raise MissingWeightsError(
            f"{len(missing)} pretrained weight file(s) missing (nothing is downloaded during a run):\n" + "\n".join(lines)
        )


def missing_weights(*files: WeightFile) -> list[WeightFile]:
    return [f for f in files if not f.exists()]
