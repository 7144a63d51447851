"""An outside quantizer, defined only in this file, goes through substitution, adaptation and evaluation."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from substitute.metrics import quantization_stats
from substitute.quantizers import ExternalQuantizer, build_external, load_quantizer, save_quantizer

FACTORY = f"{__name__}:build_tiny_vq"


class TinyVQ(nn.Module):
    """Single-codebook VQ at full resolution with no residual, `segments` or `codebook_size` attributes.

    Returns indices as (B, h, w) and its training output as a plain tuple, both of which the wrapper must adapt.
    """

    def __init__(self, size: int, dim: int, beta: float = 0.25):
        super().__init__()
        self.beta = beta
        self.codes = nn.Parameter(torch.randn(size, dim) * 0.5)

    @torch.no_grad()
    def quantize(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z_q, idx, _ = self._nearest(z)
        return z_q, idx

    def _nearest(self, z: torch.Tensor):
        b, c, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, c)  # (B*h*w, C)
        idx = torch.cdist(flat, self.codes).argmin(dim=1)
        z_q = self.codes[idx].reshape(b, h, w, c).permute(0, 3, 1, 2)  # (B, C, h, w)
        return z_q, idx.reshape(b, h, w), flat

    def forward(self, z: torch.Tensor):
        z_q, idx, _ = self._nearest(z)
        loss = F.mse_loss(z_q, z.detach()) + self.beta * F.mse_loss(z, z_q.detach())
        return z + (z_q - z).detach(), idx, loss


def build_tiny_vq(codebook_size: int, dim: int, beta: float = 0.25) -> TinyVQ:
    return TinyVQ(codebook_size, dim, beta)


class QuantizeOnly(nn.Module):
    """An outside quantizer without forward: it can be evaluated but not trained."""

    def __init__(self, size: int, dim: int):
        super().__init__()
        self.register_buffer("codes", torch.randn(size, dim))

    def quantize(self, z):
        flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
        idx = torch.cdist(flat, self.codes).argmin(dim=1)
        return self.codes[idx].reshape(z.shape[0], z.shape[2], z.shape[3], -1).permute(0, 3, 1, 2), idx


def build_quantize_only(codebook_size: int, dim: int) -> QuantizeOnly:
    return QuantizeOnly(codebook_size, dim)


def test_wrapper_fills_segments_and_round_trips(tmp_path):
    torch.manual_seed(0)
    quantizer = build_external(FACTORY, codebook_size=12, dim=4, latent_shape=(4, 3, 3), beta=0.5)
    assert isinstance(quantizer.module, TinyVQ) and quantizer.module.beta == 0.5
    assert [(s.name, s.tokens, s.codebook) for s in quantizer.segments] == [("all", 9, 0)]
    assert quantizer.codebook_size == 12

    z = torch.randn(5, 4, 3, 3)
    out = quantizer(z)
    assert out.indices.shape == (5, 9)
    assert out.indices.dtype == torch.int64
    assert set(out.stats) >= {"vq_loss", "codebook_loss"}
    out.loss.backward()
    assert quantizer.module.codes.grad is not None

    stats = quantization_stats(quantizer, [z[:2], z[2:]])
    assert stats["num_latents"] == 5
    assert 0 < stats["U"] <= 1
    assert stats["U/all"] == stats["U"]

    save_quantizer(quantizer, tmp_path / "quantizer", stats=stats)
    document = json.loads((tmp_path / "quantizer.json").read_text())
    assert document["spec"]["factory"] == FACTORY
    assert document["spec"]["options"] == {"beta": 0.5}
    loaded = load_quantizer(tmp_path)
    assert isinstance(loaded, ExternalQuantizer)
    assert torch.equal(loaded.module.codes, quantizer.module.codes)
    assert torch.equal(loaded.quantize(z)[1], quantizer.quantize(z)[1])


def test_factory_errors_name_the_fix():
    with pytest.raises(ValueError, match="PYTHONPATH"):
        build_external("no_such_package_xyz.vq:build", codebook_size=4, dim=2, latent_shape=(2, 2, 2))
    with pytest.raises(ValueError, match="no attribute"):
        build_external(f"{__name__}:missing", codebook_size=4, dim=2, latent_shape=(2, 2, 2))
    with pytest.raises(ValueError, match="rejected"):
        build_external(FACTORY, codebook_size=4, dim=2, latent_shape=(2, 2, 2), gamma=1.0)


@pytest.fixture(scope="module")
def float_cache(demo_shards, tiny_tokenizer_path, tmp_path_factory) -> str:
    from cache.build import BuildConfig
    from cache.build import main as build_cache

    out = str(tmp_path_factory.mktemp("external") / "latents.zarr")
    build_cache(BuildConfig(shards=(demo_shards["eval"],), tokenizer=tiny_tokenizer_path, out=out, workers=0,
                            batch_size=8, dtype="float32"))
    return out


def test_quantize_only_module_not_trainable(float_cache, tmp_path):
    from substitute.run import SubstituteConfig, main

    values = dict(cache=float_cache, quantizer=f"{__name__}:build_quantize_only", codebook_size=8, batch_size=4,
                  workers=0, steps=2)
    with pytest.raises(SystemExit, match="--steps 0"):
        main(SubstituteConfig(out=str(tmp_path / "a"), **values))
    report = main(SubstituteConfig(out=str(tmp_path / "b"), **{**values, "steps": 0}))
    assert report["eval"]["num_latents"] > 0
    assert report["quantizer"]["factory"].endswith(":build_quantize_only")


@pytest.mark.slow
def test_outside_quantizer_through_all_stages(demo_shards, tiny_tokenizer_path, float_cache, tmp_path):
    from adapt.run import AdaptConfig
    from adapt.run import main as adapt
    from evaluate.run import EvalConfig
    from evaluate.run import main as evaluate
    from substitute.run import SubstituteConfig
    from substitute.run import main as substitute

    # substitution on the cache: the outside quantizer trains and its error falls
    common = dict(cache=float_cache, quantizer=FACTORY, codebook_size=16, quantizer_options=("beta=0.25",),
                  batch_size=4, lr=3e-2, lr_end=3e-2, log_every=5, checkpoint_every=5, workers=0, seed=0)
    torch.manual_seed(0)
    untrained = substitute(SubstituteConfig(out=str(tmp_path / "untrained"), steps=0, **common))
    trained = substitute(SubstituteConfig(out=str(tmp_path / "sub"), steps=10, **common))
    assert trained["eval"]["E"] < untrained["eval"]["E"]
    assert trained["quantizer"]["factory"] == FACTORY
    assert set(trained["eval"]) >= {"E", "U", "U/all", "perplexity"}
    assert 0 < trained["eval"]["U"] <= 1

    # adaptation of the decoder to it, frozen
    run = str(tmp_path / "sub")
    before = load_quantizer(run).module.codes.detach().clone()
    adapted = adapt(AdaptConfig(shards=demo_shards["eval"], out=tmp_path / "adapt", cache=float_cache,
                                tokenizer=tiny_tokenizer_path, quantizer=run, steps=2, batch_size=4, lpips=False,
                                gan=False, workers=0, shuffle_buffer=8, log_every=1, checkpoint_every=1,
                                sample_count=2))
    assert adapted["steps"] == 2
    assert torch.equal(load_quantizer(run).module.codes, before)

    # evaluation from the same cached latents reproduces the substitution's E and U
    report = evaluate(EvalConfig(shards=(demo_shards["eval"],), tokenizer=tiny_tokenizer_path, out=str(tmp_path / "eval"),
                                 workers=0, quantizer=run, decoder=str(tmp_path / "adapt"), cache=float_cache))
    assert report["quantizer"]["codebook_size"] == 16
    assert report["quantizer"]["segments"] == ["all"]
    assert report["metrics"]["E"] == pytest.approx(trained["eval"]["E"], rel=1e-5)
    assert report["metrics"]["U"] == pytest.approx(trained["eval"]["U"])
