"""LPIPS-VGG perceptual distance, frozen and loaded without network access.

The `lpips` package (0.1.4) builds its VGG trunk through torchvision, which downloads ImageNet weights unless
the trunk is random (`pnet_rand=True`). We build it random and then copy the VGG-16 weights from a local
torchvision checkpoint (`vgg16-397923af.pth`) ourselves, so nothing touches the network. The learned linear
heads ship inside the `lpips` package and load from disk.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import lpips
import torch
from torch import nn

from common.tokenizer import read_state_dict
from common.weights import lpips_vgg_file, require_weights

# torchvision's `features.<i>` index ranges that lpips 0.1.4 puts into `slice1` .. `slice5` of its vgg16 trunk.
_VGG_SLICES = ((1, range(0, 4)), (2, range(4, 9)), (3, range(9, 16)), (4, range(16, 23)), (5, range(23, 30)))


def vgg_features_to_lpips_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename torchvision VGG-16 `features.<i>.*` tensors to lpips's `slice<k>.<i>.*` names; drop the rest."""
    slice_of = {i: k for k, indices in _VGG_SLICES for i in indices}
    renamed = {}
    for key, value in state.items():
        match = re.fullmatch(r"features\.(\d+)\.(weight|bias)", key)
        if match is None:
            continue  # the classifier layers are not part of the LPIPS trunk
        index = int(match.group(1))
        renamed[f"slice{slice_of[index]}.{index}.{match.group(2)}"] = value
    return renamed


class PerceptualLoss(nn.Module):
    """Frozen LPIPS-VGG (v0.1) distance between images in [-1, 1], one value per image."""

    def __init__(self, vgg_file: str | Path | None = None, random_backbone: bool = False):
        super().__init__()
        if vgg_file is None and not random_backbone:
            raise ValueError("PerceptualLoss needs vgg_file (torchvision's vgg16-397923af.pth) "
                             "unless random_backbone=True")
        with warnings.catch_warnings():
            # lpips 0.1.4 calls torchvision's deprecated `pretrained=` argument; the warning is about lpips.
            warnings.filterwarnings("ignore", message=".*(pretrained|weight enum).*", category=UserWarning)
            self.net = lpips.LPIPS(net="vgg", pnet_rand=True, verbose=False)
        if not random_backbone:
            self._load_vgg(Path(vgg_file))
        self.requires_grad_(False)  # lpips leaves its linear heads trainable by default
        self.eval()

    def _load_vgg(self, path: Path) -> None:
        state = read_state_dict(path)
        trunk = vgg_features_to_lpips_keys(state)
        missing, unexpected = self.net.net.load_state_dict(trunk, strict=False)
        if missing or unexpected:
            raise ValueError(f"{path} is not a torchvision VGG-16 checkpoint: missing {sorted(missing)[:4]}, "
                             f"unexpected {sorted(unexpected)[:4]}; expected the file vgg16-397923af.pth")

    def train(self, mode: bool = True) -> "PerceptualLoss":
        # Stay in eval mode: the lpips heads contain Dropout, which a parent's .train() would switch on.
        return super().train(False)

    def forward(self, x_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Return LPIPS(x_hat, x) per image, shape (B,); inputs (B, 3, H, W) in [-1, 1]."""
        return self.net(x_hat, x).flatten()


def load_perceptual_loss(vgg_file: str | Path | None = None, random_backbone: bool = False) -> PerceptualLoss:
    """Build the frozen LPIPS-VGG loss from the local VGG-16 file that `common.weights` resolves."""
    if random_backbone:
        return PerceptualLoss(random_backbone=True)
    weight_file = lpips_vgg_file(vgg_file)
    require_weights(weight_file)
    return PerceptualLoss(weight_file.path)
