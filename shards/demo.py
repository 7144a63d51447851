"""The embedded demo data: crops of public-domain and CC0 photographs that scikit-image ships.

Each photograph gives several random square crops at random scales, half of them mirrored, saved as JPEG in
one class folder per photograph, then written as WebDataset shards. Training and evaluation crops come from
disjoint random draws, so no training crop is evaluated (the photographs they come from are shared).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image

from shards.write import write_shards

# name in skimage.data -> (what it shows, licence as stated in scikit-image's documentation of that image)
PHOTOGRAPHS = {
    "astronaut": ("astronaut Eileen Collins, NASA", "public domain (NASA Great Images database)"),
    "camera": ("man with a camera", "CC0, photographer Lav Varshney"),
    "cat": ("Chelsea the cat", "CC0, photographer Stefan van der Walt"),
    "coffee": ("cup of coffee", "CC0, photographer Rachel Michetti"),
    "coins": ("Greek coins from Pompeii", "no known copyright restrictions"),
    "grass": ("grass texture", "CC0"),
    "gravel": ("gravel texture (CC0Textures)", "CC0"),
    "brick": ("brick wall texture (CC0Textures)", "CC0"),
    "hubble_deep_field": ("Hubble eXtreme Deep Field, NASA", "public domain"),
    "immunohistochemistry": ("immunohistochemical staining of colonic tissue", "no known copyright restrictions"),
    "rocket": ("SpaceX Falcon 9 launch", "public domain"),
    "retina": ("fundus photograph of a left eye (Wikimedia)", "CC0 1.0"),
    "clock": ("wall clock with camera motion", "public domain, photographer Stefan van der Walt"),
}


def _load(name: str) -> Image.Image:
    import skimage.data

    array = getattr(skimage.data, name)()
    return Image.fromarray(array).convert("RGB")


def random_crops(image: Image.Image, count: int, size: int, rng: np.random.Generator) -> list[Image.Image]:
    """Cut `count` square crops covering 30–100 % of the shorter side, resized to `size`, half mirrored."""
    w, h = image.size
    crops = []
    for _ in range(count):
        side = int(min(w, h) * rng.uniform(0.3, 1.0))
        left, top = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
        crop = image.crop((left, top, left + side, top + side)).resize((size, size), Image.Resampling.LANCZOS)
        if rng.random() < 0.5:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        crops.append(crop)
    return crops


def build_demo_shards(out_dir: str | Path, train_per_photo: int = 20, eval_per_photo: int = 4, crop_size: int = 96,
                      maxcount: int = 64, seed: int = 0) -> dict[str, str]:
    """Write `out_dir/train` and `out_dir/eval` shard sets; return the two index paths."""
    out_dir = Path(out_dir)
    rng = np.random.default_rng(seed)
    for split, per_photo in (("train", train_per_photo), ("eval", eval_per_photo)):
        folder = out_dir / "images" / split
        for name in PHOTOGRAPHS:
            (folder / name).mkdir(parents=True, exist_ok=True)
            for i, crop in enumerate(random_crops(_load(name), per_photo, crop_size, rng)):
                crop.save(folder / name / f"{name}_{split}_{i:03d}.jpg", quality=95)
        write_shards(folder, out_dir / split, prefix=f"demo-{split}", maxcount=maxcount)
    sources = {name: {"shows": shows, "licence": licence, "origin": f"skimage.data.{name}()"} for name, (shows, licence) in PHOTOGRAPHS.items()}
    (out_dir / "SOURCES.json").write_text(json.dumps(sources, indent=1) + "\n")
    return {"train": str(out_dir / "train" / "demo-train.json"), "eval": str(out_dir / "eval" / "demo-eval.json")}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write the demo shard sets (crops of scikit-image's photographs).")
    parser.add_argument("out_dir", help="folder to write images/, train/, eval/ and SOURCES.json into")
    parser.add_argument("--train-per-photo", type=int, default=20, help="training crops per photograph")
    parser.add_argument("--eval-per-photo", type=int, default=4, help="evaluation crops per photograph")
    parser.add_argument("--crop-size", type=int, default=96, help="side of the saved crops in pixels")
    args = parser.parse_args(argv)
    paths = build_demo_shards(args.out_dir, args.train_per_photo, args.eval_per_photo, args.crop_size)
    print(json.dumps(paths))


if __name__ == "__main__":
    main()
