"""The DDPM U-Net (Ho et al. 2020, appendix B), a PyTorch transcription of the reference model.

Knows nothing of DDP, Ray or configuration files: it is built from a plain ``UNetConfig``.
Presets: ``tiny`` (tests), ``digits`` (trains usefully on 8x8 digits on 2 CPU cores in minutes),
``cifar`` (the paper's 35.7M-parameter CIFAR-10 model).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class UNetConfig:
    image_size: int = 32
    in_channels: int = 3
    base_channels: int = 128
    channel_mult: tuple[int, ...] = (1, 2, 2, 2)
    num_res_blocks: int = 2
    attention_resolutions: tuple[int, ...] = (16,)
    dropout: float = 0.1
    # "sdpa": torch's fused scaled_dot_product_attention; "math": the explicit softmax(QK^T)V.
    attention: str = "sdpa"

    def __post_init__(self) -> None:
        problems = validate_unet(self)
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def resolutions(self) -> list[int]:
        return [self.image_size // 2**i for i in range(len(self.channel_mult))]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["channel_mult"] = list(self.channel_mult)
        d["attention_resolutions"] = list(self.attention_resolutions)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> UNetConfig:
        d = dict(d)
        d["channel_mult"] = tuple(d["channel_mult"])
        d["attention_resolutions"] = tuple(d["attention_resolutions"])
        return cls(**d)


def validate_unet(c: UNetConfig) -> list[str]:
    """Problems with a U-Net configuration, each naming the field; empty if none."""
    problems = []
    downs = len(c.channel_mult) - 1
    if c.image_size < 1 or c.image_size % (2**downs):
        problems.append(
            f"image_size={c.image_size} is not divisible by 2**{downs}={2**downs}, the U-Net's total "
            f"downsampling for channel_mult={list(c.channel_mult)}"
        )
    if c.base_channels < 8 or c.base_channels % 8:
        problems.append(f"base_channels={c.base_channels} must be a positive multiple of 8 (GroupNorm groups)")
    if not c.channel_mult or any(m < 1 for m in c.channel_mult):
        problems.append(f"channel_mult={list(c.channel_mult)} must be non-empty positive integers")
    if c.num_res_blocks < 1:
        problems.append(f"num_res_blocks={c.num_res_blocks} must be >= 1")
    if not 0.0 <= c.dropout < 1.0:
        problems.append(f"dropout={c.dropout} must be in [0, 1)")
    if c.in_channels < 1:
        problems.append(f"in_channels={c.in_channels} must be >= 1")
    if c.attention not in ("sdpa", "math"):
        problems.append(f"attention={c.attention!r} must be 'sdpa' or 'math'")
    if not problems:
        bad = [r for r in c.attention_resolutions if r not in c.resolutions]
        if bad:
            problems.append(
                f"attention_resolutions={list(c.attention_resolutions)}: {bad} not among the U-Net's "
                f"resolutions {c.resolutions}"
            )
    return problems


PRESETS: dict[str, dict] = {
    "tiny": dict(base_channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(), dropout=0.0),
    "digits": dict(base_channels=32, channel_mult=(1, 2, 2), num_res_blocks=2, attention_resolutions=(2,), dropout=0.0),
    "cifar": dict(
        base_channels=128, channel_mult=(1, 2, 2, 2), num_res_blocks=2, attention_resolutions=(16,), dropout=0.1
    ),
}


def preset(name: str, *, image_size: int, in_channels: int, **overrides) -> UNetConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; known: {sorted(PRESETS)}")
    return replace(UNetConfig(image_size=image_size, in_channels=in_channels, **PRESETS[name]), **overrides)


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Transformer sinusoidal embedding of the timestep (DDPM section 3.3 / Vaswani et al. 2017)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, device=t.device, dtype=torch.float32) / (half - 1))
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


def group_norm(ch: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=min(32, ch // 4) if ch % 32 else 32, num_channels=ch, eps=1e-6)


class ResBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, temb_ch: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = group_norm(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.temb_proj = nn.Linear(temb_ch, out_ch)
        self.norm2 = group_norm(out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        # The reference zero-initialises the last conv of each block so it starts as the identity.
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.temb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions."""

    def __init__(self, ch: int, impl: str) -> None:
        super().__init__()
        self.norm = group_norm(ch)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj = nn.Conv2d(ch, ch, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)
        self.impl = impl

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, c, h * w).transpose(-1, -2).unbind(1)  # (B, HW, C)
        if self.impl == "sdpa":
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            attn = torch.softmax(q @ k.transpose(-1, -2) * c**-0.5, dim=-1)
            out = attn @ v
        # contiguous: a transposed input would give the 1x1 conv a channels-last weight gradient,
        # which DDP then copies into its buckets every step.
        return x + self.proj(out.transpose(-1, -2).reshape(b, c, h, w).contiguous())


class Downsample(nn.Module):
    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class UNet(nn.Module):
    """eps_theta(x_t, t): predicts a tensor of x_t's shape; ``t`` is the 0-based timestep index."""

    def __init__(self, config: UNetConfig) -> None:
        super().__init__()
        self.config = c = config
        ch, temb_ch = c.base_channels, 4 * c.base_channels
        self.temb = nn.Sequential(nn.Linear(ch, temb_ch), nn.SiLU(), nn.Linear(temb_ch, temb_ch))
        self.conv_in = nn.Conv2d(c.in_channels, ch, 3, padding=1)

        self.down = nn.ModuleList()
        skip_chs, cur, res = [ch], ch, c.image_size
        for level, mult in enumerate(c.channel_mult):
            for _ in range(c.num_res_blocks):
                blocks = [ResBlock(cur, ch * mult, temb_ch, c.dropout)]
                cur = ch * mult
                if res in c.attention_resolutions:
                    blocks.append(AttnBlock(cur, c.attention))
                self.down.append(nn.ModuleList(blocks))
                skip_chs.append(cur)
            if level != len(c.channel_mult) - 1:
                self.down.append(nn.ModuleList([Downsample(cur)]))
                skip_chs.append(cur)
                res //= 2

        self.mid = nn.ModuleList(
            [
                ResBlock(cur, cur, temb_ch, c.dropout),
                AttnBlock(cur, c.attention),
                ResBlock(cur, cur, temb_ch, c.dropout),
            ]
        )

        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(c.channel_mult))):
            for _ in range(c.num_res_blocks + 1):
                blocks = [ResBlock(cur + skip_chs.pop(), ch * mult, temb_ch, c.dropout)]
                cur = ch * mult
                if res in c.attention_resolutions:
                    blocks.append(AttnBlock(cur, c.attention))
                self.up.append(nn.ModuleList(blocks))
            if level != 0:
                self.up.append(nn.ModuleList([Upsample(cur)]))
                res *= 2

        self.norm_out = group_norm(cur)
        self.conv_out = nn.Conv2d(cur, c.in_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    @staticmethod
    def _run(blocks: nn.ModuleList, h: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        for block in blocks:
            h = block(h, temb) if isinstance(block, ResBlock) else block(h)
        return h

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        temb = self.temb(timestep_embedding(t, self.config.base_channels).to(x.dtype))
        hs = [self.conv_in(x)]
        for blocks in self.down:
            hs.append(self._run(blocks, hs[-1], temb))
        h = self._run(self.mid, hs[-1], temb)
        for blocks in self.up:
            if isinstance(blocks[0], ResBlock):
                h = torch.cat([h, hs.pop()], dim=1)
            h = self._run(blocks, h, temb)
        return self.conv_out(F.silu(self.norm_out(h)))


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
