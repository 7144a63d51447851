"""Latent cache: store layout, reader checks, and builds from real shards with a small random tokenizer."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
import zarr
from PIL import Image

from cache import IncompleteCacheError, TokenizerMismatchError, open_cache
from cache.build import BuildConfig, main as build_main
from cache.store import create_store, mark_complete, plan_layout, provenance_differences, write_shard
from cache.verify import format_report, main as verify_main, verify_store
from common.config import InputError
from shards.index import ShardInfo, load_index, write_index
from shards.read import BadSampleError, iter_samples

REPO = Path(__file__).resolve().parents[1]
LATENT_SHAPE = (4, 2, 3)


# store layer on synthetic latents


def make_store(path: Path, sizes: list[int], *, dtype: str = "float32", hflip: bool = False, sha: str = "aa" * 32):
    shards = [(f"shard-{i}.tar", n) for i, n in enumerate(sizes)]
    layout = plan_layout(sizes, LATENT_SHAPE, dtype=dtype, chunk_rows=4, hflip=hflip)
    group = create_store(str(path), shards, layout, {"tokenizer": {"sha256": sha}})
    return group, layout


def synthetic_shard(shard: int, n: int, hflip: bool = False) -> tuple[list[str], dict[str, np.ndarray]]:
    rng = np.random.default_rng(shard)
    z = rng.normal(size=(n, *LATENT_SHAPE)).astype(np.float32)
    views = {"latents": z, "latents_hflip": -z} if hflip else {"latents": z}
    return [f"s{shard}-{j}" for j in range(n)], views


def write_all(group, sizes: list[int], hflip: bool = False) -> None:
    for shard, n in enumerate(sizes):
        keys, views = synthetic_shard(shard, n, hflip)
        write_shard(group, shard, keys, views)
    mark_complete(group)


def test_store_reads_by_key(tmp_path):
    sizes = [5, 3, 0, 6]
    group, layout = make_store(tmp_path / "c.zarr", sizes, hflip=True)
    write_all(group, sizes, hflip=True)
    cache = open_cache(str(tmp_path / "c.zarr"))

    assert layout.slot == 8
    assert cache.keys == [k for i, n in enumerate(sizes) for k in synthetic_shard(i, n)[0]]
    _, views = synthetic_shard(3, 6, hflip=True)
    got = cache.latents(["s3-4", "s0-1", "s3-4"])
    assert got.dtype == torch.float32
    assert got.shape == (3, *LATENT_SHAPE)
    assert torch.equal(got[0], torch.from_numpy(views["latents"][4]))
    assert torch.equal(got[2], got[0])
    assert torch.equal(cache.latents(["s3-4"], view="latents_hflip")[0], torch.from_numpy(views["latents_hflip"][4]))
    with pytest.raises(KeyError, match="s9-9"):
        cache.latents(["s9-9"])
    # entry points turn InputError into a one-line message, so the message must be the plain text
    with pytest.raises(InputError) as info:
        cache.latents(["s9-9"])
    assert str(info.value).startswith("sample key 's9-9' is not in the latent cache")


def test_store_read_shard_sequential(tmp_path):
    sizes = [5, 3]
    group, _ = make_store(tmp_path / "c.zarr", sizes)
    write_all(group, sizes)
    cache = open_cache(str(tmp_path / "c.zarr"))
    keys, latents = cache.read_shard(1)
    expected_keys, views = synthetic_shard(1, 3)

    assert keys == expected_keys
    assert torch.equal(latents, torch.from_numpy(views["latents"]))
    assert [s.count for s in cache.shards] == sizes
    assert [s.nsamples for s in cache.shards] == sizes


def test_store_float16_rounds_once(tmp_path):
    group, _ = make_store(tmp_path / "c.zarr", [4], dtype="float16")
    write_all(group, [4])
    cache = open_cache(str(tmp_path / "c.zarr"))
    _, views = synthetic_shard(0, 4)

    assert zarr.open_group(str(tmp_path / "c.zarr"), mode="r")["latents"].dtype == np.float16
    rounded = views["latents"][2].astype(np.float16).astype(np.float32)
    assert torch.equal(cache.latents(["s0-2"])[0], torch.from_numpy(rounded))


def test_store_one_object_per_shard(tmp_path):
    sizes = [5, 3, 6]
    group, _ = make_store(tmp_path / "c.zarr", sizes)
    write_all(group, sizes)
    root = tmp_path / "c.zarr"

    latent_files = (root / "latents" / "c").rglob("*")
    latent_objects = sorted(str(p.relative_to(root / "latents")) for p in latent_files if p.is_file())
    key_objects = sorted(p.name for p in (root / "keys" / "c").iterdir())
    assert latent_objects == ["c/0/0/0/0", "c/1/0/0/0", "c/2/0/0/0"]
    assert key_objects == ["0", "1", "2"]


def test_store_padding_rows_are_nan(tmp_path):
    group, layout = make_store(tmp_path / "c.zarr", [5, 3])
    write_all(group, [5, 3])
    raw = zarr.open_group(str(tmp_path / "c.zarr"), mode="r")

    assert np.isnan(raw["latents"][5:8]).all()
    assert raw["keys"][5:8].tolist() == ["", "", ""]
    assert raw["shard"][:].tolist() == [0] * 5 + [-1] * 3 + [1] * 3 + [-1] * 5


def test_write_shard_rejects_overflow(tmp_path):
    group, _ = make_store(tmp_path / "c.zarr", [4])
    keys, views = synthetic_shard(0, 5)
    with pytest.raises(ValueError, match="under-counts"):
        write_shard(group, 0, keys, views)


def test_write_shard_rejects_float16_overflow(tmp_path):
    group, _ = make_store(tmp_path / "c.zarr", [2], dtype="float16")
    keys, views = synthetic_shard(0, 2)
    views["latents"][1] = 1e6
    with pytest.raises(ValueError, match="--dtype float32"):
        write_shard(group, 0, keys, views)
    assert zarr.open_group(str(tmp_path / "c.zarr"), mode="r")["written"][0] == 0


def test_open_cache_rejects_incomplete(tmp_path):
    sizes = [5, 3, 6]
    group, _ = make_store(tmp_path / "c.zarr", sizes)
    for shard in (0, 2):
        write_shard(group, shard, *synthetic_shard(shard, sizes[shard]))
    with pytest.raises(IncompleteCacheError, match=r"1 of 3 shards are not written \(shards 1\)") as info:
        open_cache(str(tmp_path / "c.zarr"))
    assert "allow_incomplete=True" in str(info.value)
    assert isinstance(info.value, InputError)  # entry points print it as one line
    assert "cache/build.py" in str(info.value)

    partial = open_cache(str(tmp_path / "c.zarr"), allow_incomplete=True)
    assert partial.keys == synthetic_shard(0, 5)[0] + synthetic_shard(2, 6)[0]
    with pytest.raises(IncompleteCacheError, match="shard 1"):
        partial.read_shard(1)


def test_open_cache_rejects_unfinished_build(tmp_path):
    sizes = [2, 2]
    group, _ = make_store(tmp_path / "c.zarr", sizes)
    for shard in (0, 1):
        write_shard(group, shard, *synthetic_shard(shard, 2))
    with pytest.raises(IncompleteCacheError, match="complete mark is missing"):
        open_cache(str(tmp_path / "c.zarr"))


def test_open_cache_rejects_other_tokenizer(tmp_path):
    group, _ = make_store(tmp_path / "c.zarr", [2], sha="aa" * 32)
    write_all(group, [2])
    with pytest.raises(TokenizerMismatchError) as info:
        open_cache(str(tmp_path / "c.zarr"), tokenizer_sha256="bb" * 32)
    assert "aa" * 32 in str(info.value)
    assert "bb" * 32 in str(info.value)
    assert len(open_cache(str(tmp_path / "c.zarr"), tokenizer_sha256="aa" * 32)) == 2


def test_provenance_differences_name_inner_field():
    config = {f"option_{i}": "a long value" for i in range(20)}  # far longer than a message line
    stored = {"tokenizer": {"sha256": "aa", "config": config}, "image_size": 256}
    expected = {"tokenizer": {"sha256": "bb", "config": config}, "image_size": 256}
    assert provenance_differences(stored, expected) == ['tokenizer.sha256: "aa" -> "bb"']


def test_open_cache_rejects_non_cache(tmp_path):
    zarr.open_group(str(tmp_path / "other.zarr"), mode="w")
    with pytest.raises(ValueError, match="not a vq-transplant latent cache"):
        open_cache(str(tmp_path / "other.zarr"))
    with pytest.raises(FileNotFoundError, match="no latent cache"):
        open_cache(str(tmp_path / "missing.zarr"))


def test_reader_keeps_first_of_repeated_key(tmp_path):
    group, _ = make_store(tmp_path / "c.zarr", [2, 2])
    z = np.arange(2 * 2 * np.prod(LATENT_SHAPE), dtype=np.float32).reshape(2, 2, *LATENT_SHAPE)
    write_shard(group, 0, ["a", "b"], {"latents": z[0]})
    write_shard(group, 1, ["b", "c"], {"latents": z[1]})
    mark_complete(group, {"duplicate_key": 1})
    cache = open_cache(str(tmp_path / "c.zarr"))

    assert cache.keys == ["a", "b", "c"]
    assert torch.equal(cache.latents(["b"])[0], torch.from_numpy(z[0, 1]))
    assert cache.read_shard(1)[0] == ["c"]
    assert cache.attrs["skips"] == {"duplicate_key": 1}


def test_cache_pickles(tmp_path):
    import pickle

    group, _ = make_store(tmp_path / "c.zarr", [3])
    write_all(group, [3])
    cache = pickle.loads(pickle.dumps(open_cache(str(tmp_path / "c.zarr"))))
    assert torch.equal(cache.latents(["s0-1"])[0], torch.from_numpy(synthetic_shard(0, 3)[1]["latents"][1]))


# builds from real shards


def build(out: Path, shards: str, tokenizer: str, **overrides) -> Path:
    """Run cache/build.py in this process on one intra-op thread.

    CPU convolutions can round differently with another thread count, and a resumed build must match the
    first one bit for bit. One thread also keeps tests from oversubscribing cores shared with other tests.
    """
    options = dict(workers=0, batch_size=4)
    options.update(overrides)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        build_main(BuildConfig(shards=(shards,), tokenizer=tokenizer, out=str(out), **options))
    finally:
        torch.set_num_threads(threads)
    return out


def reference_latents(shards: str, tokenizer, image_size: int = 64, flip: bool = False) -> dict[str, torch.Tensor]:
    urls = [s.url for s in load_index(shards)]
    samples = list(iter_samples(urls, image_size))
    x = torch.stack([s["image"] for s in samples])  # (N, 3, R, R)
    with torch.no_grad():
        z = tokenizer.encode(x.flip(-1) if flip else x)
    return {s["key"]: z[i] for i, s in enumerate(samples)}


def store_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_build_matches_tokenizer_encode(tmp_path, demo_shards, tiny_tokenizer_path, tiny_tokenizer):
    out = build(tmp_path / "c.zarr", demo_shards["eval"], tiny_tokenizer_path, dtype="float32", hflip=True)
    cache = open_cache(str(out), tokenizer_sha256=tiny_tokenizer.sha256)
    expected = reference_latents(demo_shards["eval"], tiny_tokenizer)
    flipped = reference_latents(demo_shards["eval"], tiny_tokenizer, flip=True)

    assert cache.keys == list(expected)
    assert cache.latent_shape == tiny_tokenizer.latent_shape
    torch.testing.assert_close(cache.latents(cache.keys), torch.stack(list(expected.values())), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        cache.latents(cache.keys, view="latents_hflip"), torch.stack(list(flipped.values())), rtol=1e-5, atol=1e-5
    )


def test_build_bf16_channels_last_close(tmp_path, demo_shards, tiny_tokenizer_path, tiny_tokenizer):
    out = build(tmp_path / "c.zarr", demo_shards["eval"], tiny_tokenizer_path, dtype="float32", bf16=True,
                channels_last=True)
    cache = open_cache(str(out))
    expected = torch.stack(list(reference_latents(demo_shards["eval"], tiny_tokenizer).values()))
    got = cache.latents(cache.keys)

    assert cache.attrs["provenance"]["encode_precision"] == "bf16-autocast"
    assert not torch.equal(got, expected)
    assert (got - expected).abs().max() < 0.05 * expected.abs().max()


def test_build_tf32_on_cpu_is_float32(tmp_path, demo_shards, tiny_tokenizer_path, tiny_tokenizer):
    out = build(tmp_path / "c.zarr", demo_shards["eval"], tiny_tokenizer_path, tf32=True)
    cache = open_cache(str(out))
    expected = torch.stack(list(reference_latents(demo_shards["eval"], tiny_tokenizer).values()))

    # TensorFloat-32 exists only on CUDA devices, so on the CPU the build records and stores IEEE float32
    assert cache.attrs["provenance"]["encode_precision"] == "ieee-float32"
    torch.testing.assert_close(cache.latents(cache.keys), expected, rtol=1e-5, atol=1e-5)
    build(out, demo_shards["eval"], tiny_tokenizer_path)  # the same latents, so a run without --tf32 resumes


def test_build_rejects_bf16_with_tf32(tmp_path, demo_shards, tiny_tokenizer_path):
    cfg = BuildConfig(shards=(demo_shards["eval"],), tokenizer=tiny_tokenizer_path, out=str(tmp_path / "c.zarr"),
                      bf16=True, tf32=True)
    with pytest.raises(ValueError, match="--bf16 and --tf32"):
        build_main(cfg)
    assert not (tmp_path / "c.zarr").exists()


@pytest.fixture(scope="module")
def eval_store(tmp_path_factory, demo_shards, tiny_tokenizer_path) -> Path:
    """A cache of the demo eval shards with default options, built once. Tests that change it work on a copy."""
    return build(tmp_path_factory.mktemp("eval_store") / "c.zarr", demo_shards["eval"], tiny_tokenizer_path)


def copy_store(store: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(store, tmp_path / "copy.zarr"))


def test_build_records_provenance(eval_store, demo_shards, tiny_tokenizer):
    attrs = open_cache(str(eval_store)).attrs
    provenance = attrs["provenance"]

    assert attrs["complete"] is True
    assert provenance["tokenizer"]["sha256"] == tiny_tokenizer.sha256
    assert provenance["tokenizer"]["config"]["vocab_size"] == 256
    assert provenance["preprocessing"]["center_crop"] == 64
    assert provenance["dtype"] == "float32"
    assert provenance["encode_precision"] == "ieee-float32"
    assert [s["nsamples"] for s in attrs["shards"]] == [s.nsamples for s in load_index(demo_shards["eval"])]
    assert attrs["skips"] == {}
    assert "encoder output after quant_conv" in attrs["channel_order"]


def test_build_resume_redoes_one_shard(tmp_path, eval_store, demo_shards, tiny_tokenizer_path):
    out = copy_store(eval_store, tmp_path)
    before = store_files(out)
    untouched = out / "latents" / "c" / "0" / "0" / "0" / "0"
    untouched_inode = untouched.stat().st_ino

    # an interrupted build: shard 1 is unmarked with damaged latents, and the complete mark was never set
    raw = zarr.open_group(str(out), mode="r+")
    raw["written"][1] = 0
    raw["latents"][raw.attrs["layout"]["slot"]] = 0.0
    raw.attrs["complete"] = False
    with pytest.raises(IncompleteCacheError, match=r"\(shards 1\)"):
        open_cache(str(out))

    build(out, demo_shards["eval"], tiny_tokenizer_path)
    assert store_files(out) == before
    assert untouched.stat().st_ino == untouched_inode  # shard 0 was not rewritten


def test_build_rejects_other_inputs(tmp_path, eval_store, demo_shards, tiny_tokenizer_path):
    out = copy_store(eval_store, tmp_path)
    with pytest.raises(ValueError, match="dtype") as info:
        build(out, demo_shards["eval"], tiny_tokenizer_path, dtype="float16")
    assert "new --out" in str(info.value)
    assert "It is complete and was built with --dtype float32." in str(info.value)
    with pytest.raises(ValueError, match="shard_index_sha256") as info:
        build(out, demo_shards["train"], tiny_tokenizer_path)
    assert "It is complete and was built with another tokenizer or shard set." in str(info.value)

    # an unfinished build gets the options to resume with
    zarr.open_group(str(out), mode="r+").attrs["complete"] = False
    with pytest.raises(ValueError, match="chunk_rows") as info:
        build(out, demo_shards["eval"], tiny_tokenizer_path, chunk_rows=32, hflip=True)
    assert "To resume it, rerun with --chunk-rows 64, --no-hflip." in str(info.value)
    with pytest.raises(ValueError, match="shard_index_sha256") as info:
        build(out, demo_shards["train"], tiny_tokenizer_path)
    assert "To resume it, rerun with the tokenizer and shards it was built from." in str(info.value)


def test_build_rejects_resuming_unpinned_precision(tmp_path, eval_store, demo_shards, tiny_tokenizer_path):
    out = copy_store(eval_store, tmp_path)
    group = zarr.open_group(str(out), mode="r+")
    # stores written before the encoder precision was pinned recorded "float32", TensorFloat-32 or not
    group.attrs["provenance"] = {**group.attrs["provenance"], "encode_precision": "float32"}
    with pytest.raises(ValueError, match="older version .* cannot be resumed"):
        build(out, demo_shards["eval"], tiny_tokenizer_path)


def test_build_names_missing_tokenizer(tmp_path, demo_shards):
    with pytest.raises(FileNotFoundError, match="--tokenizer .*nowhere.pth"):
        build(tmp_path / "c.zarr", demo_shards["eval"], str(tmp_path / "nowhere.pth"))


def test_build_names_tokenizer_folder(tmp_path, demo_shards):
    with pytest.raises(IsADirectoryError, match=f"--tokenizer {tmp_path} is a folder"):
        build(tmp_path / "c.zarr", demo_shards["eval"], str(tmp_path))


def jpeg_bytes(seed: int, size: int = 72) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG")
    return buffer.getvalue()


@pytest.fixture
def bad_shards(tmp_path) -> str:
    """Two shards: a corrupt JPEG and a repeated key in the first, a key repeated across shards in the second."""
    folder = tmp_path / "bad"
    folder.mkdir()
    with wds.TarWriter(str(folder / "bad-0.tar")) as tar:
        tar.write({"__key__": "good0", "jpg": jpeg_bytes(0)})
        tar.write({"__key__": "broken", "jpg": jpeg_bytes(1)[:200]})
        tar.write({"__key__": "good1", "jpg": jpeg_bytes(2)})
        tar.write({"__key__": "good0", "jpg": jpeg_bytes(3)})
    with wds.TarWriter(str(folder / "bad-1.tar")) as tar:
        tar.write({"__key__": "good2", "jpg": jpeg_bytes(4)})
        tar.write({"__key__": "good1", "jpg": jpeg_bytes(5)})
    return str(folder / "bad-{0..1}.tar")


def test_build_skips_and_counts_bad_samples(tmp_path, bad_shards, tiny_tokenizer_path):
    out = build(tmp_path / "c.zarr", bad_shards, tiny_tokenizer_path)
    cache = open_cache(str(out))
    raw = zarr.open_group(str(out), mode="r")
    first_shard = json.loads(str(raw["skips"][0]))

    assert cache.keys == ["good0", "good1", "good2"]
    assert cache.attrs["skips"] == {"duplicate_key": 2, "undecodable_image": 1}
    assert first_shard["counts"] == {"duplicate_key": 1, "undecodable_image": 1}
    assert {e["key"] for e in first_shard["examples"]} == {"broken", "good0"}
    assert [s.count for s in cache.shards] == [2, 2]


def index_with_count(tmp_path: Path, shards: str, change: int) -> str:
    """Write an index of the first shard of `shards` whose sample count is off by `change`."""
    info = load_index(shards)[0]
    path = tmp_path / "miscounted.json"
    write_index([ShardInfo(info.url, info.nsamples + change, info.filesize)], str(path))
    return str(path)


def test_build_counts_samples_missing_from_tar(tmp_path, demo_shards, tiny_tokenizer_path):
    # an index that lists 3 more samples than the tar holds, as for a tar cut at a member boundary
    shards = index_with_count(tmp_path, demo_shards["eval"], +3)
    cache = open_cache(str(build(tmp_path / "c.zarr", shards, tiny_tokenizer_path)))
    assert cache.attrs["skips"] == {"missing_samples": 3}
    assert len(cache.keys) == load_index(demo_shards["eval"])[0].nsamples


def test_build_rejects_index_undercount(tmp_path, demo_shards, tiny_tokenizer_path):
    shards = index_with_count(tmp_path, demo_shards["eval"], -2)
    url = load_index(demo_shards["eval"])[0].url
    with pytest.raises(ValueError, match=f"{url}.* contains .* the shard index lists .*shards.index"):
        build(tmp_path / "c.zarr", shards, tiny_tokenizer_path)


def test_resume_warns_of_other_batch_size(tmp_path, demo_shards, tiny_tokenizer_path, caplog):
    out = build(tmp_path / "c.zarr", demo_shards["eval"], tiny_tokenizer_path, batch_size=4)
    with caplog.at_level("WARNING", logger="cache.build"):
        build(out, demo_shards["eval"], tiny_tokenizer_path, batch_size=5)
    assert "--batch-size 5 differs from the 4 that wrote this store's first shards" in caplog.text


def test_build_strict_stops_at_bad_sample(tmp_path, bad_shards, tiny_tokenizer_path):
    with pytest.raises(BadSampleError, match="broken"):
        build(tmp_path / "c.zarr", bad_shards, tiny_tokenizer_path, strict=True)
    with pytest.raises(IncompleteCacheError):
        open_cache(str(tmp_path / "c.zarr"))


def test_build_leaves_unreadable_shard_unwritten(tmp_path, demo_shards, tiny_tokenizer_path):
    shards = load_index(demo_shards["eval"])
    folder = tmp_path / "shards"
    folder.mkdir()
    for info in shards:
        shutil.copy(info.url, folder)
    write_index([ShardInfo(str(folder / Path(s.url).name), s.nsamples, s.filesize) for s in shards],
                str(folder / "index.json"))
    damaged = folder / Path(shards[1].url).name
    damaged.write_bytes(Path(shards[1].url).read_bytes()[:20000])

    with pytest.raises(SystemExit, match="1 shards were not written"):
        build(tmp_path / "c.zarr", str(folder / "index.json"), tiny_tokenizer_path)
    with pytest.raises(IncompleteCacheError, match=r"\(shards 1\)"):
        open_cache(str(tmp_path / "c.zarr"))

    shutil.copy(shards[1].url, damaged)
    build(tmp_path / "c.zarr", str(folder / "index.json"), tiny_tokenizer_path)
    assert [s.count for s in open_cache(str(tmp_path / "c.zarr")).shards] == [s.nsamples for s in shards]


# verify


def test_verify_accepts_built_store(eval_store, demo_shards, tiny_tokenizer, capsys):
    report = verify_store(str(eval_store), shards=demo_shards["eval"], tokenizer_sha256=tiny_tokenizer.sha256)
    storage = report.summary["storage"]["latents"]

    assert report.errors == []
    assert report.summary["stored_latents"] == 13
    assert storage["raw_bytes_per_latent"] == 32 * 16 * 16 * 4  # float32
    assert 0 < storage["bytes_per_latent"] < 2 * storage["raw_bytes_per_latent"]
    assert len(report.summary["channel_stats"]["latents"]["std"]) == 32
    assert report.summary["encode_precision"] == "ieee-float32"
    assert verify_main([str(eval_store)]) == 0
    output = capsys.readouterr().out
    assert "OK" in output
    assert "encoded in ieee-float32" in output


def test_verify_channel_stats_match_latents(eval_store):
    cache = open_cache(str(eval_store))
    z = cache.latents(cache.keys).double()  # (N, C, h, w)
    stats = verify_store(str(eval_store)).summary["channel_stats"]["latents"]

    np.testing.assert_allclose(stats["mean"], z.mean(dim=(0, 2, 3)).numpy(), atol=1e-5)
    np.testing.assert_allclose(stats["std"], z.std(dim=(0, 2, 3), correction=0).numpy(), atol=1e-5)


def test_verify_finds_damage(tmp_path, eval_store):
    out = copy_store(eval_store, tmp_path)
    raw = zarr.open_group(str(out), mode="r+")
    slot = raw.attrs["layout"]["slot"]
    raw["latents"][slot + 1] = np.nan
    raw["written"][0] = 0
    raw.attrs["complete"] = False
    errors = "\n".join(verify_store(str(out)).errors)

    assert "shards are not written: [0]" in errors
    assert "complete mark" in errors
    assert "shard 1, latents: 1 stored rows contain NaN" in errors
    assert verify_main([str(out)]) == 1


def test_verify_warns_of_unaccounted_samples(tmp_path):
    group, _ = make_store(tmp_path / "c.zarr", [4])
    keys, views = synthetic_shard(0, 3)
    write_shard(group, 0, keys, views)  # one sample neither stored nor counted as skipped
    mark_complete(group)
    warnings = "\n".join(verify_store(str(tmp_path / "c.zarr")).warnings)
    assert "shard 0: 3 rows stored and 0 skipped, but the shard index lists 4 samples" in warnings
    assert "shard-0.tar" in warnings


def test_verify_warns_of_empty_store(tmp_path):
    group, _ = make_store(tmp_path / "c.zarr", [2])
    _, views = synthetic_shard(0, 0)
    write_shard(group, 0, [], views, {"counts": {"undecodable_image": 2}, "examples": []})
    mark_complete(group)
    report = verify_store(str(tmp_path / "c.zarr"))
    assert "no latents are stored" in "\n".join(report.warnings)
    assert report.summary["channel_stats"] == {}
    assert report.summary["storage"]["latents"]["bytes_per_latent"] is None
    assert "channel mean" not in format_report(report)


def test_verify_reports_unreadable_objects(tmp_path, eval_store):
    out = copy_store(eval_store, tmp_path)
    chunk = sorted((out / "latents" / "c").rglob("*"))[-1]
    chunk.write_bytes(chunk.read_bytes()[:100])
    report = verify_store(str(out))
    assert "its stored objects cannot be read" in "\n".join(report.errors)
    assert verify_main([str(out)]) == 1


def test_verify_checks_inputs(eval_store, demo_shards):
    errors = "\n".join(verify_store(str(eval_store), shards=demo_shards["train"], tokenizer_sha256="cc" * 32).errors)
    assert "index hash of this shard set differs" in errors
    assert "expected " + "cc" * 32 in errors
    assert verify_main([str(eval_store), "--shards", demo_shards["eval"]]) == 0
    assert verify_main([str(eval_store), "--shards", demo_shards["eval"], demo_shards["train"]]) == 1


def test_build_command_rejects_memory_out(demo_shards, tiny_tokenizer_path):
    command = [sys.executable, "cache/build.py", "--shards", demo_shards["eval"], "--tokenizer", tiny_tokenizer_path,
               "--out", "memory://c.zarr"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "--out memory://c.zarr: an in-memory store is lost" in result.stderr


# two processes


def launch(args: list[str], processes: int) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    if processes == 1:
        command = [sys.executable, "cache/build.py", *args]
    else:
        env["ACCELERATE_USE_CPU"] = "1"
        accelerate = str(Path(sys.executable).with_name("accelerate"))
        command = [accelerate, "launch", "--multi_gpu", "--num_processes", str(processes), "--num_machines", "1",
                   "--mixed_precision", "no", "--dynamo_backend", "no", "cache/build.py", *args]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.slow
def test_two_process_build_equals_one(tmp_path, demo_shards, tiny_tokenizer_path):
    args = ["--shards", demo_shards["train"], "--tokenizer", tiny_tokenizer_path, "--workers", "0", "--batch-size", "4"]
    launch([*args, "--out", str(tmp_path / "one.zarr")], processes=1)
    launch([*args, "--out", str(tmp_path / "two.zarr")], processes=2)
    single, double = store_files(tmp_path / "one.zarr"), store_files(tmp_path / "two.zarr")

    # every data object is byte-identical, and the root metadata differs only in the recorded --out
    assert sorted(single) == sorted(double)
    single_data = {k: v for k, v in single.items() if k != "zarr.json"}
    assert single_data == {k: v for k, v in double.items() if k != "zarr.json"}
    attrs_single = json.loads(single["zarr.json"])["attributes"]
    attrs_double = json.loads(double["zarr.json"])["attributes"]
    attrs_single["build_config"].pop("out")
    attrs_double["build_config"].pop("out")
    assert attrs_single == attrs_double

    # resume on two processes with one shard missing: the process without a shard waits, and the result is the same
    raw = zarr.open_group(str(tmp_path / "two.zarr"), mode="r+")
    raw["written"][1] = 0
    raw.attrs["complete"] = False
    launch([*args, "--out", str(tmp_path / "two.zarr")], processes=2)
    assert store_files(tmp_path / "two.zarr") == double


def test_create_store_refuses_a_folder_of_other_files(tmp_path):
    """--out pointing at another run's folder gets a message naming --out, not zarr's mode='w-' message."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "zarr.json").write_text('{"zarr_format": 3, "node_type": "group", "attributes": {}}')
    with pytest.raises(FileExistsError, match="--out .*run already contains other files"):
        make_store(run, [2])


