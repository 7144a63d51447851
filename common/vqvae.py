"""The VAR VQVAE image tokenizer: encoder, native multi-scale quantizer, decoder.

Architecture of VAR's `vae_ch160v4096z32.pth` (Tian et al., "Visual Autoregressive Modeling", 2024): a VQGAN-style
convolutional encoder/decoder (GroupNorm-32, SiLU, ResNet blocks, single-head self-attention at the lowest
resolution and in the middle) with a 3×3 `quant_conv` / `post_quant_conv` around a multi-scale residual quantizer.
Parameter names follow the checkpoint, so it loads strictly (`common.tokenizer.load_tokenizer`); only the codebook moves from `quantize.embedding` to
`quantize.codebook.embedding` (see `VAR_KEY_RENAMES`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from common.quantize import VAR_PATCH_NUMS, Codebook, MultiScaleQuantizer



@dataclass(frozen=True)
class TokenizerConfig:
    ch: int = 160
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    z_channels: int = 32
    vocab_size: int = 4096
    num_phi: int = 4
    attn_resolutions: bool = True  # self-attention in the lowest-resolution level (VAR: yes)
    mid_attn: bool = True
    patch_nums: tuple[int, ...] = VAR_PATCH_NUMS
    image_size: int = 256
    beta: float = 0.25  # commitment weight used when the tokenizer is trained from scratch

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        side = self.image_size // self.downsample
        return (self.z_channels, side, side)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "TokenizerConfig":
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown tokenizer config fields {unknown}; known fields: {sorted(known)}")
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
        return cls(**values)


PRESETS: dict[str, TokenizerConfig] = {
    # VAR's vae_ch160v4096z32: 256×256 images, 16× downsampling, 16×16×32 latents, 109M parameters.
    "var": TokenizerConfig(),
    # The same family shrunk for CPU demos and tests: 64×64 images, 4× downsampling, still 16×16×32 latents
    # quantized over VAR's 10 scales.
    "demo": TokenizerConfig(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, vocab_size=1024, image_size=64),
}

# Inputs may overshoot [−1, 1] by this much (resampling ringing, float rounding) before encode() rejects them.
RANGE_TOLERANCE = 0.02

# Checkpoint key -> module key. Everything else has the checkpoint's name.
VAR_KEY_RENAMES = {"quantize.embedding.weight": "quantize.codebook.embedding.weight"}


def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.norm1 = _group_norm(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2 = _group_norm(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all positions of a feature map, with a residual connection."""

    def __init__(self, ch: int):
        super().__init__()
        self.norm = _group_norm(ch)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj_out = nn.Conv2d(ch, ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(B, 3, C, H * W).transpose(2, 3).unbind(1)  # each (B, HW, C)
        h = F.scaled_dot_product_attention(q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1)).squeeze(1)
        return x + self.proj_out(h.transpose(1, 2).reshape(B, C, H, W))


class Downsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Asymmetric padding (right and bottom only) so a stride-2 3×3 conv halves even sizes exactly.
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _level(blocks: list[nn.Module], attns: list[nn.Module], resample: nn.Module | None, name: str) -> nn.Module:
    level = nn.Module()
    level.block = nn.ModuleList(blocks)
    level.attn = nn.ModuleList(attns)
    if resample is not None:
        setattr(level, name, resample)
    return level


def _run_level(level: nn.Module, h: torch.Tensor, resample: str) -> torch.Tensor:
    """Run one resolution level: each ResNet block (followed by its attention, if any), then the resampling."""
    for i, block in enumerate(level.block):
        h = block(h)
        if len(level.attn):
            h = level.attn[i](h)
    if hasattr(level, resample):
        h = getattr(level, resample)(h)
    return h


def _middle(ch: int, attn: bool) -> nn.Module:
    mid = nn.Module()
    mid.block_1 = ResnetBlock(ch, ch)
    mid.attn_1 = AttnBlock(ch) if attn else nn.Identity()
    mid.block_2 = ResnetBlock(ch, ch)
    return mid


class Encoder(nn.Module):
    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        self.conv_in = nn.Conv2d(3, cfg.ch, 3, padding=1)
        levels, ch_in = [], cfg.ch
        for i, mult in enumerate(cfg.ch_mult):
            last = i == len(cfg.ch_mult) - 1
            blocks, attns = [], []
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResnetBlock(ch_in, cfg.ch * mult))
                ch_in = cfg.ch * mult
                if last and cfg.attn_resolutions:
                    attns.append(AttnBlock(ch_in))
            levels.append(_level(blocks, attns, None if last else Downsample(ch_in), "downsample"))
        self.down = nn.ModuleList(levels)
        self.mid = _middle(ch_in, cfg.mid_attn)
        self.norm_out = _group_norm(ch_in)
        self.conv_out = nn.Conv2d(ch_in, cfg.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = _run_level(level, h, "downsample")
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        ch_in = cfg.ch * cfg.ch_mult[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, ch_in, 3, padding=1)
        self.mid = _middle(ch_in, cfg.mid_attn)
        # Levels are stored lowest resolution last (index = resolution level), as in the checkpoint, but run
        # from the lowest resolution up.
        levels: list[nn.Module] = []
        for i in reversed(range(len(cfg.ch_mult))):
            top = i == len(cfg.ch_mult) - 1
            blocks, attns = [], []
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(ResnetBlock(ch_in, cfg.ch * cfg.ch_mult[i]))
                ch_in = cfg.ch * cfg.ch_mult[i]
                if top and cfg.attn_resolutions:
                    attns.append(AttnBlock(ch_in))
            levels.insert(0, _level(blocks, attns, Upsample(ch_in) if i != 0 else None, "upsample"))
        self.up = nn.ModuleList(levels)
        self.norm_out = _group_norm(ch_in)
        self.conv_out = nn.Conv2d(ch_in, 3, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(self.conv_in(z))))
        for level in reversed(self.up):
            h = _run_level(level, h, "upsample")
        return self.conv_out(F.silu(self.norm_out(h)))


