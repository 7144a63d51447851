"""Throughput of each evaluation metric on one batch, to see which one limits evaluate/run.py.

    python benchmarks/bench_evaluate.py                          # 256 px, batch 32, CPU, no networks
    python benchmarks/bench_evaluate.py --networks --device cuda   # also LPIPS-VGG and Inception-v3

The networks run with random weights (same cost as the real ones), so no weights file is needed. Every line is
one metric's images per second on the same batch, timed after a warm-up and a device sync. r-FID runs
Inception-v3 on both the input and the reconstruction, so its rate per scored sample is half the printed one.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from common.config import parse_config
from common.quantize import VAR_PATCH_NUMS, Codebook, MultiScaleQuantizer, usage_counts
from evaluate.fidelity import FeatureMoments
from evaluate.metrics import CodeUsage, psnr, ssim


@dataclass
class BenchConfig:
    """Time each evaluation metric on one batch of random images."""

    image_size: int = field(default=256, metadata={"help": "side of the square images in pixels"})
    batch_size: int = field(default=32, metadata={"help": "images per timed batch"})
    codebook_size: int = field(default=4096, metadata={"help": "codes K for the utilization counts"})
    repeats: int = field(default=3, metadata={"help": "timed calls per metric, after one warm-up call"})
    device: str = field(default="cpu", metadata={"help": "torch device, e.g. cpu or cuda"})
    networks: bool = field(default=False, metadata={"help": "also time LPIPS-VGG and Inception-v3 (random weights)"})


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def images_per_second(step: Callable[[], object], cfg: BenchConfig, device: torch.device) -> float:
    step()  # warm-up: first-call allocations and kernel selection
    _sync(device)
    started = time.perf_counter()
    for _ in range(cfg.repeats):
        step()
    _sync(device)
    return cfg.batch_size * cfg.repeats / (time.perf_counter() - started)


def random_inception(device: torch.device) -> torch.nn.Module:
    """Build torch-fidelity's Inception-v3 from a random state dict written to a temporary file."""
    from torch_fidelity import feature_extractor_inceptionv3 as inception_module

    from evaluate.fidelity import load_inception

    # the constructor would download the real weights, so its loaders are no-ops while the random model is built
    original_download = inception_module.load_state_dict_from_url
    original_load = inception_module.FeatureExtractorInceptionV3.load_state_dict
    inception_module.load_state_dict_from_url = lambda *args, **kwargs: {}
    inception_module.FeatureExtractorInceptionV3.load_state_dict = lambda self, state: None
    try:
        model = inception_module.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    finally:
        inception_module.load_state_dict_from_url = original_download
        inception_module.FeatureExtractorInceptionV3.load_state_dict = original_load
    with tempfile.NamedTemporaryFile(suffix=".pth") as weights:
        torch.save(model.state_dict(), weights.name)
        return load_inception(weights.name, device)


def time_metrics(cfg: BenchConfig) -> dict[str, float]:
    device = torch.device(cfg.device)
    generator = torch.Generator(device=device).manual_seed(0)
    shape = (cfg.batch_size, 3, cfg.image_size, cfg.image_size)
    images = torch.randint(0, 256, shape, generator=generator, device=device, dtype=torch.uint8)
    reconstructions = torch.randint(0, 256, shape, generator=generator, device=device, dtype=torch.uint8)

    # utilization counts for VAR's 680-token multi-scale layout
    quantizer = MultiScaleQuantizer(Codebook(cfg.codebook_size, 32), patch_nums=VAR_PATCH_NUMS)
    tokens = sum(p * p for p in VAR_PATCH_NUMS)
    indices = torch.randint(0, cfg.codebook_size, (cfg.batch_size, tokens), generator=generator, device=device)
    usage = CodeUsage.for_quantizer(quantizer)
    moments = FeatureMoments(2048)
    features = torch.randn(cfg.batch_size, 2048, generator=generator, device=device)

    steps: dict[str, Callable[[], object]] = {
        "PSNR": lambda: psnr(images, reconstructions),
        "SSIM": lambda: ssim(images, reconstructions),
        "U counts": lambda: usage.update(usage_counts(quantizer, indices)),
        "FID moments": lambda: moments.update(features),
    }
    if cfg.networks:
        from adapt.perceptual import PerceptualLoss

        lpips_model = PerceptualLoss(random_backbone=True).to(device)
        inception = random_inception(device)
        scaled = images.float() / 127.5 - 1
        steps["LPIPS-VGG"] = lambda: lpips_model(scaled, scaled)
        steps["Inception-v3"] = lambda: inception(images)
    with torch.no_grad():
        return {name: images_per_second(step, cfg, device) for name, step in steps.items()}


def main(cfg: BenchConfig) -> None:
    # one line per metric, slowest first
    rates = time_metrics(cfg)
    print(f"{cfg.batch_size} images of {cfg.image_size} px on {cfg.device}, {torch.get_num_threads()} threads")
    for name, rate in sorted(rates.items(), key=lambda item: item[1]):
        print(f"  {name:<24} {rate:10.1f} images/s")


if __name__ == "__main__":
    main(parse_config(BenchConfig))
