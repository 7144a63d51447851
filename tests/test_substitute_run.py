"""End-to-end tests of the substitution trainer on tiny latent caches written to disk."""

import json

import numpy as np
import pytest
import torch

import substitute.run as substitute_run
from cache import open_cache
from cache.store import create_store, mark_complete, plan_layout, write_shard
from common.config import parse_config
from substitute.metrics import quantization_stats
from substitute.quantizers import load_quantizer
from substitute.run import SubstituteConfig, main

LATENT_SHAPE = (8, 4, 4)


pytestmark = pytest.mark.usefixtures("single_thread")


def mixture_latents(n=96, seed=0):
    """Latents whose vectors come from a few tight clusters, so a trained codebook can fit them well.

    The cluster centres are the same for every seed; the seed only changes the samples.
    """
    centres = torch.randn(6, LATENT_SHAPE[0], generator=torch.Generator().manual_seed(1234)) * 2.0
    gen = torch.Generator().manual_seed(seed)
    picks = torch.randint(len(centres), (n, LATENT_SHAPE[1], LATENT_SHAPE[2]), generator=gen)
    vectors = centres[picks] + 0.1 * torch.randn(n, LATENT_SHAPE[1], LATENT_SHAPE[2], LATENT_SHAPE[0], generator=gen)
    return vectors.permute(0, 3, 1, 2).contiguous()  # (n, C, h, w)


def write_cache(path, latents, shard_size=24, tokenizer_sha256=None):
    """Write latents (n, C, h, w) as a complete float32 latent cache of shards of `shard_size` samples."""
    sizes = [len(chunk) for chunk in latents.split(shard_size)]
    layout = plan_layout(sizes, LATENT_SHAPE, dtype="float32", chunk_rows=8)
    shards = [(f"{path.name}-{i:04d}.tar", n) for i, n in enumerate(sizes)]
    group = create_store(str(path), shards, layout, {"tokenizer": {"sha256": tokenizer_sha256}})
    for shard, chunk in enumerate(latents.split(shard_size)):
        keys = [f"{path.stem}{shard}_{i:03d}" for i in range(len(chunk))]
        write_shard(group, shard, keys, {"latents": chunk.numpy().astype(np.float32)})
    mark_complete(group)
    return str(path)


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    folder = tmp_path_factory.mktemp("caches")
    return {
        "train": write_cache(folder / "train.zarr", mixture_latents(96, seed=0)),
        "eval": write_cache(folder / "eval.zarr", mixture_latents(40, seed=1)),
    }


def tiny_config(caches, out, **overrides):
    values = dict(
        cache=caches["train"], eval_cache=caches["eval"], out=str(out), quantizer="mmd", layout="multiscale",
        codebook_size=16, patch_nums=(1, 2, 4), batch_size=8, eval_batch_size=16, steps=40, lr=3e-2, lr_end=3e-3,
        log_every=10, checkpoint_every=10, workers=0,
    )
    values.update(overrides)
    return SubstituteConfig(**values)


@pytest.mark.parametrize("kind,layout", [("mmd", "multiscale"), ("wasserstein", "fixed"), ("vanilla", "multiscale")])
def test_substitution_lowers_error(caches, tmp_path, kind, layout):
    untrained = main(tiny_config(caches, tmp_path / "untrained", quantizer=kind, layout=layout, steps=0))
    trained = main(tiny_config(caches, tmp_path / "trained", quantizer=kind, layout=layout))
    assert trained["eval"]["E"] < 0.7 * untrained["eval"]["E"]
    assert trained["eval"]["num_latents"] == 40


