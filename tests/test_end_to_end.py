"""Every stage in sequence on real photographs, as the demo runs them, at a size that fits a test."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from adapt.run import AdaptConfig
from adapt.run import main as adapt
from cache import open_cache
from cache.build import BuildConfig
from cache.build import main as build_cache
from common.tokenizer import load_tokenizer
from evaluate.compare import CompareConfig
from evaluate.compare import main as compare
from evaluate.run import EvalConfig
from evaluate.run import main as evaluate
from substitute.quantizers import load_quantizer
from substitute.run import SubstituteConfig
from substitute.run import main as substitute


@pytest.mark.slow
def test_whole_transplant_on_photographs(demo_shards, tmp_path):
    torch.manual_seed(0)
    train, held_out = demo_shards["train"], demo_shards["eval"]

    # Stand-in tokenizer: the demo preset trained from scratch for a few steps.
    tokenizer_run = adapt(AdaptConfig(shards=train, out=tmp_path / "tokenizer", from_scratch=True, steps=6,
                                      batch_size=4, workers=0, shuffle_buffer=8, log_every=3))
    tokenizer_path = tokenizer_run["outputs"]["tokenizer"]
    tokenizer = load_tokenizer(tokenizer_path)

    # Latent caches of the training and held-out shards.
    caches = {}
    for name, shards in (("train", train), ("eval", held_out)):
        caches[name] = str(tmp_path / f"latents-{name}.zarr")
        build_cache(BuildConfig(shards=(shards,), tokenizer=tokenizer_path, out=caches[name], workers=0, batch_size=8))
    cache = open_cache(caches["train"], tokenizer_sha256=tokenizer.sha256)
    assert len(cache.keys) == 26

    # Substitution: MMD-VQ, multi-scale, on the cache only.
    report = substitute(SubstituteConfig(cache=caches["train"], eval_cache=caches["eval"], out=str(tmp_path / "sub"),
                                         quantizer="mmd", layout="multiscale", codebook_size=64, batch_size=4,
                                         steps=8, codebook_lr=5e-3, phi_lr=1e-3, workers=0))
    assert report["eval"]["num_latents"] == 13
    quantizer = load_quantizer(tmp_path / "sub")
    z_q, idx = quantizer.quantize(cache.latents(cache.keys[:2]))
    assert idx.shape == (2, 680)

    # Adaptation of the decoder to the new quantizer (L2 only: no pretrained LPIPS or DINO here).
    adapt(AdaptConfig(shards=train, out=tmp_path / "adapt", cache=caches["train"], tokenizer=tokenizer_path,
                      quantizer=str(tmp_path / "sub"), steps=2, batch_size=4, lpips=False, gan=False, workers=0,
                      shuffle_buffer=8, log_every=1))

    # Evaluation of the three stages and the comparison.
    rows = {"base": dict(quantizer="native"), "substituted": dict(quantizer=str(tmp_path / "sub")),
            "adapted": dict(quantizer=str(tmp_path / "sub"), decoder=str(tmp_path / "adapt"))}
    reports = {}
    for name, options in rows.items():
        reports[name] = evaluate(EvalConfig(shards=(held_out,), tokenizer=tokenizer_path, out=str(tmp_path / f"eval-{name}"),
                                            name=name, workers=0, batch_size=8, **options))
    for report in reports.values():
        saved = json.loads((Path(report_dir(tmp_path, report)) / "report.json").read_text())
        assert saved["n"] == 13
        assert 0 < saved["metrics"]["E"]
        assert 0 < saved["metrics"]["U"] <= 1
    # The adapted decoder changed the reconstructions; the substituted one did not touch the decoder.
    assert reports["adapted"]["metrics"]["PSNR"] != reports["substituted"]["metrics"]["PSNR"]
    assert reports["substituted"]["metrics"]["E"] == pytest.approx(report_e(tmp_path / "sub"), rel=1e-3)

    table = compare(CompareConfig(runs=tuple(str(tmp_path / f"eval-{n}") for n in rows), grid=str(tmp_path / "grid.png")))
    for name in rows:
        assert name in table
    with Image.open(tmp_path / "grid.png") as grid:
        assert grid.size[1] >= 4 * 64  # originals + three rows of reconstructions


def report_dir(tmp_path: Path, report: dict) -> Path:
    return tmp_path / f"eval-{report['label']}"


def report_e(substitution_run: Path) -> float:
    return json.loads((substitution_run / "report.json").read_text())["eval"]["E"]
