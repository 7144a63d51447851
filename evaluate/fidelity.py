"""r-FID and r-IS with torch-fidelity's Inception-v3, accumulated across batches and processes.

r-FID compares reconstructions with the preprocessed inputs they came from (the reference set), both as uint8
images; r-IS is the Inception Score of the reconstructions. Features come from torch-fidelity's
'inception-v3-compat' extractor and the final numbers from its own `fid_statistics_to_metric` and
`isc_features_to_metric`, so a run reproduces `torch_fidelity.calculate_metrics` on the same images up to
float rounding (checked in tests/test_evaluate.py).

FID statistics are streamed: each side keeps the float64 sum of its 2048-d features and of their outer products,
so memory stays at two 2048x2048 matrices however many images are scored, and the sums are reduced across
processes once. The Inception Score needs every reconstruction's logits (1008 float32 values, about 4 KB per
image), which are stored with their sample keys, gathered, de-duplicated and ordered by key.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch_fidelity import metric_fid, metric_isc, utils

from evaluate.metrics import gather_keyed, reduce_sum

FEATURE_EXTRACTOR = "inception-v3-compat"
FID_FEATURE = "2048"
ISC_FEATURE = "logits_unbiased"
# torch-fidelity's defaults (0.4.0) for the Inception Score: 10 splits, samples shuffled with seed 2020.
ISC_SPLITS = 10
ISC_SEED = 2020


def load_inception(weights_path: str, device: torch.device | str = "cpu") -> torch.nn.Module:
    """Build torch-fidelity's Inception-v3 feature extractor from a local weights file (never downloads).

    NOTE: torch-fidelity 0.4.0 reads the file with `torch.load(weights_only=False)`, which runs pickled code:
    pass only files from a source you trust.
    """
    device = torch.device(device)
    extractor = utils.create_feature_extractor(
        FEATURE_EXTRACTOR,
        [FID_FEATURE, ISC_FEATURE],
        cuda=False,
        feature_extractor_weights_path=str(weights_path),
        verbose=False,
    )
    return extractor.to(device)


class FeatureMoments:
    """Float64 sums of features and of their outer products, enough for a mean and a covariance."""

    def __init__(self, dim: int) -> None:
        self.total = torch.zeros(dim, dtype=torch.float64)
        self.outer = torch.zeros(dim, dim, dtype=torch.float64)
        self.count = 0

    def update(self, features: torch.Tensor) -> None:
        features = features.detach().double().cpu()  # (B, D)
        self.total += features.sum(dim=0)
        self.outer += features.T @ features
        self.count += features.shape[0]

    def statistics(self, accelerator=None) -> dict[str, np.ndarray]:
        """Return torch-fidelity's {"mu", "sigma"}, with sigma the unbiased (N - 1) covariance like np.cov."""
        count = int(reduce_sum(torch.tensor(self.count, dtype=torch.int64), accelerator))
        if count < 2:
            raise ValueError(f"FID needs at least 2 images per set, got {count}")
        total = reduce_sum(self.total, accelerator)
        outer = reduce_sum(self.outer, accelerator)
        mean = total / count
        sigma = (outer - count * torch.outer(mean, mean)) / (count - 1)
        return {"mu": mean.numpy(), "sigma": sigma.numpy()}


class InceptionFidelity:
    """Accumulate Inception features of (reference, reconstruction) pairs; compute r-FID and r-IS at the end."""

    def __init__(self, extractor: torch.nn.Module, isc_splits: int = ISC_SPLITS) -> None:
        self.extractor = extractor
        self.isc_splits = isc_splits
        self.device = next(extractor.parameters()).device
        self.reference = FeatureMoments(2048)
        self.reconstruction = FeatureMoments(2048)
        self.logits: dict[str, np.ndarray] = {}

    @torch.no_grad()
    def _features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if images.dtype != torch.uint8:
            raise TypeError(f"Inception features need uint8 images, got {images.dtype}")
        pool, logits = self.extractor(images.to(self.device))
        return pool, logits

    def update(self, keys: Sequence[str], reference: torch.Tensor, reconstruction: torch.Tensor) -> None:
        """Add a batch: `reference` and `reconstruction` are uint8 (B, 3, H, W), one row per key."""
        if not (len(keys) == reference.shape[0] == reconstruction.shape[0]):
            raise ValueError(f"got {len(keys)} keys for {reference.shape[0]} references and "
                             f"{reconstruction.shape[0]} reconstructions; expected one key per image pair")
        reference_pool, _ = self._features(reference)
        pool, logits = self._features(reconstruction)
        self.reference.update(reference_pool)
        self.reconstruction.update(pool)
        for key, row in zip(keys, logits.float().cpu().numpy()):
            self.logits[key] = row

    def compute(self, accelerator=None) -> dict[str, float]:
        """Return {"r_fid", "r_is", "r_is_std", "n"}; every process must call it (it reduces and gathers)."""
        fid = metric_fid.fid_statistics_to_metric(
            self.reference.statistics(accelerator), self.reconstruction.statistics(accelerator), verbose=False
        )[metric_fid.KEY_METRIC_FID]

        # order by key, so the seeded shuffle inside the Inception Score gets the same order on any process count
        merged = gather_keyed(self.logits, accelerator)
        logits = torch.from_numpy(np.stack([merged[k] for k in sorted(merged)]))  # (N, 1008)
        isc = metric_isc.isc_features_to_metric(logits, splits=self.isc_splits, shuffle=True, rng_seed=ISC_SEED)
        return {
            "r_fid": float(fid),
            "r_is": isc[metric_isc.KEY_METRIC_ISC_MEAN],
            "r_is_std": isc[metric_isc.KEY_METRIC_ISC_STD],
            "n": len(merged),
        }
