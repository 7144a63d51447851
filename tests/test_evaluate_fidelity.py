"""r-FID / r-IS accumulation against torch_fidelity.calculate_metrics, with a random Inception written here."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch_fidelity
from torch_fidelity import feature_extractor_inceptionv3 as inception_module

from evaluate.fidelity import InceptionFidelity, load_inception


def write_random_inception(path) -> None:
    """Save a random FeatureExtractorInceptionV3 state dict, with kaiming-normal convolutions.

    The constructor would download the real weights, so its loader is replaced by a no-op while it runs. The
    default initialisation collapses the features (FID near 0), kaiming-normal keeps them apart. The pooled
    features still vary little between images, so the head gets a larger weight (std 1) to make the logits
    differ between images and the Inception Score move away from 1.
    """
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(inception_module, "load_state_dict_from_url", lambda *args, **kwargs: {})
        patch.setattr(inception_module.FeatureExtractorInceptionV3, "load_state_dict", lambda self, state: None)
        torch.manual_seed(0)
        model = inception_module.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight)
    nn.init.normal_(model.fc.weight, std=1.0)
    torch.save(model.state_dict(), path)


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("inception") / "random-inception.pth"
    write_random_inception(path)
    return path


class _ImageList(torch.utils.data.Dataset):
    def __init__(self, images: torch.Tensor):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.images[i]


def _image_pair(count: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    reference = (torch.rand(count, 3, 32, 32, generator=generator) * 255).to(torch.uint8)
    noise = torch.randn(reference.shape, generator=generator) * 40
    reconstruction = (reference.float() + noise).clamp(0, 255).round().to(torch.uint8)
    return reference, reconstruction


@pytest.mark.slow
def test_fidelity_matches_calculate_metrics(inception_file):
    reference, reconstruction = _image_pair()
    expected = torch_fidelity.calculate_metrics(
        input1=_ImageList(reconstruction),
        input2=_ImageList(reference),
        fid=True,
        isc=True,
        isc_splits=4,
        cuda=False,
        cache=False,
        verbose=False,
        save_cpu_ram=True,  # torch-fidelity 0.4.0 then reads the images without DataLoader worker processes
        feature_extractor_weights_path=str(inception_file),
    )

    # uneven batches, keys in the same order as the images so the seeded IS shuffle gets the same order
    keys = [f"sample{i:03d}" for i in range(len(reference))]
    fidelity = InceptionFidelity(load_inception(inception_file), isc_splits=4)
    for part in (slice(0, 3), slice(3, 4), slice(4, 8)):
        fidelity.update(keys[part], reference[part], reconstruction[part])
    result = fidelity.compute()

    assert result["n"] == 8
    assert expected["frechet_inception_distance"] > 1.0  # the random features are not collapsed
    assert result["r_fid"] == pytest.approx(expected["frechet_inception_distance"], rel=1e-5)
    assert expected["inception_score_mean"] > 1.01
    assert result["r_is"] == pytest.approx(expected["inception_score_mean"], rel=1e-6)
    # the spread of nearly equal split scores carries rounding error of the order of the scores, not of the spread
    score_scale = expected["inception_score_mean"]
    assert result["r_is_std"] == pytest.approx(expected["inception_score_std"], abs=1e-6 * score_scale)


def test_fidelity_counts_repeated_key_once_for_is(inception_file):
    reference, reconstruction = _image_pair(count=4)
    fidelity = InceptionFidelity(load_inception(inception_file), isc_splits=2)
    fidelity.update(["a", "b", "c", "d"], reference, reconstruction)
    fidelity.update(["d"], reference[3:], reconstruction[3:])
    assert len(fidelity.logits) == 4


def test_fidelity_rejects_float_images(inception_file):
    fidelity = InceptionFidelity(load_inception(inception_file))
    images = torch.zeros(2, 3, 32, 32)
    with pytest.raises(TypeError, match="uint8"):
        fidelity.update(["a", "b"], images, images)


def write_random_vgg_features(path) -> None:
    """Save the convolutional part of a random torchvision VGG-16 under torchvision's `features.<i>` names."""
    import torchvision

    torch.manual_seed(0)
    features = torchvision.models.vgg16(weights=None).features
    torch.save({f"features.{key}": value for key, value in features.state_dict().items()}, path)


def _evaluate_command(demo_shards, tokenizer_path, out, weights_dir) -> list[str]:
    return [
        "--shards", demo_shards["eval"], "--tokenizer", tokenizer_path, "--out", str(out),
        "--inception-weights", str(weights_dir / "inception.pth"), "--lpips-weights", str(weights_dir / "vgg16.pth"),
        "--require-weights", "--max-samples", "4", "--isc-splits", "2", "--batch-size", "2", "--workers", "0",
    ]


@pytest.mark.slow
def test_run_all_metrics_one_and_two_processes(demo_shards, tiny_tokenizer_path, inception_file, tmp_path):
    import json
    import os
    import shutil
    import subprocess
    import sys

    from common.config import parse_config
    from evaluate.run import EvalConfig, main

    shutil.copy(inception_file, tmp_path / "inception.pth")
    write_random_vgg_features(tmp_path / "vgg16.pth")

    # one process, in this interpreter
    single = main(parse_config(EvalConfig, _evaluate_command(demo_shards, tiny_tokenizer_path, tmp_path / "one", tmp_path)))
    assert single["left_out"] == {}
    assert single["fidelity"]["n"] == single["n"] == 4
    assert all(single["metrics"][name] is not None for name in ("LPIPS", "r-FID", "r-IS"))

    # two CPU processes over gloo, started by accelerate launch
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    script = [str(Path(__file__).resolve().parents[1] / "evaluate" / "run.py")]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1"}
    command = launcher + script + _evaluate_command(demo_shards, tiny_tokenizer_path, tmp_path / "two", tmp_path)
    finished = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr[-3000:]
    double = json.loads((tmp_path / "two" / "report.json").read_text())

    assert double["processes"] == 2
    assert double["n"] == 4
    assert double["keys_scored_by_several_processes"] == 0
    assert double["utilization"] == single["utilization"]
    assert double["grid"]["keys"] == single["grid"]["keys"]
    # The decoder's float32 rounding depends on the batch each process forms, so a few uint8 pixels may differ.
    # SSIM is near 0 for an untrained tokenizer, so it needs an absolute bound as well.
    for name in ("E", "PSNR", "SSIM", "LPIPS", "r-IS"):
        assert double["metrics"][name] == pytest.approx(single["metrics"][name], rel=1e-5, abs=1e-5), name
    # four samples give a covariance of rank 3 out of 2048, whose near-zero eigenvalues carry rounding noise
    assert double["metrics"]["r-FID"] == pytest.approx(single["metrics"]["r-FID"], rel=1e-3)