def test_run_directory_contents(caches, tmp_path):
    report = main(tiny_config(caches, tmp_path / "run", steps=20))
    run = tmp_path / "run"
    saved = json.loads((run / "report.json").read_text())
    assert saved["eval"] == report["eval"]
    assert 0.0 < saved["eval"]["U"] <= 1.0
    assert set(saved["eval"]) >= {"E", "U", "perplexity", "U/scale1", "U/scale2", "U/scale4"}
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [10, 20]
    expected_keys = {"loss", "vq_loss", "codebook_loss", "E_batch", "U_batch", "perplexity_batch", "lr/codebook"}
    assert expected_keys <= set(lines[0])
    assert lines[1]["lr/codebook"] == pytest.approx(3e-3)
    quantizer = load_quantizer(run).eval()
    assert quantizer.spec.kind == "mmd"
    eval_cache = open_cache(caches["eval"])
    z = eval_cache.latents(eval_cache.keys)
    z_q, _ = quantizer.quantize(z)
    assert float((z_q - z).square().mean()) == pytest.approx(report["eval"]["E"], rel=1e-5)


@pytest.mark.parametrize("kind", ["mmd", "wasserstein", "online"])
def test_resume_matches_uninterrupted_run(caches, tmp_path, kind):
    # Constant learning rates, so the first part's schedule does not depend on its own step count. Wasserstein and
    # online keep a queue of recent features, and online draws replacement codes at random: both must resume.
    constant = dict(codebook_lr=1e-2, phi_lr=1e-2, checkpoint_every=5, quantizer=kind,
                    quantizer_options=("queue_size=200",) if kind != "mmd" else ())
    main(tiny_config(caches, tmp_path / "whole", steps=18, **constant))
    main(tiny_config(caches, tmp_path / "parts", steps=7, **constant))
    report = main(tiny_config(caches, tmp_path / "parts", steps=18, **constant))
    assert report["steps"] == 18
    whole = load_quantizer(tmp_path / "whole").state_dict()
    parts = load_quantizer(tmp_path / "parts").state_dict()
    for key in whole:
        assert torch.allclose(whole[key], parts[key], atol=1e-6), key


def test_ema_fixed_layout_trains_without_optimizer(caches, tmp_path):
    untrained = main(tiny_config(caches, tmp_path / "untrained", quantizer="ema", layout="fixed", steps=0))
    trained = main(tiny_config(caches, tmp_path / "trained", quantizer="ema", layout="fixed", steps=20))
    assert trained["eval"]["E"] < untrained["eval"]["E"]


def test_existing_run_without_checkpoint_is_rejected(caches, tmp_path):
    main(tiny_config(caches, tmp_path / "run", steps=0))
    with pytest.raises(FileExistsError, match="overwrite"):
        main(tiny_config(caches, tmp_path / "run", steps=0))


def test_cli_choices_come_from_registry():
    cfg = parse_config(SubstituteConfig, ["--cache", "c", "--out", "o", "--quantizer", "online", "--steps", "5",
                                          "--quantizer-options", "usage_decay=0.9", "dead_threshold=0.05"])
    assert cfg.quantizer == "online"
    assert substitute_run.parse_options(cfg.quantizer_options) == {"usage_decay": 0.9, "dead_threshold": 0.05}
    # an unknown name is neither a registered kind nor MODULE:FACTORY, so building it stops with both options named
    cfg = parse_config(SubstituteConfig, ["--cache", "c", "--out", "o", "--quantizer", "kmeans"])
    with pytest.raises(SystemExit, match="MODULE:FACTORY"):
        substitute_run.make_quantizer(cfg, (8, 4, 4))


def test_patch_nums_must_match_latent_side(caches, tmp_path):
    with pytest.raises(SystemExit, match="patch-nums"):
        main(tiny_config(caches, tmp_path / "run", patch_nums=(1, 2, 8)))


def test_resume_applies_new_lr_override(caches, tmp_path):
    main(tiny_config(caches, tmp_path / "run", steps=5, codebook_lr=1e-2, log_every=5, eval_cache=None))
    report = main(tiny_config(caches, tmp_path / "run", steps=10, codebook_lr=5e-3, log_every=5, eval_cache=None))
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [(line["step"], line["lr/codebook"]) for line in lines] == [(5, 1e-2), (10, 5e-3)]
    assert report["eval_cache"] == caches["train"]
    assert report["eval"]["num_latents"] == 96


