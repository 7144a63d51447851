"""All evaluation metrics of one run behind one `update` per batch and one `compute` at the end.

Metric names are the column names of the comparison table: E, U, PSNR, SSIM, LPIPS, r-FID, r-IS. A metric whose
pretrained network is not available is left out with a reason, and `compute` returns the reasons with the values.
"""

from __future__ import annotations

from typing import Sequence

import torch

from common.quantize import usage_counts
from evaluate.fidelity import ISC_SPLITS, InceptionFidelity
from evaluate.metrics import CodeUsage, PerSampleMean, QuantizationError, psnr, ssim

METRIC_ORDER = ("E", "U", "PSNR", "SSIM", "LPIPS", "r-FID", "r-IS")


def from_uint8(images: torch.Tensor) -> torch.Tensor:
    """Map uint8 images in [0, 255] back to float in [-1, 1]."""
    return images.float() / 127.5 - 1.0


class ReconstructionScores:
    """Streaming scores of (encoder latents, quantized latents, inputs, reconstructions) batches.

    `perceptual` maps two float batches in [-1, 1] to per-image LPIPS (B,); `inception` is torch-fidelity's
    feature extractor. Either may be None, and then `left_out` must give the reason for its metrics.
    """

    def __init__(
        self,
        quantizer,
        perceptual=None,
        inception=None,
        left_out: dict[str, str] | None = None,
        isc_splits: int = ISC_SPLITS,
    ) -> None:
        self.quantizer = quantizer
        self.perceptual = perceptual
        self.left_out = dict(left_out or {})
        for name, network in (("LPIPS", perceptual), ("r-FID", inception), ("r-IS", inception)):
            if network is None and name not in self.left_out:
                raise ValueError(f"{name} has no network and no reason to leave it out")
        self.error = QuantizationError()
        self.usage = CodeUsage.for_quantizer(quantizer)
        self.per_sample = {"PSNR": PerSampleMean(), "SSIM": PerSampleMean()}
        if perceptual is not None:
            self.per_sample["LPIPS"] = PerSampleMean()
        self.fidelity = InceptionFidelity(inception, isc_splits) if inception is not None else None

    @torch.no_grad()
    def update(
        self,
        keys: Sequence[str],
        z_e: torch.Tensor,
        z_q: torch.Tensor,
        indices: torch.Tensor,
        images: torch.Tensor,
        reconstructions: torch.Tensor,
    ) -> None:
        """Add one batch: latents (B, C, h, w), indices (B, T), uint8 inputs and reconstructions (B, 3, R, R)."""
        self.error.update(z_q, z_e)
        self.usage.update(usage_counts(self.quantizer, indices))
        self.per_sample["PSNR"].update(keys, psnr(images, reconstructions))
        self.per_sample["SSIM"].update(keys, ssim(images, reconstructions))
        if self.perceptual is not None:
            # LPIPS scores the uint8-rounded images, like every other image metric here
            self.per_sample["LPIPS"].update(keys, self.perceptual(from_uint8(reconstructions), from_uint8(images)))
        if self.fidelity is not None:
            self.fidelity.update(keys, images, reconstructions)

    def compute(self, accelerator=None) -> dict[str, object]:
        """Reduce across processes; return {"metrics", "n", "utilization", "per_sample", "fidelity", "left_out"}.

        Every process must call it, in the same order, because it runs collective operations.
        """
        metrics: dict[str, float | None] = dict.fromkeys(METRIC_ORDER)
        metrics["E"] = self.error.compute(accelerator)
        utilization = self.usage.compute(accelerator)
        metrics["U"] = utilization["pooled"]
        per_sample = {name: mean.compute(accelerator) for name, mean in self.per_sample.items()}
        for name, summary in per_sample.items():
            metrics[name] = summary["mean"]

        fidelity = None
        if self.fidelity is not None:
            fidelity = self.fidelity.compute(accelerator)
            metrics["r-FID"] = fidelity["r_fid"]
            metrics["r-IS"] = fidelity["r_is"]
        return {
            "metrics": metrics,
            "n": per_sample["PSNR"]["n"],
            "utilization": utilization,
            "per_sample": per_sample,
            "fidelity": fidelity,
            "left_out": self.left_out,
        }
