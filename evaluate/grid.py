"""Reconstruction grids: a row of inputs above rows of reconstructions, saved as PNG.

The samples shown are the first ones in sample-key order, not in arrival order. So every run on the same evaluation
set shows the same images for any number of processes or loader workers, and `evaluate.compare` can stack the
rows of several runs under one row of originals.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

GRID_PADDING = 2  # pixels between tiles and around the grid


class GridSamples:
    """Keep the `count` samples with the smallest keys: uint8 inputs and reconstructions, on the CPU."""

    def __init__(self, count: int = 8) -> None:
        self.count = count
        self.samples: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def update(self, keys: Sequence[str], images: torch.Tensor, reconstructions: torch.Tensor) -> None:
        for i, key in enumerate(keys):
            self.samples[key] = (images[i].cpu(), reconstructions[i].cpu())
        if len(self.samples) > self.count:
            self.samples = {k: self.samples[k] for k in sorted(self.samples)[: self.count]}

    def compute(self, accelerator=None) -> tuple[list[str], torch.Tensor, torch.Tensor]:
        """Gather from all processes; return (keys, inputs (n, 3, R, R), reconstructions (n, 3, R, R))."""
        merged = dict(self.samples)
        if accelerator is not None and accelerator.num_processes > 1:
            from accelerate.utils import gather_object

            for part in gather_object([self.samples]):
                merged.update(part)
        keys = sorted(merged)[: self.count]
        if not keys:
            raise ValueError("no samples to show in the grid")
        images = torch.stack([merged[k][0] for k in keys])
        reconstructions = torch.stack([merged[k][1] for k in keys])
        return keys, images, reconstructions


def compose_grid(rows: Sequence[torch.Tensor], padding: int = GRID_PADDING) -> torch.Tensor:
    """Tile uint8 rows, each (n, 3, R, R) with the same n and R, into one (3, H, W) uint8 image on white."""
    count, _, size, _ = rows[0].shape
    height = len(rows) * (size + padding) + padding
    width = count * (size + padding) + padding
    canvas = torch.full((3, height, width), 255, dtype=torch.uint8)
    for r, row in enumerate(rows):
        if row.shape != rows[0].shape:
            raise ValueError(f"grid row {r} has shape {tuple(row.shape)}, expected {tuple(rows[0].shape)}")
        top = padding + r * (size + padding)
        for c in range(count):
            left = padding + c * (size + padding)
            canvas[:, top : top + size, left : left + size] = row[c]
    return canvas


def grid_row(grid: torch.Tensor, row: int, count: int, size: int, padding: int = GRID_PADDING) -> torch.Tensor:
    """Cut row `row` of a grid made by `compose_grid` back into tiles: (count, 3, size, size) uint8."""
    top = padding + row * (size + padding)
    if top + size > grid.shape[1]:
        raise ValueError(f"the grid of height {grid.shape[1]} has no row {row} of {size}-pixel tiles")
    tiles = [grid[:, top : top + size, padding + c * (size + padding) :][:, :, :size] for c in range(count)]
    return torch.stack(tiles)


def save_png(image: torch.Tensor, path: str | Path) -> Path:
    """Write a (3, H, W) uint8 image as PNG through a temporary file and a rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    Image.fromarray(image.permute(1, 2, 0).numpy()).save(tmp, format="PNG")
    os.replace(tmp, path)
    return path


def load_png(path: str | Path) -> torch.Tensor:
    """Read a PNG as a (3, H, W) uint8 tensor."""
    with Image.open(path) as image:
        array = np.asarray(image.convert("RGB"))
    return torch.from_numpy(array.copy()).permute(2, 0, 1)
