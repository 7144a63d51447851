"""Tests for evaluate/: image metrics, set-level accumulators, Inception fidelity, reports and comparison."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from skimage import data as skimage_data
from skimage.metrics import structural_similarity

from evaluate.metrics import CodeUsage, PerSampleMean, QuantizationError, psnr, ssim


def _photo_batch(size: int = 48) -> torch.Tensor:
    """Return three real photographs from scikit-image as uint8 (3, 3, size, size)."""
    photos = [skimage_data.astronaut(), skimage_data.chelsea(), skimage_data.coffee()]
    crops = [torch.from_numpy(p[:size * 4:4, :size * 4:4].copy()).permute(2, 0, 1) for p in photos]
    return torch.stack(crops)


def _noisy(images: torch.Tensor, std: float, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(images.shape, generator=generator) * std
    return (images.float() + noise).clamp(0, 255).round().to(torch.uint8)


# PSNR


def test_psnr_identical_images_capped():
    images = _photo_batch()
    values = psnr(images, images)
    assert values.shape == (3,)
    assert torch.all(values == 100.0)


def test_psnr_constant_offset_known_value():
    a = torch.full((2, 3, 16, 16), 100, dtype=torch.uint8)
    b = a + 10
    expected = 20 * math.log10(255 / 10)  # 28.13 dB: MSE is (10/255)^2 on [0, 1]
    assert torch.allclose(psnr(a, b), torch.full((2,), expected, dtype=torch.float64))


def test_psnr_rejects_float_images():
    with pytest.raises(TypeError, match="uint8"):
        psnr(torch.zeros(1, 3, 16, 16), torch.zeros(1, 3, 16, 16))


# SSIM


@pytest.mark.parametrize("std", [3.0, 25.0])
def test_ssim_matches_skimage(std):
    clean = _photo_batch()
    noisy = _noisy(clean, std, seed=1)
    values = ssim(clean, noisy)
    for i in range(clean.shape[0]):
        expected = structural_similarity(
            clean[i].numpy() / 255.0,
            noisy[i].numpy() / 255.0,
            channel_axis=0,
            gaussian_weights=True,
            sigma=1.5,
            use_sample_covariance=False,
            data_range=1.0,
        )
        assert abs(values[i].item() - expected) < 1e-4


def test_ssim_identical_images_is_one():
    images = _photo_batch()
    assert torch.allclose(ssim(images, images), torch.ones(3, dtype=torch.float64))


def test_ssim_rejects_small_images():
    tiny = torch.zeros(1, 3, 8, 8, dtype=torch.uint8)
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(tiny, tiny)


# quantization error E and utilization U


def _split_batches(total: int, batch_size: int) -> list[slice]:
    return [slice(start, min(start + batch_size, total)) for start in range(0, total, batch_size)]


def _quantize_toy(z: torch.Tensor, codebook: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest-code quantization of (B, T, d) vectors: returns z_q (B, T, d) and indices (B, T)."""
    distances = torch.cdist(z, codebook.expand(z.shape[0], -1, -1))
    indices = distances.argmin(dim=-1)
    return codebook[indices], indices


@pytest.mark.parametrize("batch_size", [1, 5])
def test_error_and_usage_batch_size_independent(batch_size):
    generator = torch.Generator().manual_seed(0)
    z = torch.randn(11, 6, 4, generator=generator)  # 11 samples, 6 tokens (two segments of 3), d = 4
    codebook = torch.randn(32, 4, generator=generator)
    z_q, indices = _quantize_toy(z, codebook)

    error = QuantizationError()
    usage = CodeUsage(["scale_a", "scale_b"], [0, 0], codebook_size=32)
    for part in _split_batches(11, batch_size):
        error.update(z_q[part], z[part])
        per_segment = indices[part].split([3, 3], dim=1)
        usage.update(torch.stack([s.reshape(-1).bincount(minlength=32) for s in per_segment]))

    expected_error = (z_q.double() - z.double()).square().mean().item()
    assert error.compute() == pytest.approx(expected_error, rel=1e-12)
    result = usage.compute()
    assert result["pooled"] == indices.unique().numel() / 32
    assert result["per_segment"]["scale_a"] == indices[:, :3].unique().numel() / 32
    assert result["per_segment"]["scale_b"] == indices[:, 3:].unique().numel() / 32
    assert result["codes_total"] == 32


def test_usage_pools_per_codebook():
    # two groups with their own codebooks of 4 codes: group 0 uses codes {0, 1}, group 1 uses {3}
    usage = CodeUsage(["group0", "group1"], [0, 1], codebook_size=4)
    usage.update(torch.tensor([[2, 1, 0, 0], [0, 0, 0, 5]]))
    result = usage.compute()
    assert result["pooled"] == 3 / 8
    assert result["per_segment"] == {"group0": 0.5, "group1": 0.25}


def test_usage_for_quantizer_matches_usage_counts():
    from common.quantize import Codebook, MultiScaleQuantizer, usage_counts

    torch.manual_seed(0)
    quantizer = MultiScaleQuantizer(Codebook(16, 8), patch_nums=(1, 2, 4))
    z = torch.randn(3, 8, 4, 4)
    _, indices = quantizer.quantize(z)
    usage = CodeUsage.for_quantizer(quantizer)
    usage.update(usage_counts(quantizer, indices))
    result = usage.compute()
    assert list(result["per_segment"]) == [s.name for s in quantizer.segments]
    assert result["pooled"] == indices.unique().numel() / 16


def test_error_of_empty_set_raises():
    with pytest.raises(ValueError, match="empty"):
        QuantizationError().compute()


def test_per_sample_mean_deduplicates_keys():
    mean = PerSampleMean()
    mean.update(["a", "b"], torch.tensor([1.0, 3.0]))
    mean.update(["b", "c"], torch.tensor([3.0, 5.0]))  # "b" repeated, as padding would repeat it
    result = mean.compute()
    assert result["n"] == 3
    assert result["mean"] == pytest.approx(3.0)


@pytest.mark.parametrize("batch_size", [1, 5])
def test_feature_moments_match_numpy_statistics(batch_size):
    from torch_fidelity.metric_fid import fid_features_to_statistics

    from evaluate.fidelity import FeatureMoments

    generator = torch.Generator().manual_seed(0)
    features = torch.rand(23, 16, generator=generator) * 3  # non-negative, like pooled Inception features
    moments = FeatureMoments(16)
    for part in _split_batches(23, batch_size):
        moments.update(features[part])
    streamed = moments.statistics()
    expected = fid_features_to_statistics(features)
    assert np.allclose(streamed["mu"], expected["mu"], rtol=0, atol=1e-6)
    assert np.allclose(streamed["sigma"], expected["sigma"], rtol=0, atol=1e-10)
