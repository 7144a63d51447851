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
    The flags only affect CUDA devices and are restored on exit. Where torch has the fp32_precision settings, they
    are the only ones used, because torch raises when code reads the older allow_tf32 flags after a mix of the two.
    Older torch releases without them get the allow_tf32 flags instead.
    """
    if mode not in FLOAT32_MODES:
        raise ValueError(f"float32 precision must be one of {FLOAT32_MODES}, got {mode!r}")
    conv = getattr(torch.backends.cudnn, "conv", None)
    if conv is not None and hasattr(conv, "fp32_precision"):
        flags, value = [(conv, "fp32_precision"), (torch.backends.cuda.matmul, "fp32_precision")], mode
    else:
        flags, value = [(torch.backends.cudnn, "allow_tf32"), (torch.backends.cuda.matmul, "allow_tf32")], mode == "tf32"
    before = [getattr(owner, name) for owner, name in flags]
    for owner, name in flags:
        setattr(owner, name, value)
    try:
        yield
    finally:
        for (owner, name), old in zip(flags, before):
            setattr(owner, name, old)
