"""Float32 precision of GPU convolutions and matrix products, set for one block of code."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch

FLOAT32_MODES = ("ieee", "tf32")


@contextmanager
def float32_precision(mode: str) -> Iterator[None]:
    """Run float32 cuDNN convolutions and CUDA matrix products as `mode` ("ieee" or "tf32") inside the block.

    PyTorch lets cuDNN convolutions use TensorFloat-32 by default (torch 2.14:
    `torch.backends.cudnn.conv.fp32_precision` is "tf32"). A "float32" encoder on an Ampere or newer GPU then
    rounds the inputs of every convolution to 10 mantissa bits, so its latents are not the float32 encoder's.
    The flags only affect CUDA devices and are restored on exit. They are set through the fp32_precision
    settings only, because torch raises when code reads the older allow_tf32 flags after a mix of the two.
    """
    if mode not in FLOAT32_MODES:
        raise ValueError(f"float32 precision must be one of {FLOAT32_MODES}, got {mode!r}")
    conv, matmul = torch.backends.cudnn.conv, torch.backends.cuda.matmul
    before = conv.fp32_precision, matmul.fp32_precision
    conv.fp32_precision = matmul.fp32_precision = mode
    try:
        yield
    finally:
        conv.fp32_precision, matmul.fp32_precision = before
