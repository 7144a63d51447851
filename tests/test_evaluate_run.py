"""End-to-end tests of evaluate/run.py and evaluate/compare.py on the demo shards with a tiny random tokenizer."""

from __future__ import annotations

import json

import pytest
import torch

from common.preprocess import to_uint8
from evaluate.compare import CompareConfig, format_table, load_report
from evaluate.compare import main as compare_main
from evaluate.data import plan_samples
from evaluate.grid import load_png
from evaluate.run import GRID_FILE, EvalConfig, main
from shards.index import ShardInfo, load_index
from shards.read import iter_samples


def _evaluate(demo_shards, tokenizer_path, out, **overrides) -> dict:
    cfg = EvalConfig(shards=(demo_shards["eval"],), tokenizer=tokenizer_path, out=str(out), workers=0, **overrides)
    return main(cfg)


def test_plan_samples_cuts_last_shard():
    shards = [ShardInfo("a.tar", 8, 0), ShardInfo("b.tar", 8, 0), ShardInfo("c.tar", 5, 0)]
    plan = plan_samples(shards, 10)
    assert [(p.url, p.limit) for p in plan] == [("a.tar", None), ("b.tar", 2)]
    assert [p.limit for p in plan_samples(shards, None)] == [None, None, None]


def test_run_writes_report_grid_and_reasons(demo_shards, tiny_tokenizer_path, tiny_tokenizer, tmp_path):
    report = _evaluate(demo_shards, tiny_tokenizer_path, tmp_path / "run", batch_size=4, name="native-demo")

    # the report on disk is complete JSON, with no temporary file left beside it
    on_disk = json.loads((tmp_path / "run" / "report.json").read_text())
    assert on_disk["label"] == "native-demo"
    assert sorted(p.name for p in (tmp_path / "run").iterdir() if p.name.startswith(".")) == []
    expected_n = sum(s.nsamples for s in load_index(demo_shards["eval"]))
    assert on_disk["n"] == expected_n
    assert on_disk["config"]["batch_size"] == 4

    # no weights in the (empty) caches: LPIPS, r-FID and r-IS are left out, and the reason names the file
    assert on_disk["metrics"]["LPIPS"] is None
    assert on_disk["metrics"]["r-FID"] is None
    assert on_disk["metrics"]["r-IS"] is None
    assert "vgg16-397923af.pth" in on_disk["left_out"]["LPIPS"]
    assert "--inception-weights" in on_disk["left_out"]["r-FID"]
    assert on_disk["left_out"]["r-IS"] == on_disk["left_out"]["r-FID"]

    # E computed here from the same samples agrees with the report
    samples = list(iter_samples([s.url for s in load_index(demo_shards["eval"])], 64))
    images = torch.stack([s["image"] for s in samples])
    with torch.no_grad():
        z_e = tiny_tokenizer.encode(images)
        z_q, _ = tiny_tokenizer.quantizer.quantize(z_e)
    assert report["metrics"]["E"] == pytest.approx((z_q - z_e).square().mean().item(), rel=1e-5)

    # the grid: inputs above reconstructions, first 8 samples by key
    grid = load_png(tmp_path / "run" / GRID_FILE)
    assert grid.shape == (3, 2 * (64 + 2) + 2, 8 * (64 + 2) + 2)
    first_key = sorted(s["key"] for s in samples)[0]
    assert on_disk["grid"]["keys"][0] == first_key
    first_image = next(s["image"] for s in samples if s["key"] == first_key)
    assert torch.equal(grid[:, 2:66, 2:66], to_uint8(first_image))


def test_run_independent_of_batch_size(demo_shards, tiny_tokenizer_path, tmp_path):
    single = _evaluate(demo_shards, tiny_tokenizer_path, tmp_path / "b1", batch_size=1, max_samples=6)
    four = _evaluate(demo_shards, tiny_tokenizer_path, tmp_path / "b4", batch_size=4, max_samples=6)
    assert single["metrics"]["E"] == pytest.approx(four["metrics"]["E"], rel=1e-6)
    assert single["utilization"] == four["utilization"]
    # the convolutions round differently at another batch size, which flips a few uint8 pixels
    for name in ("PSNR", "SSIM"):
        assert single["metrics"][name] == pytest.approx(four["metrics"][name], rel=1e-4), name


def test_run_max_samples_and_refuses_existing_out(demo_shards, tiny_tokenizer_path, tmp_path):
    report = _evaluate(demo_shards, tiny_tokenizer_path, tmp_path / "run", max_samples=5, grid_images=4)
    assert report["n"] == 5
    with pytest.raises(FileExistsError, match="--overwrite"):
        _evaluate(demo_shards, tiny_tokenizer_path, tmp_path / "run", max_samples=5)
    # a training run's folder has a checkpoint; evaluating into it would replace its config.json and report.json
    training = tmp_path / "adapt"
    (training / "checkpoints").mkdir(parents=True)
    (training / "checkpoints" / "last.safetensors").write_bytes(b"")
    (training / "config.json").write_text('{"stage": "adapt"}')
    with pytest.raises(FileExistsError, match="contains a training run"):
        _evaluate(demo_shards, tiny_tokenizer_path, training, max_samples=5)
    assert json.loads((training / "config.json").read_text()) == {"stage": "adapt"}


