"""Pieces shared by the codebook kinds: initialisation, a FIFO queue of recent features, process reductions."""

from __future__ import annotations

import torch
import torch.distributed as dist

from common.quantize import Codebook

INIT_CHOICES = ("normal", "uniform")


def init_codes(codebook: Codebook, init: str) -> None:
    """Initialise the code vectors: "normal" is N(0, 1) (nn.Embedding's default), "uniform" is U(-1/K, 1/K)."""
    weight = codebook.embedding.weight
    with torch.no_grad():
        if init == "normal":
            weight.normal_(0.0, 1.0)
        elif init == "uniform":
            weight.uniform_(-1.0 / codebook.size, 1.0 / codebook.size)
        else:
            raise ValueError(f"codebook init must be one of {INIT_CHOICES}, got {init!r}")


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def sum_across_processes(tensor: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over all processes in place (a no-op in a single process) and return it."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_from_main(tensor: torch.Tensor) -> torch.Tensor:
    """Overwrite the tensor with rank 0's copy (a no-op in a single process) and return it."""
    if is_distributed():
        dist.broadcast(tensor, src=0)
    return tensor


class FeatureQueue:
    """A FIFO ring buffer of the most recent feature vectors, kept per process.

    The queue is a plain attribute rather than a module buffer: it is not saved with the quantizer, it moves to
    the device of the first features pushed, and DistributedDataParallel does not broadcast it every step.
    Training checkpoints save it through `state()` and `load_state()`, so a resumed run continues exactly.
    """

    def __init__(self, capacity: int):
        if capacity < 1:
            raise ValueError(f"feature queue capacity must be positive, got {capacity}")
        self.capacity = capacity
        self._data: torch.Tensor | None = None
        self._next = 0
        self._filled = 0

    def __len__(self) -> int:
        return self._filled

    def push(self, features: torch.Tensor) -> None:
        """Append features (N, d), dropping the oldest once the queue is full."""
        features = features.detach().float()
        if self._data is None or self._data.device != features.device or self._data.shape[1] != features.shape[1]:
            self._data = features.new_zeros(self.capacity, features.shape[1])
            self._next = self._filled = 0
        features = features[-self.capacity :]
        n = features.shape[0]
        first = min(n, self.capacity - self._next)
        self._data[self._next : self._next + first] = features[:first]
        self._data[: n - first] = features[first:]
        self._next = (self._next + n) % self.capacity
        self._filled = min(self.capacity, self._filled + n)

    def state(self, dim: int, device: torch.device | str) -> tuple[torch.Tensor, dict[str, int]]:
        """Return the ring buffer (capacity, dim) float32 (zeros while empty) and its positions."""
        data = self._data if self._data is not None else torch.zeros(self.capacity, dim, device=device)
        return data, {"next": self._next, "filled": self._filled}

    def load_state(self, data: torch.Tensor, positions: dict[str, int]) -> None:
        """Restore what `state()` returned, on the device of `data`."""
        if data.shape[0] != self.capacity:
            raise ValueError(f"saved feature queue has {data.shape[0]} rows, but this queue has room for {self.capacity}")
        self._data = data.float().clone() if positions["filled"] else None
        self._next, self._filled = int(positions["next"]), int(positions["filled"])

    def contents(self) -> torch.Tensor:
        """Return the queued features (n, d), in no particular order."""
        if self._data is None:
            raise ValueError("the feature queue is empty: push features before reading it")
        return self._data[: self._filled]
