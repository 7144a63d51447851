"""Shard writing, the shard index, and reading with the bad-sample policy."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms as T
from PIL import Image

from common.preprocess import to_uint8, transform_description, var_transform
from shards.index import INDEX_KIND, ShardInfo, build_index, expand_urls, index_hash, load_index, resolve_shards
from shards.read import BadSampleError, SkipLog, iter_samples, shards_for_rank
from shards.write import write_shards


def _jpeg(seed: int, size=(40, 30)) -> bytes:
    array = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG")
    return buffer.getvalue()


def _tar(path, members: list[tuple[str, bytes]]) -> str:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return str(path)


@pytest.mark.parametrize("size", [(300, 200), (200, 300), (97, 131), (64, 64)])
def test_transform_matches_torchvision(size):
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))
    reference = T.Compose([T.Resize(72, interpolation=T.InterpolationMode.LANCZOS), T.CenterCrop(64), T.ToTensor(), T.Normalize([0.5] * 3, [0.5] * 3)])
    torch.testing.assert_close(var_transform(64)(image), reference(image), atol=0, rtol=0)


def test_transform_description_and_uint8():
    assert transform_description(256)["resize_shorter_side"] == 288
    x = torch.tensor([-1.0, 0.0, 1.0, 2.0])
    assert to_uint8(x).tolist() == [0, 128, 255, 255]


def test_write_shards_with_classes(tmp_path):
    for name in ("cats", "dogs"):
        (tmp_path / "src" / name).mkdir(parents=True)
        for i in range(3):
            (tmp_path / "src" / name / f"img.{i}.jpg").write_bytes(_jpeg(i))
    shards = write_shards(tmp_path / "src", tmp_path / "out", prefix="pets", maxcount=4)
    assert [s.nsamples for s in shards] == [4, 2]
    index = json.loads((tmp_path / "out" / "pets.json").read_text())
    assert index["__kind__"] == INDEX_KIND
    assert [e["url"] for e in index["shardlist"]] == ["pets-000000.tar", "pets-000001.tar"]
    assert load_index(str(tmp_path / "out" / "pets.json")) == shards
    samples = list(iter_samples([s.url for s in shards], 32))
    assert sorted(s["cls"] for s in samples) == [0, 0, 0, 1, 1, 1]
    assert all("." not in s["key"] for s in samples)
    assert samples[0]["image"].shape == (3, 32, 32)


def test_write_refuses_existing_shards(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.jpg").write_bytes(_jpeg(0))
    write_shards(tmp_path / "src", tmp_path / "out")
    with pytest.raises(FileExistsError, match="already contains shards"):
        write_shards(tmp_path / "src", tmp_path / "out")


def test_resolve_counts_foreign_shards(tmp_path):
    url = _tar(tmp_path / "foreign-0000.tar", [("a.jpg", _jpeg(0)), ("a.cls", b"3"), ("b.jpg", _jpeg(1))])
    [info] = resolve_shards(str(tmp_path / "foreign-{0000..0000}.tar"))
    assert (info.url, info.nsamples) == (url, 2)
    with pytest.raises(FileNotFoundError, match="foreign-0001.tar"):
        resolve_shards(str(tmp_path / "foreign-{0000..0001}.tar"))


def test_resolve_joins_several_indexes(demo_shards):
    train, evaluation = load_index(demo_shards["train"]), load_index(demo_shards["eval"])
    assert resolve_shards([demo_shards["train"], demo_shards["eval"]]) == train + evaluation
    assert resolve_shards([demo_shards["eval"], train[0].url]) == evaluation + [train[0]]


def test_resolve_rejects_repeated_shard(demo_shards):
    first = load_index(demo_shards["train"])[0].url
    with pytest.raises(ValueError, match="appears more than once"):
        resolve_shards([demo_shards["train"], demo_shards["train"]])
    with pytest.raises(ValueError, match="appears more than once"):
        resolve_shards([demo_shards["train"], first])
    folder, name = first.rsplit("/", 1)
    with pytest.raises(ValueError, match="appears more than once"):
        resolve_shards([first, f"{folder}/./{name}"])


def test_resolve_suggests_separate_arguments(demo_shards):
    with pytest.raises(FileNotFoundError, match="separate arguments"):
        resolve_shards([f"{demo_shards['train']} {demo_shards['eval']}"])


def test_resolve_keeps_spaces_in_paths(tmp_path, demo_shards):
    folder = tmp_path / "my shards"
    folder.mkdir()
    source = load_index(demo_shards["eval"])[0]
    target = folder / "one.tar"
    target.write_bytes(Path(source.url).read_bytes())
    [info] = resolve_shards([str(target)])
    assert (info.url, info.nsamples) == (str(target), source.nsamples)


def test_expand_and_hash():
    assert expand_urls("s-{00..02}.tar") == ["s-00.tar", "s-01.tar", "s-02.tar"]
    assert expand_urls("a.tar,b.tar") == ["a.tar", "b.tar"]
    assert expand_urls(["my shards/a.tar", "b.tar,c-{0..1}.tar"]) == ["my shards/a.tar", "b.tar", "c-0.tar", "c-1.tar"]
    assert expand_urls("d/{x,y}.tar,e.tar") == ["d/x.tar", "d/y.tar", "e.tar"]
    assert expand_urls(["d/{x,y}.tar"]) == ["d/x.tar", "d/y.tar"]
    a = [ShardInfo("/data/s-00.tar", 10, 1), ShardInfo("/data/s-01.tar", 5, 1)]
    moved = [ShardInfo("s3://bucket/s-00.tar", 10, 1), ShardInfo("s3://bucket/s-01.tar", 5, 1)]
    recounted = [ShardInfo("/data/s-00.tar", 10, 1), ShardInfo("/data/s-01.tar", 4, 1)]
    rewritten = [ShardInfo("/data/s-00.tar", 10, 2), ShardInfo("/data/s-01.tar", 5, 1)]
    assert index_hash(a) == index_hash(moved)
    assert index_hash(a) != index_hash(recounted)
    assert index_hash(a) != index_hash(rewritten)


def test_bad_samples_are_skipped_and_counted(tmp_path):
    url = _tar(
        tmp_path / "bad.tar",
        [
            ("good.jpg", _jpeg(0)),
            ("good.cls", b"1"),
            ("broken.jpg", b"not a jpeg at all"),
            ("nolabel.txt", b"no image here"),
            ("dotted.key.jpg", _jpeg(1)),
            ("twice.jpg", _jpeg(2)),
            ("other.jpg", _jpeg(3)),
            ("twice.jpg", _jpeg(4)),
            ("badlabel.jpg", _jpeg(5)),
            ("badlabel.cls", b"seven"),
        ],
    )
    skips = SkipLog()
    samples = list(iter_samples([url], 32, skips))
    assert [s["key"] for s in samples] == ["good", "twice", "other"]
    assert dict(skips.counts) == {"undecodable_image": 1, "missing_image": 1, "key_with_dot": 1, "duplicate_key": 1, "invalid_label": 1}
    assert {e["key"] for e in skips.examples} == {"broken", "nolabel", "dotted.key", "twice", "badlabel"}
    assert all(e["url"] == url for e in skips.examples)


def test_split_sample_is_named(tmp_path):
    # labels first, then images: the layout `tar cf shard.tar *.cls *.jpg` produces
    url = _tar(tmp_path / "split.tar", [("a.cls", b"1"), ("b.cls", b"2"), ("a.jpg", _jpeg(0)), ("b.jpg", _jpeg(1))])
    skips = SkipLog()
    samples = list(iter_samples([url], 32, skips))
    assert samples == []
    assert dict(skips.counts) == {"missing_image": 2, "split_sample": 2}
    split = [e for e in skips.examples if e["skip"] == "split_sample"]
    assert "not adjacent" in split[0]["error"]


def test_skip_error_has_no_memory_address(tmp_path):
    url = _tar(tmp_path / "bad.tar", [("broken.jpg", b"not a jpeg at all")])
    skips = SkipLog()
    list(iter_samples([url], 32, skips))
    [example] = skips.examples
    assert example["error"].startswith("UnidentifiedImageError: ")
    assert "0x" not in example["error"]


def test_truncated_tar_is_counted(tmp_path):
    url = _tar(tmp_path / "cut.tar", [(f"k{i}.jpg", _jpeg(i, (200, 200))) for i in range(4)])
    data = open(url, "rb").read()
    open(url, "wb").write(data[: len(data) // 2])
    skips = SkipLog()
    samples = list(iter_samples([url], 32, skips))
    assert 0 < len(samples) < 4
    assert skips.counts["unreadable_tar"] == 1


def test_strict_raises_on_bad_sample(tmp_path):
    url = _tar(tmp_path / "bad.tar", [("broken.jpg", b"junk")])
    with pytest.raises(BadSampleError, match="broken"):
        list(iter_samples([url], 32, SkipLog(strict=True)))


def test_shards_for_rank_deals_round_robin():
    urls = [f"s{i}" for i in range(4)]
    assert [shards_for_rank(urls, r, 3) for r in range(3)] == [["s0", "s3"], ["s1"], ["s2"]]
    assert shards_for_rank(urls[:1], 1, 2) == []


def test_demo_shards_are_real_photographs(demo_shards):
    shards = load_index(demo_shards["train"])
    assert sum(s.nsamples for s in shards) == 26
    samples = list(iter_samples([s.url for s in shards], 64))
    assert len(samples) == 26
    assert len({s["cls"] for s in samples}) == 13
    # Real photographs are not flat: every crop has visible contrast.
    assert all(s["image"].std() > 0.02 for s in samples)


def test_bad_index_and_shard_files_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="shard index .*nope.json: not found"):
        resolve_shards(str(tmp_path / "nope.json"))
    (tmp_path / "bad.json").write_text("[1,")
    with pytest.raises(ValueError, match="bad.json is not valid JSON"):
        load_index(str(tmp_path / "bad.json"))
    (tmp_path / "list.json").write_text("[1]")
    with pytest.raises(ValueError, match="not a webdataset shard index"):
        load_index(str(tmp_path / "list.json"))
    (tmp_path / "a.tar").write_text("not a tar")
    with pytest.raises(ValueError, match="a.tar is not a readable tar file"):
        build_index([str(tmp_path / "a.tar")])
    with pytest.raises(FileNotFoundError, match="not a file"):
        build_index([str(tmp_path)])


def test_write_rejects_bad_maxcount_and_missing_folder(tmp_path):
    with pytest.raises(ValueError, match="--maxcount 0"):
        write_shards(tmp_path, tmp_path / "out", maxcount=0)
    with pytest.raises(NotADirectoryError, match="not a folder"):
        write_shards(tmp_path / "nope", tmp_path / "out")


def test_shards_read_through_fsspec_urls(tmp_path):
    import fsspec

    data = open(_tar(tmp_path / "local.tar", [("a.jpg", _jpeg(0)), ("a.cls", b"2"), ("b.jpg", _jpeg(1))]), "rb").read()
    with fsspec.open("memory://shards/remote-0000.tar", "wb") as f:
        f.write(data)
    urls = ["memory://shards/remote-0000.tar", f"file://{tmp_path / 'local.tar'}"]
    samples = list(iter_samples(urls, 32))
    assert [s["key"] for s in samples] == ["a", "b", "a", "b"]
    assert samples[0]["url"] == "memory://shards/remote-0000.tar"
    assert samples[0]["cls"] == 2
    [info] = resolve_shards("memory://shards/remote-{0000..0000}.tar")
    assert info.nsamples == 2


def test_missing_shard_url_is_counted(tmp_path):
    skips = SkipLog()
    assert list(iter_samples([str(tmp_path / "gone.tar")], 32, skips)) == []
    assert skips.counts["unreadable_tar"] == 1
