"""Tokenizer speed and the numerical cost of the fast paths, measured in one run.

Prints encoder/decoder images per second for the demo preset and the full VAR width, and how far bf16 autocast
and channels-last move the latents and how many multi-scale indices they change, relative to float32 on the
same weights and images (the seeded width-32 VAR tokenizer of the reference-numerics test).

    python benchmarks/bench_tokenizer.py [--device cuda] [--var-images 2]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from var_reference import seeded_images, seeded_state_dict  # noqa: E402

from common.tokenizer import VQVAE, build_tokenizer, infer_config  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def images_per_second(fn, x: torch.Tensor, repeats: int) -> float:
    fn(x)  # warm-up
    sync(x.device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn(x)
    sync(x.device)
    return repeats * x.shape[0] / (time.perf_counter() - start)


@torch.no_grad()
def fast_path_drift(device: torch.device) -> dict[str, float]:
    state = seeded_state_dict()
    model = VQVAE(infer_config(state, Path("seeded"))).to(device).eval()
    model.load_state_dict({k.replace("quantize.embedding", "quantize.codebook.embedding"): v for k, v in state.items()})
    x = seeded_images().to(device)
    z = model.encode(x)
    _, idx = model.quantizer.quantize(z)
    results = {}
    with torch.autocast(device.type, dtype=torch.bfloat16):
        z_bf16 = model.encode(x).float()
    _, idx_bf16 = model.quantizer.quantize(z_bf16)
    results["bf16 max |dz|"] = (z_bf16 - z).abs().max().item()
    results["bf16 rel. RMS dz"] = ((z_bf16 - z).pow(2).mean().sqrt() / z.pow(2).mean().sqrt()).item()
    results["bf16 indices changed"] = (idx_bf16 != idx).float().mean().item()
    results["bf16 first-4-scale indices changed"] = (idx_bf16[:, :30] != idx[:, :30]).float().mean().item()
    model = model.to(memory_format=torch.channels_last)
    z_cl = model.encode(x.contiguous(memory_format=torch.channels_last))
    _, idx_cl = model.quantizer.quantize(z_cl)
    results["channels-last max |dz|"] = (z_cl - z).abs().max().item()
    results["channels-last indices changed"] = (idx_cl != idx).float().mean().item()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--var-images", type=int, default=2, help="batch size for the full-width VAR timing")
    args = parser.parse_args()
    device = torch.device(args.device)
    print(f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}")

    for preset, batch in (("demo", 16), ("var", args.var_images)):
        model = build_tokenizer(preset).to(device).eval()
        size = model.image_size
        x = torch.rand(batch, 3, size, size, device=device) * 2 - 1
        z = model.encode(x)
        enc = images_per_second(lambda t: model.encode(t, check_range=False), x, repeats=2)
        dec = images_per_second(model.decode, z, repeats=2)
        print(f"{preset:5s} {size}px  encoder {enc:8.2f} img/s   decoder {dec:8.2f} img/s   (decoder/encoder {dec / enc:.2f})")

    print("fast paths vs float32 (seeded width-32 VAR tokenizer, 2 images at 256 px):")
    for name, value in fast_path_drift(device).items():
        print(f"  {name:36s} {value:.4g}")


if __name__ == "__main__":
    main()