def test_preloaded_cache_matches_store(caches):
    from substitute.data import PreloadedLatents

    cache = open_cache(caches["train"])
    assert cache.dtype == "float32"
    preloaded = PreloadedLatents(cache)
    assert preloaded.keys == cache.keys
    picked = [cache.keys[5], cache.keys[70], cache.keys[0]]
    assert torch.equal(preloaded.latents(picked), cache.latents(picked))

    halved = PreloadedLatents(cache, dtype=torch.float16)
    assert torch.equal(halved.latents(picked), cache.latents(picked).half().float())


def test_preload_run_matches_streamed_run(caches, tmp_path):
    streamed = main(tiny_config(caches, tmp_path / "streamed", steps=12))
    preloaded = main(tiny_config(caches, tmp_path / "preloaded", steps=12, preload=True))
    # Preloading keeps the stored float32 values, so both runs see the same batches and end identical.
    assert preloaded["eval"]["E"] == streamed["eval"]["E"]
    assert preloaded["eval"]["U"] == streamed["eval"]["U"]


@pytest.mark.slow
def test_two_process_run_matches_single_process_eval(caches, tmp_path):
    import os
    import subprocess
    import sys

    out = tmp_path / "run"
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", substitute_run.__file__,
        "--cache", caches["train"], "--eval-cache", caches["eval"], "--out", str(out), "--quantizer", "ema",
        "--codebook-size", "16", "--patch-nums", "1", "2", "4", "--batch-size", "8", "--steps", "6",
        "--log-every", "3", "--workers", "0",
    ]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["eval"]["num_latents"] == 40
    # 96 samples in global batches of 2 x 8: six steps are one full epoch.
    assert report["epochs"] == 1.0

    # E and U gathered from two processes equal one process's evaluation of the saved quantizer.
    eval_cache = open_cache(caches["eval"])
    single = quantization_stats(load_quantizer(out).eval(), [eval_cache.latents(eval_cache.keys)])
    assert report["eval"]["E"] == pytest.approx(single["E"], rel=1e-6)
    assert report["eval"]["U"] == single["U"]


def test_run_rejects_other_stages_checkpoint(caches, tmp_path):
    from common.rundir import RunDir

    other = RunDir(tmp_path / "adapt-run")
    other.save_config({"stage": "adapt"})
    other.save_checkpoint("last", {"w": torch.zeros(1)}, {"step": 3, "model": {}})
    with pytest.raises(ValueError, match="another stage"):
        main(tiny_config(caches, tmp_path / "adapt-run", steps=1))
    assert json.loads((tmp_path / "adapt-run" / "config.json").read_text()) == {"stage": "adapt"}


def test_saved_quantizer_names_cache_tokenizer(tmp_path):
    train = write_cache(tmp_path / "train.zarr", mixture_latents(24, seed=0), tokenizer_sha256="c" * 64)
    held_out = write_cache(tmp_path / "eval.zarr", mixture_latents(24, seed=1), tokenizer_sha256="c" * 64)
    other = write_cache(tmp_path / "other.zarr", mixture_latents(24, seed=1), tokenizer_sha256="d" * 64)
    caches = {"train": train, "eval": held_out}
    main(tiny_config(caches, tmp_path / "run", steps=1))
    saved = json.loads((tmp_path / "run" / "quantizer.json").read_text())
    assert saved["provenance"]["tokenizer_sha256"] == "c" * 64
    with pytest.raises(ValueError, match="d" * 64):
        main(tiny_config({"train": train, "eval": other}, tmp_path / "mixed", steps=1))


# Launched under torch.distributed.run: runs substitution and, before the final evaluation, writes this
# process's quantizer state to DIR/rank{r}.safetensors, so the test can compare the states of all processes.
RANK_STATE_SCRIPT = """
import sys

from safetensors.torch import save_file

import substitute.run as run
from common.config import parse_config

evaluate = run.evaluate


def save_then_evaluate(accelerator, quantizer, source, cfg):
    state = {key: value.detach().cpu().clone() for key, value in quantizer.state_dict().items()}
    save_file(state, f"{sys.argv[1]}/rank{accelerator.process_index}.safetensors")
    return evaluate(accelerator, quantizer, source, cfg)


run.evaluate = save_then_evaluate
run.main(parse_config(run.SubstituteConfig, sys.argv[2:]))
"""


