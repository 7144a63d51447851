"""Latent cache builds under faults and on other storage: a build killed and resumed, temporary files left by killed
writers, fsspec URLs, and builds over 1 to 3 processes and loader workers, which must all store the same bytes."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from cache import open_cache
from cache.build import BuildConfig, main as build_main
from cache.store import remove_orphans
from cache.verify import verify_store
from shards.index import ShardInfo, load_index, write_index

REPO = Path(__file__).resolve().parents[1]
ORPHAN_SUFFIX = ".0123456789abcdef0123456789abcdef.partial"


# helpers


def build_here(out: str, shards: str, tokenizer: str, **overrides) -> str:
    """Run cache/build.py in this process on one intra-op thread, so the bits match a run with OMP_NUM_THREADS=1."""
    options = dict(workers=0, batch_size=4)
    options.update(overrides)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        build_main(BuildConfig(shards=(shards,), tokenizer=tokenizer, out=out, **options))
    finally:
        torch.set_num_threads(threads)
    return out


def build_command(args: list[str], processes: int) -> tuple[list[str], dict[str, str]]:
    """Return the command line and environment of a build on `processes` CPU processes.

    Several CPU processes need `--multi_gpu` with ACCELERATE_USE_CPU=1, because `--cpu` starts a single process.
    """
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    if processes == 1:
        return [sys.executable, "cache/build.py", *args], env
    env["ACCELERATE_USE_CPU"] = "1"
    accelerate = str(Path(sys.executable).with_name("accelerate"))
    command = [accelerate, "launch", "--multi_gpu", "--num_processes", str(processes), "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "cache/build.py", *args]
    return command, env


def launch(args: list[str], processes: int = 1) -> str:
    """Run a build to completion and return its standard output."""
    command, env = build_command(args, processes)
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def store_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def data_files(root: Path) -> dict[str, bytes]:
    """Every object of the store except the root metadata, which records the --out path and the shard URLs."""
    return {name: data for name, data in store_files(root).items() if name != "zarr.json"}


def attributes(root: Path) -> dict:
    """The root attributes without those that name where the store and shards live or how the build ran."""
    attrs = json.loads((root / "zarr.json").read_text())["attributes"]
    attrs.pop("build_config")
    attrs.pop("shards")
    return attrs


def assert_same_store(got: Path, expected: Path) -> None:
    assert data_files(got) == data_files(expected)
    assert attributes(got) == attributes(expected)


@pytest.fixture(scope="module")
def eval_store(tmp_path_factory, demo_shards, tiny_tokenizer_path) -> Path:
    """A cache of the two demo eval shards (13 samples), built once in this process with one thread."""
    out = tmp_path_factory.mktemp("faults_eval") / "c.zarr"
    return Path(build_here(str(out), demo_shards["eval"], tiny_tokenizer_path))


@pytest.fixture(scope="module")
def many_shards(tmp_path_factory, demo_shards) -> str:
    """40 shards of 6 or 7 samples: ten copies of the demo train shards, with the keys of copy j prefixed "cj_".

    Enough shards for a build to take a few seconds, so a test can kill it between two shards.
    """
    folder = tmp_path_factory.mktemp("many_shards")
    infos = []
    for copy in range(10):
        for source in load_index(demo_shards["train"]):
            target = folder / f"c{copy}-{Path(source.url).name}"
            with tarfile.open(source.url) as reader, tarfile.open(target, "w") as writer:
                for member in reader.getmembers():
                    data = reader.extractfile(member).read()
                    member.name = f"c{copy}_{member.name}"
                    writer.addfile(member, fileobj=io.BytesIO(data))
            infos.append(ShardInfo(str(target), source.nsamples, target.stat().st_size))
    write_index(infos, str(folder / "index.json"), relative_to=str(folder))
    return str(folder / "index.json")


def read_marks(store: Path) -> np.ndarray | None:
    """The store's written marks, or None while the main process has not finished creating it."""
    try:
        return np.asarray(zarr.open_group(str(store), mode="r")["written"][:], dtype=bool)
    except (FileNotFoundError, KeyError, ValueError, json.JSONDecodeError):
        return None


# a build killed with SIGKILL and rerun