@pytest.mark.parametrize(("options", "flag"), [
    ({"batch_size": 0}, "--batch-size 0"),
    ({"workers": -1}, "--workers -1"),
    ({"chunk_rows": 0}, "--chunk-rows 0"),
    ({"image_size": 0}, "--image-size 0"),
    ({"image_size": -16}, "--image-size -16"),
])
def test_build_rejects_invalid_counts(tmp_path, demo_shards, tiny_tokenizer_path, options, flag):
    cfg = BuildConfig(shards=(demo_shards["eval"],), tokenizer=tiny_tokenizer_path, out=str(tmp_path / "c.zarr"),
                      **options)
    with pytest.raises(ValueError, match=f"^{flag}:? "):
        build_main(cfg)
    assert not (tmp_path / "c.zarr").exists()


def test_open_store_names_corrupt_zarr_json(tmp_path):
    make_store(tmp_path / "c.zarr", [2])
    (tmp_path / "c.zarr" / "zarr.json").write_text("{")
    with pytest.raises(ValueError, match="c.zarr has a corrupt zarr.json"):
        open_cache(str(tmp_path / "c.zarr"))


def test_open_cache_rejects_other_image_size_or_preprocessing(eval_store):
    from cache import ProvenanceMismatchError
    from common.preprocess import transform_description

    cache = open_cache(eval_store, image_size=64, preprocessing=transform_description(64))
    assert len(cache.keys) > 0
    with pytest.raises(ProvenanceMismatchError, match="built from 64-px images, but 256-px"):
        open_cache(eval_store, image_size=256)
    changed = {**transform_description(64), "resize_filter": "bicubic"}
    with pytest.raises(ProvenanceMismatchError, match="bicubic"):
        open_cache(eval_store, preprocessing=changed)