def test_compare_rejects_corrupt_report(tmp_path):
    (tmp_path / "report.json").write_text('{"metrics":')
    with pytest.raises(ValueError, match="report.json is not valid JSON"):
        load_report(tmp_path)


@pytest.mark.slow
def test_run_with_saved_quantizer_and_adapted_decoder(demo_shards, tiny_tokenizer_path, tiny_tokenizer, tmp_path):
    from adapt.checkpoint import save_adapted_decoder
    from substitute.quantizers import build_quantizer, save_quantizer

    torch.manual_seed(1)
    quantizer = build_quantizer("vanilla", layout="multiscale", codebook_size=64, dim=32,
                                patch_nums=tiny_tokenizer.config.patch_nums)
    save_quantizer(quantizer, tmp_path / "substitute" / "quantizer")
    native = _evaluate(demo_shards, tiny_tokenizer_path, tmp_path / "native", max_samples=6)
    transplanted = _evaluate(demo_shards, tiny_tokenizer_path, tmp_path / "transplanted", max_samples=6,
                             quantizer=str(tmp_path / "substitute"))
    assert transplanted["quantizer"]["codebook_size"] == 64
    assert transplanted["metrics"]["E"] != native["metrics"]["E"]

    # a decoder whose output layer is zeroed decodes every latent to mid-grey
    modules = tiny_tokenizer.decoder_modules()
    last_conv = [m for m in modules["decoder"].modules() if isinstance(m, torch.nn.Conv2d)][-1]
    torch.nn.init.zeros_(last_conv.weight)
    torch.nn.init.zeros_(last_conv.bias)
    save_adapted_decoder(tmp_path / "adapt", modules, {"tokenizer_sha256": tiny_tokenizer.sha256,
                                                       "quantizer": str(tmp_path / "substitute")})
    adapted = _evaluate(demo_shards, tiny_tokenizer_path, tmp_path / "adapted", max_samples=6,
                        quantizer=str(tmp_path / "substitute"), decoder=str(tmp_path / "adapt"))
    assert adapted["metrics"]["E"] == pytest.approx(transplanted["metrics"]["E"])
    assert adapted["metrics"]["PSNR"] != transplanted["metrics"]["PSNR"]
    grid = load_png(tmp_path / "adapted" / GRID_FILE)
    assert torch.all((grid[:, 68:132, 2:66].int() - 128).abs() <= 1)


@pytest.mark.slow
def test_run_from_cache_skips_encoder(demo_shards, tiny_tokenizer_path, tmp_path, monkeypatch):
    from cache.build import BuildConfig
    from cache.build import main as build_cache
    from common.tokenizer import VQVAE

    build_cache(BuildConfig(shards=(demo_shards["eval"],), tokenizer=tiny_tokenizer_path,
                            out=str(tmp_path / "latents.zarr"), dtype="float32", workers=0))
    from_encoder = _evaluate(demo_shards, tiny_tokenizer_path, tmp_path / "encoder")

    def no_encoder(self, x):
        raise AssertionError("the encoder ran although --cache was given")

    monkeypatch.setattr(VQVAE, "encode", no_encoder)
    from_cache = _evaluate(demo_shards, tiny_tokenizer_path, tmp_path / "cached", cache=str(tmp_path / "latents.zarr"))
    assert from_cache["latents_from"] == str(tmp_path / "latents.zarr")
    for name in ("E", "U", "PSNR", "SSIM"):
        assert from_cache["metrics"][name] == pytest.approx(from_encoder["metrics"][name], rel=1e-5), name


@pytest.mark.slow
def test_compare_table_and_grid(demo_shards, tiny_tokenizer_path, tmp_path):
    _evaluate(demo_shards, tiny_tokenizer_path, tmp_path / "a", max_samples=8, name="run-a")
    _evaluate(demo_shards, tiny_tokenizer_path, tmp_path / "b", max_samples=8, name="run-b", batch_size=3)
    table = compare_main(CompareConfig((str(tmp_path / "a"), str(tmp_path / "b")), grid=str(tmp_path / "cmp.png"),
                                       out=str(tmp_path / "cmp.md")))
    rows = [line for line in table.splitlines() if line.startswith("| run-")]
    assert [row.split("|")[1].strip() for row in rows] == ["run-a", "run-b"]
    assert "— [1]" in rows[0]  # LPIPS left out, with a footnote
    assert "vgg16-397923af.pth" in table
    assert (tmp_path / "cmp.md").read_text().strip() == table
    grid = load_png(tmp_path / "cmp.png")
    assert grid.shape[1] == 3 * (64 + 2) + 2  # originals + one row per run


def test_compare_marks_missing_metric_without_reason():
    report = {"label": "old", "n": 3, "metrics": {"E": 0.25}}
    table = format_table([report])
    assert "| old | 3 | 0.2500 |" in table
    assert "not computed by this run" in table


def test_compare_rejects_folder_without_report(tmp_path):
    with pytest.raises(FileNotFoundError, match="report.json"):
        load_report(tmp_path)


def test_compare_rejects_folder_as_output(demo_shards, tiny_tokenizer_path, tmp_path):
    _evaluate(demo_shards, tiny_tokenizer_path, tmp_path / "run", max_samples=2, grid_images=2)
    with pytest.raises(IsADirectoryError, match="--grid .* is a folder"):
        compare_main(CompareConfig(runs=(str(tmp_path / "run"),), grid=str(tmp_path)))