def run_two_processes(tmp_path, cache, out, kind, batch_size, steps, options=()):
    """Train `kind` with two processes of `batch_size` latents each and return both processes' final states."""
    import os
    import subprocess
    import sys

    from safetensors.torch import load_file

    script = tmp_path / "rank_states.py"
    script.write_text(RANK_STATE_SCRIPT)
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(script), str(tmp_path),
        "--cache", cache, "--out", str(out), "--quantizer", kind, "--codebook-size", "16",
        "--patch-nums", "1", "2", "4", "--batch-size", str(batch_size), "--steps", str(steps), "--lr", "3e-2",
        "--lr-end", "3e-3", "--log-every", "3", "--workers", "0", "--shuffle-window", "1",
    ]
    if options:
        command += ["--quantizer-options", *options]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    return [load_file(tmp_path / f"rank{rank}.safetensors") for rank in range(2)]


def assert_same_states(first, second, tol=0.0):
    """Assert that two state dicts contain the same tensors, up to `tol` relative and absolute (0: bit-identical)."""
    assert set(first) == set(second)
    for key in first:
        worst = (first[key] - second[key]).abs().max()
        assert torch.allclose(first[key], second[key], rtol=tol, atol=tol), f"{key}: differs by up to {worst}"


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["vanilla", "ema"])
def test_two_processes_match_one_process(tmp_path, kind):
    # Shards of 8 latents, one per window: at step k, two processes of batch 8 and one process of batch 16 both
    # read the shuffled shards 2k and 2k+1. Both losses are batch means and EMA sums across processes.
    cache = write_cache(tmp_path / "train.zarr", mixture_latents(96, seed=0), shard_size=8)
    ranks = run_two_processes(tmp_path, cache, tmp_path / "two", kind, batch_size=8, steps=9)
    assert_same_states(ranks[0], ranks[1])

    one = tiny_config({"train": cache, "eval": None}, tmp_path / "one", quantizer=kind, batch_size=16, steps=9,
                      shuffle_window=1, log_every=3, checkpoint_every=1000)
    main(one)
    single = load_quantizer(tmp_path / "one").state_dict()
    # The EMA sums here reach about 10 per element, where float32 rounding alone differs by 2e-5, hence rtol.
    assert_same_states(ranks[0], single, tol=1e-5)
    # Training lowers E, so the match above compares trained states, not two copies of the initial one.
    untrained = main(tiny_config({"train": cache, "eval": None}, tmp_path / "untrained", quantizer=kind, steps=0))
    trained = json.loads((tmp_path / "one" / "report.json").read_text())
    assert trained["eval"]["E"] < untrained["eval"]["E"]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["online", "wasserstein"])
def test_two_process_codebooks_stay_identical(caches, tmp_path, kind):
    # Each process keeps its own queue of recent features, yet the codebook statistics and weights must agree:
    # online sums usage and broadcasts rank 0's replacement draws, Wasserstein's gradients are averaged by DDP.
    # A dead threshold of 0.3 marks more codes dead than the default 0.01, so more are drawn from the queues.
    options = ("queue_size=64", "dead_threshold=0.3") if kind == "online" else ("queue_size=64",)
    ranks = run_two_processes(tmp_path, caches["train"], tmp_path / "two", kind, batch_size=8, steps=6, options=options)
    assert_same_states(ranks[0], ranks[1])
    # The same seed as main() uses before building, so `initial` is the state training started from.
    torch.manual_seed(0)
    initial = substitute_run.make_quantizer(
        tiny_config(caches, tmp_path / "unused", quantizer=kind, quantizer_options=("queue_size=64",)), LATENT_SHAPE
    )
    moved = [key for key, value in initial.state_dict().items() if not torch.equal(value, ranks[0][key])]
    assert any("embedding" in key for key in moved), moved