class VARQuantizer(MultiScaleQuantizer):
    """VAR's native quantizer: a plain codebook in the multi-scale layout, plus VAR's code-usage statistics."""

    def __init__(self, cfg: TokenizerConfig):
        super().__init__(Codebook(cfg.vocab_size, cfg.z_channels), cfg.patch_nums, cfg.num_phi, beta=cfg.beta)
        # Per-scale moving average of code hits kept by VAR's training. It contains no weights and is kept only so
        # checkpoints round-trip.
        self.register_buffer("ema_vocab_hit_SV", torch.zeros(len(cfg.patch_nums), cfg.vocab_size))


class VQVAE(nn.Module):
    def __init__(self, config: TokenizerConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quantize = VARQuantizer(config)
        self.quant_conv = nn.Conv2d(config.z_channels, config.z_channels, 3, padding=1)
        self.post_quant_conv = nn.Conv2d(config.z_channels, config.z_channels, 3, padding=1)
        self.sha256: str | None = None  # of the file this tokenizer was loaded from

    @property
    def image_size(self) -> int:
        return self.config.image_size

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return self.config.latent_shape

    @property
    def quantizer(self) -> VARQuantizer:
        return self.quantize

    def check_images(self, x: torch.Tensor, check_range: bool = True) -> None:
        """Raise if x is not a float batch (B, 3, H, W) in [−1, 1] whose size the downsampling divides."""
        R = self.config.image_size
        if x.dtype == torch.uint8:
            raise TypeError("encode() takes float images in [-1, 1], got uint8; convert with x.float() / 127.5 - 1")
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"encode() takes images of shape (B, 3, H, W), got {tuple(x.shape)}")
        if x.shape[2] % self.config.downsample or x.shape[3] % self.config.downsample:
            raise ValueError(
                f"image size {x.shape[2]}x{x.shape[3]} is not divisible by the downsampling factor "
                f"{self.config.downsample}; this tokenizer expects {R}x{R}"
            )
        if check_range:
            low, high = torch.aminmax(x.detach())
            low, high = float(low), float(high)
            if low < -1 - RANGE_TOLERANCE or high > 1 + RANGE_TOLERANCE:
                raise ValueError(
                    f"encode() takes images in [-1, 1], got values in [{low:.3g}, {high:.3g}]; "
                    "images in [0, 1] need x * 2 - 1"
                )

    def encode(self, x: torch.Tensor, check_range: bool = True) -> torch.Tensor:
        """Map images (B, 3, R, R) in [−1, 1] to encoder latents z_e (B, C, h, w), quant_conv included.

        The range check reads two numbers back from the device; hot loops whose inputs come from
        `common.preprocess` (in range by construction) pass check_range=False to avoid that sync.
        """
        self.check_images(x, check_range)
        return self.quant_conv(self.encoder(x))

    def decode(self, z_q: torch.Tensor, clamp: bool = True) -> torch.Tensor:
        """Map quantized latents (B, C, h, w) to images (B, 3, R, R), post_quant_conv included."""
        x = self.decoder(self.post_quant_conv(z_q))
        return x.clamp(-1, 1) if clamp else x

    def decoder_modules(self) -> nn.ModuleDict:
        """Return the modules adaptation fine-tunes: the decoder and post_quant_conv (shared, not copies)."""
        return nn.ModuleDict({"decoder": self.decoder, "post_quant_conv": self.post_quant_conv})

    def forward(self, x: torch.Tensor):
        """Reconstruct x through the native quantizer for training; return (x_hat, QuantizerOutput)."""
        out = self.quantize(self.encode(x))
        return self.decode(out.z_q, clamp=False), out

    def var_state_dict(self) -> dict[str, torch.Tensor]:
        """Return the state dict under the VAR checkpoint's key names."""
        inverse = {v: k for k, v in VAR_KEY_RENAMES.items()}
        return {inverse.get(k, k): v for k, v in self.state_dict().items()}


def build_tokenizer(config: TokenizerConfig | str = "var", **overrides) -> VQVAE:
    """Build a randomly initialised tokenizer from a config or a preset name ("var", "demo")."""
    if isinstance(config, str):
        if config not in PRESETS:
            raise ValueError(f"unknown tokenizer preset {config!r}; choose from {sorted(PRESETS)}")
        config = PRESETS[config]
    if overrides:
        config = replace(config, **overrides)
    return VQVAE(config)
