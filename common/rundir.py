"""Run directories: resolved config, metrics as JSON lines, safetensors checkpoints, sample grids, report.json.

A run started on a directory that already contains a run resumes from its last checkpoint; without a checkpoint it
raises unless `overwrite=True`. Only the main process should call the writing methods.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from common.config import config_to_dict
from common.fileio import atomic_save_safetensors, atomic_write_json

META_KEY = "vq_transplant_meta"


class RunExistsError(FileExistsError):
    pass


class RunDir:
    def __init__(self, path: str | Path, *, overwrite: bool = False, create: bool = True):
        self.path = Path(path)
        self.checkpoints = self.path / "checkpoints"
        if self.path.exists() and not self.path.is_dir():
            raise NotADirectoryError(f"run directory {self.path} is a file; choose another --out")
        # A folder containing only config.json is a run that failed on bad input before doing any work, so rerunning
        # with the input fixed may reuse it.
        existing = self.path.is_dir() and any(p.name != "config.json" for p in self.path.iterdir())
        self.resume = existing and self.has_checkpoint("last")
        if existing and not self.resume:
            if not overwrite:
                raise RunExistsError(
                    f"run directory {self.path} already contains files but no checkpoint to resume from; "
                    "pass --overwrite to replace it or choose another --out"
                )
            if create:
                shutil.rmtree(self.path)
        if create:
            self.path.mkdir(parents=True, exist_ok=True)

    def has_checkpoint(self, name: str) -> bool:
        return (self.checkpoints / f"{name}.safetensors").is_file()

    def save_config(self, cfg: Any) -> None:
        data = cfg if isinstance(cfg, dict) else config_to_dict(cfg)
        atomic_write_json(self.path / "config.json", data)

    def log_metrics(self, step: int, metrics: dict[str, Any]) -> None:
        values = {k: float(v) if isinstance(v, torch.Tensor) else v for k, v in metrics.items()}
        line = json.dumps({"step": step, "time": round(time.time(), 3), **values})
        with open(self.path / "metrics.jsonl", "a") as f:
            f.write(line + "\n")

    def save_checkpoint(self, name: str, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> Path:
        """Write tensors and metadata as one atomic safetensors file (metadata also copied to a JSON beside it).

        The metadata lives inside the safetensors header, so a kill between two writes can never pair new
        weights with an old step counter. The JSON copy is for people and tools that do not read safetensors.
        """
        weights = self.checkpoints / f"{name}.safetensors"
        self.checkpoints.mkdir(parents=True, exist_ok=True)
        atomic_save_safetensors(weights, tensors, metadata={META_KEY: json.dumps(meta, default=str)})
        atomic_write_json(self.checkpoints / f"{name}.json", meta)
        return weights

    def load_checkpoint(self, name: str = "last") -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
        weights = self.checkpoints / f"{name}.safetensors"
        if not weights.is_file():
            return None
        tensors = {}
        with safe_open(str(weights), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get(META_KEY, "{}"))
            for key in f.keys():
                tensors[key] = f.get_tensor(key)
        return tensors, meta

    def write_report(self, report: dict[str, Any]) -> Path:
        path = self.path / "report.json"
        atomic_write_json(path, report)
        return path
