"""Encoder precision flags and the index-change measurement of cache/precision.py."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cache.encode import Encoder
from cache.precision import IndexChanges, PrecisionConfig, bootstrap_interval, main as precision_main
from common.precision import float32_precision
from shards.index import load_index
from shards.read import iter_samples


def precision_flags() -> tuple[str, str]:
    return torch.backends.cudnn.conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision


def test_float32_precision_sets_and_restores():
    before = precision_flags()
    with float32_precision("ieee"):
        assert precision_flags() == ("ieee", "ieee")
        with float32_precision("tf32"):
            assert precision_flags() == ("tf32", "tf32")
        assert precision_flags() == ("ieee", "ieee")
    assert precision_flags() == before


def test_float32_precision_restores_after_error():
    before = precision_flags()
    with pytest.raises(RuntimeError, match="inside"):
        with float32_precision("ieee"):
            raise RuntimeError("inside")
    assert precision_flags() == before


def test_float32_precision_legacy_flags(monkeypatch):
    """Torch releases without the fp32_precision settings get the allow_tf32 flags."""

    class LegacyCudnn:
        allow_tf32 = True

    class LegacyMatmul:
        allow_tf32 = False

    monkeypatch.setattr(torch.backends, "cudnn", LegacyCudnn)
    monkeypatch.setattr(torch.backends.cuda, "matmul", LegacyMatmul)
    with float32_precision("ieee"):
        assert (LegacyCudnn.allow_tf32, LegacyMatmul.allow_tf32) == (False, False)
    with float32_precision("tf32"):
        assert (LegacyCudnn.allow_tf32, LegacyMatmul.allow_tf32) == (True, True)
    assert (LegacyCudnn.allow_tf32, LegacyMatmul.allow_tf32) == (True, False)


def test_float32_precision_rejects_unknown_mode():
    with pytest.raises(ValueError, match="'fp16'"):
        with float32_precision("fp16"):
            pass


@pytest.mark.parametrize("options,expected", [({}, "ieee"), ({"tf32": True}, "tf32")])
def test_encoder_sets_conv_precision(tiny_tokenizer, options, expected):
    seen = []
    encode = tiny_tokenizer.encode

    def recording_encode(x):
        seen.append(torch.backends.cudnn.conv.fp32_precision)
        return encode(x)

    tiny_tokenizer.encode = recording_encode
    encoder = Encoder(tiny_tokenizer, torch.device("cpu"), hflip=False, bf16=False, channels_last=False, **options)
    encoder(torch.zeros(1, 3, 64, 64))
    assert seen == [expected]


def test_encoder_rejects_bf16_with_tf32(tiny_tokenizer):
    with pytest.raises(ValueError, match="--bf16 and --tf32"):
        Encoder(tiny_tokenizer, torch.device("cpu"), hflip=False, bf16=True, channels_last=False, tf32=True)


def test_bootstrap_interval_of_constant():
    rng = np.random.default_rng(0)
    assert bootstrap_interval(np.full(50, 0.25), 200, rng) == (0.25, 0.25)


def test_bootstrap_interval_brackets_mean():
    values = np.random.default_rng(1).exponential(size=400)
    low, high = bootstrap_interval(values, 500, np.random.default_rng(0))
    assert low < values.mean() < high
    # the interval of a mean shrinks like 1/sqrt(n): about ±2 standard errors here
    standard_error = values.std() / np.sqrt(values.size)
    assert 2.5 * standard_error < high - low < 6 * standard_error


def test_index_changes_counts_per_image():
    z = torch.zeros(2, 1, 2, 2)
    reference_idx = torch.tensor([[0, 1, 2, 3], [4, 5, 6, 7]])
    variant_idx = reference_idx.clone()
    variant_idx[1, 2] = 9  # one of the 8 indices, in the second image
    changes = IndexChanges()
    changes.update((z, z + 1, reference_idx), (z, z + 1, variant_idx))
    summary = changes.summary(100, np.random.default_rng(0))

    assert summary["changed_percent"] == pytest.approx(100 / 8)
    assert summary["images_with_changes"] == 1
    assert summary["E_change_percent"] == 0.0


def test_index_changes_pairs_image_with_flip():
    z = torch.zeros(4, 1, 2, 2)
    # two images followed by their two flips, four indices each
    reference_idx = torch.arange(16).reshape(4, 4)
    variant_idx = reference_idx.clone()
    variant_idx[3, 0] = 99  # one index of the second image's flip
    changes = IndexChanges(views=2)
    changes.update((z, z + 1, reference_idx), (z, z + 1, variant_idx))

    assert [share.tolist() for share in changes.per_image] == [[0.0, 0.125]]
    summary = changes.summary(100, np.random.default_rng(0))
    assert summary["changed_percent"] == pytest.approx(100 / 16)
    assert summary["images_with_changes"] == 1


def test_index_changes_one_image_has_no_interval():
    z = torch.zeros(1, 1, 2, 2)
    idx = torch.zeros(1, 4, dtype=torch.long)
    changes = IndexChanges()
    changes.update((z, z + 1, idx), (z, z + 1, idx + 1))
    summary = changes.summary(100, np.random.default_rng(0))
    assert summary["changed_percent"] == 100.0
    assert summary["interval_percent"] is None


def test_index_changes_e_change():
    z = torch.zeros(1, 1, 2, 2)
    idx = torch.zeros(1, 4, dtype=torch.long)
    changes = IndexChanges()
    changes.update((z, z + 1, idx), (z, z + 1.1, idx))
    assert changes.summary(10, np.random.default_rng(0))["E_change_percent"] == pytest.approx(21.0)


def independent_float16_changes(shards: str, tokenizer, limit: int) -> tuple[float, float]:
    """Return the percentage of native indices that float16 rounding changes, computed without cache/precision.py,
    and the largest latent magnitude."""
    urls = [s.url for s in load_index(shards)]
    images = torch.stack([s["image"] for s in iter_samples(urls, tokenizer.image_size)][:limit])
    with torch.no_grad():
        z = tokenizer.encode(images)
        _, reference = tokenizer.quantizer.quantize(z)
        _, rounded = tokenizer.quantizer.quantize(z.half().float())
    return 100 * (reference != rounded).double().mean().item(), z.abs().max().item()


def test_precision_report_matches_direct_count(tmp_path, demo_shards, tiny_tokenizer_path, tiny_tokenizer,
                                               single_thread):
    cfg = PrecisionConfig(shards=(demo_shards["train"],), tokenizer=tiny_tokenizer_path, limit=20, batch_size=6,
                          resamples=200, json=str(tmp_path / "report.json"))
    report = precision_main(cfg)
    native = report["quantizers"]["native"]

    assert report["images"] == 20
    assert set(native) == {"float16 storage", "bf16 autocast encoder"}
    expected, largest = independent_float16_changes(demo_shards["train"], tiny_tokenizer, 20)
    assert native["float16 storage"]["changed_percent"] == pytest.approx(expected, abs=1e-9)
    low, high = native["float16 storage"]["interval_percent"]
    assert low <= native["float16 storage"]["changed_percent"] <= high
    # float16 keeps 11 significant bits, so no latent moves by more than 2^-11 of the largest magnitude
    assert 0 < report["largest_latent_change"]["float16 storage"] <= 2 ** -11 * largest
    assert report["largest_latent_change"]["bf16 autocast encoder"] > report["largest_latent_change"]["float16 storage"]
    assert json.loads((tmp_path / "report.json").read_text()) == report


def test_precision_reads_several_indexes(demo_shards, tiny_tokenizer_path, single_thread):
    train = sum(s.nsamples for s in load_index(demo_shards["train"]))
    evaluation = sum(s.nsamples for s in load_index(demo_shards["eval"]))
    cfg = PrecisionConfig(shards=(demo_shards["train"], demo_shards["eval"]), tokenizer=tiny_tokenizer_path,
                          limit=1000, resamples=100)
    assert precision_main(cfg)["images"] == train + evaluation


@pytest.mark.parametrize("options,message", [({"limit": 0}, "--limit 0:"), ({"batch_size": -1}, "--batch-size -1:"),
                                             ({"resamples": 10}, "--resamples 10:"), ({"seed": -1}, "--seed -1:")])
def test_precision_rejects_invalid_counts(demo_shards, tiny_tokenizer_path, options, message):
    cfg = PrecisionConfig(shards=(demo_shards["eval"],), tokenizer=tiny_tokenizer_path, **options)
    with pytest.raises(ValueError, match=message):
        precision_main(cfg)


def test_precision_names_missing_quantizer(tmp_path, demo_shards, tiny_tokenizer_path):
    cfg = PrecisionConfig(shards=(demo_shards["eval"],), tokenizer=tiny_tokenizer_path,
                          quantizer=("native", str(tmp_path / "no_run")))
    with pytest.raises(FileNotFoundError, match="no_run"):
        precision_main(cfg)


@pytest.mark.parametrize("device,message", [("cuda", "CUDA is not available"), ("gpu0", "invalid device"),
                                            ("meta", "invalid device")])
def test_precision_rejects_unusable_device(demo_shards, tiny_tokenizer_path, device, message):
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    cfg = PrecisionConfig(shards=(demo_shards["eval"],), tokenizer=tiny_tokenizer_path, device=device)
    with pytest.raises(ValueError, match=message):
        precision_main(cfg)


def test_precision_checks_json_path_first(tmp_path, demo_shards, tiny_tokenizer_path):
    cfg = PrecisionConfig(shards=(demo_shards["eval"],), tokenizer=tiny_tokenizer_path,
                          json=str(tmp_path / "missing" / "report.json"))
    with pytest.raises(FileNotFoundError, match="missing"):
        precision_main(cfg)
    cfg = PrecisionConfig(shards=(demo_shards["eval"],), tokenizer=tiny_tokenizer_path, json=str(tmp_path))
    with pytest.raises(IsADirectoryError, match="is a folder"):
        precision_main(cfg)


def test_precision_help_prints(capsys):
    from common.config import parse_config

    with pytest.raises(SystemExit) as info:
        parse_config(PrecisionConfig, ["--help"])
    assert info.value.code == 0
    assert "--resamples" in capsys.readouterr().out


def test_precision_hflip_doubles_images(demo_shards, tiny_tokenizer_path, single_thread, capsys):
    cfg = PrecisionConfig(shards=(demo_shards["eval"],), tokenizer=tiny_tokenizer_path, limit=5, hflip=True)
    report = precision_main(cfg)
    assert report["images"] == 10
    assert report["config"]["hflip"] is True
    assert "5 images and their flips" in capsys.readouterr().out


def test_precision_names_missing_tokenizer(tmp_path, demo_shards):
    cfg = PrecisionConfig(shards=(demo_shards["eval"],), tokenizer=str(tmp_path / "absent.safetensors"))
    with pytest.raises(FileNotFoundError, match="--tokenizer .*absent.safetensors"):
        precision_main(cfg)
