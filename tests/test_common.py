"""Config parsing, run directories, checkpoint flattening and the weight check."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from common.checkpoint import flatten_state, unflatten_state
from common.config import TRACEBACK_ENV, config_to_dict, exit_on_input_error, parse_config
from common.rundir import RunDir, RunExistsError
from common.weights import MissingWeightsError, WeightFile, dino_vits16_file, lpips_vgg_file, require_weights


@dataclass
class ToyConfig:
    out: Path
    codebook_size: int = 4096
    layout: str = field(default="multiscale", metadata={"choices": ["multiscale", "fixed"]})
    lr: float = 1e-4
    patch_nums: tuple[int, ...] = (1, 2, 4)
    hflip: bool = False
    note: str | None = None


def test_flags_file_and_precedence(tmp_path):
    config_file = tmp_path / "c.yaml"
    config_file.write_text("codebook-size: 8192\nlr: 0.5\n")
    cfg = parse_config(ToyConfig, ["--out", "r", "--config", str(config_file), "--lr", "0.25", "--hflip", "--patch-nums", "1", "3"])
    assert cfg == ToyConfig(out=Path("r"), codebook_size=8192, lr=0.25, patch_nums=(1, 3), hflip=True)
    assert config_to_dict(cfg)["out"] == "r"


def test_saved_config_reloads(tmp_path):
    cfg = parse_config(ToyConfig, ["--out", "r", "--layout", "fixed"])
    saved = tmp_path / "config.json"
    saved.write_text(json.dumps(config_to_dict(cfg)))
    assert parse_config(ToyConfig, ["--config", str(saved)]) == cfg


def test_bad_flags_exit(tmp_path, capsys):
    with pytest.raises(SystemExit):
        parse_config(ToyConfig, [])
    assert "--out" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_config(ToyConfig, ["--out", "r", "--layout", "pyramid"])
    config_file = tmp_path / "c.yaml"
    config_file.write_text("learning-rate: 1\n")
    with pytest.raises(SystemExit):
        parse_config(ToyConfig, ["--out", "r", "--config", str(config_file)])
    assert "learning_rate" in capsys.readouterr().err


def test_rundir_resume_and_refuse(tmp_path):
    run = RunDir(tmp_path / "run")
    assert not run.resume
    run.log_metrics(1, {"loss": torch.tensor(0.5)})
    run.save_checkpoint("last", {"w": torch.arange(3.0)}, {"step": 7})
    again = RunDir(tmp_path / "run")
    assert again.resume
    tensors, meta = again.load_checkpoint("last")
    assert meta == {"step": 7}
    assert torch.equal(tensors["w"], torch.arange(3.0))
    assert json.loads((tmp_path / "run" / "metrics.jsonl").read_text())["loss"] == 0.5

    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("x")
    with pytest.raises(RunExistsError, match="--overwrite"):
        RunDir(tmp_path / "other")
    RunDir(tmp_path / "other", overwrite=True)
    assert not (tmp_path / "other" / "notes.txt").exists()


def test_optimizer_state_round_trip():
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    tensors, skeleton = flatten_state({"optimizer": opt.state_dict(), "step": 3})
    restored = unflatten_state(tensors, json.loads(json.dumps(skeleton)))
    fresh = torch.optim.AdamW(torch.nn.Linear(3, 2).parameters(), lr=1e-3)
    fresh.load_state_dict(restored["optimizer"])
    assert restored["step"] == 3
    for a, b in zip(opt.state_dict()["state"].values(), fresh.state_dict()["state"].values()):
        assert torch.equal(a["exp_avg"], b["exp_avg"])


def test_require_weights_lists_every_missing_file(tmp_path):
    present = tmp_path / "present.pth"
    present.write_bytes(b"x")
    with pytest.raises(MissingWeightsError) as err:
        require_weights(WeightFile("present", present, ""), lpips_vgg_file(), dino_vits16_file(tmp_path / "dino.safetensors"))
    message = str(err.value)
    assert "2 pretrained weight file(s) missing" in message
    assert "vgg16-397923af.pth" in message
    assert "dino.safetensors" in message
    require_weights(WeightFile("present", present, ""))


def test_rundir_reuses_config_only_folder(tmp_path):
    """A run that failed on bad input before its first checkpoint leaves config.json; a fixed rerun may reuse it."""
    RunDir(tmp_path / "run").save_config({"lr": 1.0})
    again = RunDir(tmp_path / "run")
    assert not again.resume
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="choose another --out"):
        RunDir(tmp_path / "file")


def test_config_file_single_string_for_tuple(tmp_path):
    @dataclass
    class ShardsConfig:
        shards: tuple[str, ...]

    (tmp_path / "c.yaml").write_text("shards: /data/train.json\n")
    cfg = parse_config(ShardsConfig, ["--config", str(tmp_path / "c.yaml")])
    assert cfg.shards == ("/data/train.json",)


def test_config_file_errors_name_the_flag(tmp_path):
    with pytest.raises(SystemExit, match="--config .*nope.yaml: file not found"):
        parse_config(ToyConfig, ["--out", "r", "--config", str(tmp_path / "nope.yaml")])
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(SystemExit, match="bad.json: not valid JSON"):
        parse_config(ToyConfig, ["--out", "r", "--config", str(tmp_path / "bad.json")])


def test_exit_on_input_error_prints_one_line(monkeypatch):
    monkeypatch.delenv(TRACEBACK_ENV, raising=False)
    with pytest.raises(SystemExit, match=r"^error: shard x.tar: not found \(set VQT_TRACEBACK=1"):
        with exit_on_input_error():
            raise FileNotFoundError("shard x.tar: not found")
    with pytest.raises(KeyError):
        with exit_on_input_error():
            raise KeyError("a bug keeps its traceback")
    monkeypatch.setenv(TRACEBACK_ENV, "1")
    with pytest.raises(ValueError):
        with exit_on_input_error():
            raise ValueError("debugging keeps the traceback")
