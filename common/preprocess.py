"""VAR's validation transform: RGB, shorter side to round(1.125·R) with Lanczos, center crop R×R, [−1, 1]."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

RESIZE_RATIO = 1.125


def transform_description(image_size: int) -> dict:
    """Return the exact transform as data, for cache provenance and run configs."""
    return {
        "convert": "RGB",
        "resize_shorter_side": round(RESIZE_RATIO * image_size),
        "resize_filter": "lanczos",
        "center_crop": image_size,
        "range": [-1.0, 1.0],
    }


def var_transform(image_size: int):
    """Return a callable mapping a PIL image to a (3, R, R) float32 tensor in [−1, 1]."""
    shorter = round(RESIZE_RATIO * image_size)

    def transform(image: Image.Image) -> torch.Tensor:
        image = image.convert("RGB")
        w, h = image.size
        scale = shorter / min(w, h)
        # Round like torchvision's Resize(int) so results match VAR's own pipeline pixel for pixel.
        new_w, new_h = (shorter, int(shorter * h / w)) if w <= h else (int(shorter * w / h), shorter)
        if scale != 1 or (new_w, new_h) != (w, h):
            image = image.resize((new_w, new_h), Image.Resampling.LANCZOS)
        left = int(round((new_w - image_size) / 2.0))
        top = int(round((new_h - image_size) / 2.0))
        image = image.crop((left, top, left + image_size, top + image_size))
        array = np.asarray(image, dtype=np.uint8)
        x = torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255.0)  # (3, R, R) in [0, 1]
        return x.mul_(2.0).sub_(1.0)

    return transform


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Map images in [−1, 1] to uint8 in [0, 255], rounding to nearest."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
