"""Nested training state (model and optimizer state dicts, counters) as safetensors + JSON, never pickles.

`flatten_state` splits a nested structure into a flat `{path: tensor}` dict for safetensors and a JSON skeleton
in which every tensor is replaced by a reference to its path. `unflatten_state` puts them back together.
"""

from __future__ import annotations

from typing import Any

import torch

TENSOR_REF = "__tensor__"


def flatten_state(state: Any, prefix: str = "") -> tuple[dict[str, torch.Tensor], Any]:
    tensors: dict[str, torch.Tensor] = {}

    def walk(node: Any, path: str) -> Any:
        if isinstance(node, torch.Tensor):
            tensors[path] = node.detach().cpu()
            return {TENSOR_REF: path}
        if isinstance(node, dict):
            # Optimizer state dicts use int keys; JSON keeps only strings, so remember which keys were ints.
            return {
                "__dict__": [[k, isinstance(k, int), walk(v, f"{path}.{k}" if path else str(k))] for k, v in node.items()]
            }
        if isinstance(node, (list, tuple)):
            return {"__list__": [walk(v, f"{path}.{i}") for i, v in enumerate(node)], "tuple": isinstance(node, tuple)}
        if node is None or isinstance(node, (bool, int, float, str)):
            return node
        raise TypeError(f"cannot store {type(node).__name__} at {path!r} in a checkpoint")

    skeleton = walk(state, prefix)
    return tensors, skeleton


def unflatten_state(tensors: dict[str, torch.Tensor], skeleton: Any) -> Any:
    if isinstance(skeleton, dict):
        if TENSOR_REF in skeleton:
            return tensors[skeleton[TENSOR_REF]]
        if "__dict__" in skeleton:
            return {int(k) if is_int else k: unflatten_state(tensors, v) for k, is_int, v in skeleton["__dict__"]}
        if "__list__" in skeleton:
            items = [unflatten_state(tensors, v) for v in skeleton["__list__"]]
            return tuple(items) if skeleton.get("tuple") else items
    return skeleton