@pytest.mark.slow
def test_killed_build_resumes_to_identical_store(tmp_path, many_shards, tiny_tokenizer_path):
    args = ["--shards", many_shards, "--tokenizer", tiny_tokenizer_path, "--workers", "0", "--batch-size", "2"]
    killed = tmp_path / "killed.zarr"

    # start a build and kill it once some shards are marked written but not all of them
    command, env = build_command([*args, "--out", str(killed)], processes=1)
    with open(tmp_path / "killed.log", "wb") as log:
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    marks = None
    try:
        while time.monotonic() < deadline and process.poll() is None:
            marks = read_marks(killed)
            if marks is not None and 0 < marks.sum() < marks.size:
                break
            time.sleep(0.02)
        assert process.poll() is None, "the build finished before the test could kill it: give it more shards"
        assert marks is not None and 0 < marks.sum() < marks.size, "no shard was written within 60 s"
        process.send_signal(signal.SIGKILL)
    finally:
        process.kill()
        process.wait()
    assert process.returncode == -signal.SIGKILL
    interrupted = read_marks(killed)
    assert 0 < interrupted.sum() < interrupted.size
    assert zarr.open_group(str(killed), mode="r").attrs["complete"] is False

    # the same command encodes only the unmarked shards, and the result equals a build that was never interrupted
    sizes = np.array([s.nsamples for s in load_index(many_shards)])
    printed = launch([*args, "--out", str(killed)])
    assert f"this run encoded {sizes[~interrupted].sum()} images" in printed
    launch([*args, "--out", str(tmp_path / "whole.zarr")])
    assert sorted(store_files(killed)) == sorted(store_files(tmp_path / "whole.zarr"))
    assert_same_store(killed, tmp_path / "whole.zarr")
    assert read_marks(killed).all()
    assert open_cache(str(killed)).attrs["complete"] is True


# temporary files of killed writers


@pytest.mark.filterwarnings("ignore:Object at .* is not recognized as a component")
def test_resume_removes_orphans_in_store(tmp_path, eval_store, demo_shards, tiny_tokenizer_path):
    store = Path(shutil.copytree(eval_store, tmp_path / "c.zarr"))
    expected = store_files(store)

    # an interrupted build: shard 1 unmarked, a temporary copy of its latents object, and two look-alikes
    raw = zarr.open_group(str(store), mode="r+")
    raw["written"][1] = 0
    raw.attrs["complete"] = False
    orphan = store / "latents" / "c" / "1" / "0" / "0" / ("0" + ORPHAN_SUFFIX)
    orphan.write_bytes(b"half an object")
    root_orphan = store / ("zarr" + ORPHAN_SUFFIX)
    root_orphan.write_bytes(b"{")
    outside = tmp_path / ("elsewhere" + ORPHAN_SUFFIX)
    outside.write_bytes(b"not ours")
    look_alike = store / "notes.partial"
    look_alike.write_bytes(b"not a zarr temporary file")

    build_here(str(store), demo_shards["eval"], tiny_tokenizer_path)

    assert not orphan.exists()
    assert not root_orphan.exists()
    assert outside.read_bytes() == b"not ours"
    assert look_alike.exists()
    look_alike.unlink()
    assert store_files(store) == expected


def test_remove_orphans_on_missing_store(tmp_path):
    assert remove_orphans(str(tmp_path / "nothing.zarr")) == []


# storage through fsspec URLs


def test_build_and_read_at_file_url(tmp_path, eval_store, demo_shards, tiny_tokenizer_path, tiny_tokenizer):
    # the cache at a file:// URL (zarr's FsspecStore), the shards from file:// URLs in two loader workers
    index_url = "file://" + str(Path(demo_shards["eval"]).resolve())
    store_url = "file://" + str(tmp_path / "c.zarr")
    build_here(store_url, index_url, tiny_tokenizer_path, workers=2)

    cache = open_cache(store_url, tokenizer_sha256=tiny_tokenizer.sha256)
    local = open_cache(str(eval_store))
    assert all(s["url"].startswith("file://") for s in cache.attrs["shards"])
    assert cache.keys == local.keys
    assert torch.equal(cache.latents(cache.keys), local.latents(local.keys))
    keys, z = cache.read_shard(1)
    local_keys, local_z = local.read_shard(1)
    assert keys == local_keys
    assert torch.equal(z, local_z)
    assert_same_store(tmp_path / "c.zarr", eval_store)
    assert verify_store(store_url, shards=index_url).errors == []

    # FsspecStore writes in place, so a killed writer can leave a truncated object. Its shard is unmarked, and the
    # rerun at the URL must replace the object rather than decode it
    raw = zarr.open_group(store_url, mode="r+", storage_options={"auto_mkdir": True})
    raw["written"][0] = 0
    raw.attrs["complete"] = False
    truncated = tmp_path / "c.zarr" / "latents" / "c" / "0" / "0" / "0" / "0"
    truncated.write_bytes(truncated.read_bytes()[:1000])
    build_here(store_url, index_url, tiny_tokenizer_path)
    assert_same_store(tmp_path / "c.zarr", eval_store)


# any number of processes and loader workers


@pytest.mark.slow
def test_process_and_worker_counts_same_store(tmp_path, eval_store, demo_shards, tiny_tokenizer_path):
    # two shards: three processes leave one process without a shard, and two workers per process leave one idle
    args = ["--shards", demo_shards["eval"], "--tokenizer", tiny_tokenizer_path, "--batch-size", "4"]
    runs = [(3, 0), (2, 2), (1, 2)]  # (processes, loader workers per process)
    for processes, workers in runs:
        out = tmp_path / f"p{processes}-w{workers}.zarr"
        launch([*args, "--workers", str(workers), "--out", str(out)], processes)
        assert sorted(store_files(out)) == sorted(store_files(eval_store)), out.name
        assert_same_store(out, eval_store)
