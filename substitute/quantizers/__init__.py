"""Transplant quantizers: five codebook kinds, each in VAR's multi-scale layout or a fixed-scale grouped layout.

    from substitute.quantizers import build_quantizer
    q = build_quantizer("mmd", layout="multiscale", codebook_size=8192, dim=32)
    z_q, idx = q.quantize(z)
"""

from substitute.quantizers.build import (
    CODEBOOKS,
    LAYOUTS,
    QuantizerSpec,
    build_from_spec,
    build_quantizer,
    check_quantizer_tokenizer,
    load_quantizer,
    resolve_quantizer,
    save_quantizer,
)
from substitute.quantizers.ema import EMACodebook
from substitute.quantizers.external import ExternalQuantizer, ExternalSpec, build_external, is_factory_spec
from substitute.quantizers.mmd import MMDCodebook
from substitute.quantizers.online import OnlineCodebook
from substitute.quantizers.vanilla import VanillaCodebook
from substitute.quantizers.wasserstein import WassersteinCodebook

__all__ = [
    "CODEBOOKS",
    "LAYOUTS",
    "EMACodebook",
    "ExternalQuantizer",
    "ExternalSpec",
    "MMDCodebook",
    "OnlineCodebook",
    "QuantizerSpec",
    "VanillaCodebook",
    "WassersteinCodebook",
    "build_external",
    "build_from_spec",
    "build_quantizer",
    "check_quantizer_tokenizer",
    "is_factory_spec",
    "load_quantizer",
    "resolve_quantizer",
    "save_quantizer",
]
