"""End-to-end tests of adapt/run.py on the demo shards with a tiny random tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import adapt.run as adapt_run
from adapt.checkpoint import AdaptedDecoderError, load_adapted_decoder
from adapt.run import AdaptConfig, main
from common.tokenizer import load_tokenizer
from common.weights import MissingWeightsError


@pytest.fixture(scope="module")
def latent_cache(demo_shards, tiny_tokenizer_path, tmp_path_factory) -> str:
    from cache.build import BuildConfig
    from cache.build import main as build_cache

    out = str(tmp_path_factory.mktemp("cache") / "latents.zarr")
    build_cache(BuildConfig(shards=(demo_shards["train"],), tokenizer=tiny_tokenizer_path, out=out, workers=0,
                            batch_size=8))
    return out


@pytest.fixture(scope="module")
def transplant_quantizer(tmp_path_factory) -> str:
    from substitute.quantizers import build_quantizer, save_quantizer

    torch.manual_seed(3)
    quantizer = build_quantizer("vanilla", layout="multiscale", codebook_size=64, dim=32)
    return str(save_quantizer(quantizer, tmp_path_factory.mktemp("quantizer") / "quantizer"))


def adapt_config(demo_shards, tokenizer, cache, out, **overrides) -> AdaptConfig:
    values = dict(shards=demo_shards["train"], out=Path(out), cache=cache, tokenizer=tokenizer, steps=2,
                  batch_size=4, lpips=False, gan=False, workers=0, shuffle_buffer=8, log_every=1,
                  checkpoint_every=1, sample_count=2)
    values.update(overrides)
    return AdaptConfig(**values)


def capture(monkeypatch, module, name: str) -> list:
    """Wrap module.name so every object it returns is recorded."""
    seen = []
    original = getattr(module, name)

    def wrapper(*args, **kwargs):
        seen.append(original(*args, **kwargs))
        return seen[-1]

    monkeypatch.setattr(module, name, wrapper)
    return seen


def state_of(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_same(before: dict, after: dict) -> None:
    assert before.keys() == after.keys()
    for key in before:
        assert torch.equal(before[key], after[key]), key


def test_adapt_trains_only_decoder_and_resumes(demo_shards, tiny_tokenizer_path, latent_cache, transplant_quantizer,
                                               tmp_path, monkeypatch):
    import substitute.quantizers

    tokenizers = capture(monkeypatch, adapt_run, "load_tokenizer")
    quantizers = capture(monkeypatch, substitute.quantizers.build, "load_quantizer")
    original = load_tokenizer(tiny_tokenizer_path)
    saved_quantizer = substitute.quantizers.build.load_quantizer(transplant_quantizer)
    out = tmp_path / "run"

    report = main(adapt_config(demo_shards, tiny_tokenizer_path, latent_cache, out, quantizer=transplant_quantizer))
    trained, quantizer = tokenizers[0], quantizers[0]

    # encoder, quant_conv, native quantizer and the transplanted quantizer are bit for bit unchanged
    for name in ("encoder", "quant_conv", "quantize"):
        assert_same(state_of(getattr(original, name)), state_of(getattr(trained, name)))
    assert_same(state_of(saved_quantizer), state_of(quantizer))
    # decoder and post_quant_conv moved
    for name in ("decoder", "post_quant_conv"):
        before, after = state_of(getattr(original, name)), state_of(getattr(trained, name))
        assert any(not torch.equal(before[k], after[k]) for k in before), name

    assert report["steps"] == 2
    assert report["resumed_from"] == 0
    assert set(report["final_metrics"]) >= {"l2", "mse", "psnr", "grad_norm"}
    for name in ("decoder.safetensors", "decoder.json", "report.json", "config.json", "metrics.jsonl", "samples.png"):
        assert (out / name).is_file(), name
    meta = json.loads((out / "decoder.json").read_text())
    assert meta["tokenizer_sha256"] == original.sha256
    assert meta["quantizer"] == transplant_quantizer

    # the adapted weights load into a fresh tokenizer, decoder only
    fresh = load_tokenizer(tiny_tokenizer_path)
    load_adapted_decoder(fresh, out)
    assert_same(state_of(trained.decoder), state_of(fresh.decoder))
    assert_same(state_of(original.encoder), state_of(fresh.encoder))

    # a second run on the same directory continues from the checkpoint
    resumed = main(adapt_config(demo_shards, tiny_tokenizer_path, latent_cache, out, quantizer=transplant_quantizer,
                                steps=3))
    assert resumed["resumed_from"] == 2
    assert resumed["steps"] == 3
    steps_logged = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps_logged == [1, 2, 3]


def test_adapted_decoder_rejects_other_tokenizer(demo_shards, tiny_tokenizer_path, latent_cache, tmp_path):
    out = tmp_path / "run"
    main(adapt_config(demo_shards, tiny_tokenizer_path, latent_cache, out, steps=1))
    other = load_tokenizer(tiny_tokenizer_path)
    other.sha256 = "0" * 64
    with pytest.raises(AdaptedDecoderError, match="0000000000"):
        load_adapted_decoder(other, out)


def test_adapt_rejects_cache_of_other_tokenizer(demo_shards, latent_cache, tmp_path):
    from cache import TokenizerMismatchError
    from common.tokenizer import build_tokenizer, save_tokenizer

    torch.manual_seed(5)
    other = str(save_tokenizer(build_tokenizer("demo", vocab_size=256), tmp_path / "other"))
    with pytest.raises(TokenizerMismatchError):
        main(adapt_config(demo_shards, other, latent_cache, tmp_path / "run"))


def test_missing_loss_weights_listed_together(demo_shards, tiny_tokenizer_path, latent_cache, tmp_path):
    out = tmp_path / "run"
    cfg = adapt_config(demo_shards, tiny_tokenizer_path, latent_cache, out, lpips=True, gan=True,
                       lpips_weights=str(tmp_path / "no-vgg.pth"), dino_weights=str(tmp_path / "no-dino.safetensors"))
    with pytest.raises(MissingWeightsError) as error:
        main(cfg)
    message = str(error.value)
    assert "2 pretrained weight file(s) missing" in message
    assert "no-vgg.pth" in message
    assert "LPIPS" in message
    assert "no-dino.safetensors" in message
    assert "DINO" in message
    assert not out.exists()  # checked before anything is written

    # switched-off losses need no files
    main(adapt_config(demo_shards, tiny_tokenizer_path, latent_cache, out, steps=1, lpips=False, gan=False,
                      lpips_weights=str(tmp_path / "no-vgg.pth"), dino_weights=str(tmp_path / "no-dino.safetensors")))


def test_skip_missing_losses_records_why(demo_shards, tiny_tokenizer_path, latent_cache, tmp_path):
    cfg = adapt_config(demo_shards, tiny_tokenizer_path, latent_cache, tmp_path / "run", steps=1, lpips=True,
                       gan=True, skip_missing_losses=True, dino_weights=str(tmp_path / "no-dino.safetensors"))
    report = main(cfg)
    assert set(report["left_out"]) == {"lpips", "gan"}
    assert "vgg16-397923af.pth" in report["left_out"]["lpips"]
    assert "no-dino.safetensors" in report["left_out"]["gan"]
    assert report["config"]["lpips"] is False
    assert report["config"]["gan"] is False


def test_adapt_with_lpips_and_gan(demo_shards, tiny_tokenizer_path, latent_cache, tmp_path):
    out = tmp_path / "run"
    report = main(adapt_config(demo_shards, tiny_tokenizer_path, latent_cache, out, steps=1, batch_size=2,
                               lpips=True, gan=True, random_loss_backbones=True, disc_hidden=8))
    metrics = report["final_metrics"]
    assert {"l2", "lpips", "gan", "gan_weight", "d_hinge", "d_consistency", "d_lecam"} <= set(metrics)
    assert metrics["gan_weight"] > 0
    checkpoint = out / "checkpoints" / "last.safetensors"
    assert checkpoint.is_file()

    resumed = main(adapt_config(demo_shards, tiny_tokenizer_path, latent_cache, out, steps=2, batch_size=2,
                                lpips=True, gan=True, random_loss_backbones=True, disc_hidden=8))
    assert resumed["resumed_from"] == 1


def test_from_scratch_saves_loadable_tokenizer(demo_shards, tmp_path):
    out = tmp_path / "scratch"
    cfg = AdaptConfig(shards=demo_shards["train"], out=out, from_scratch=True, steps=2, batch_size=4, workers=0,
                      shuffle_buffer=8, log_every=1, sample_count=2)
    report = main(cfg)
    assert report["mode"] == "from_scratch"
    assert {"l2", "vq_loss"} <= set(report["final_metrics"])
    model = load_tokenizer(out / "tokenizer.safetensors")
    assert model.image_size == 64
    assert (out / "samples.png").is_file()


def test_from_scratch_rejects_cache(demo_shards, latent_cache, tmp_path):
    cfg = AdaptConfig(shards=demo_shards["train"], out=tmp_path / "x", from_scratch=True, cache=latent_cache)
    with pytest.raises(SystemExit, match="--cache"):
        main(cfg)


def test_adapt_rejects_another_stages_run_dir(demo_shards, tiny_tokenizer_path, latent_cache, transplant_quantizer,
                                              tmp_path):
    """--out on a substitution run must raise before replacing that run's config.json."""
    from common.rundir import RunDir

    other = RunDir(tmp_path / "substitute")
    other.save_config({"stage": "substitute"})
    other.save_checkpoint("last", {"codebook": torch.zeros(2, 2)}, {"step": 3})
    cfg = adapt_config(demo_shards, tiny_tokenizer_path, latent_cache, tmp_path / "substitute",
                       quantizer=transplant_quantizer)
    with pytest.raises(ValueError, match="did not write"):
        main(cfg)
    assert json.loads((tmp_path / "substitute" / "config.json").read_text()) == {"stage": "substitute"}
