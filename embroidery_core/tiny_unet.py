"""A tiny UNet with the module names and call conventions of ComfyUI's SD UNet.

It exists so the core (LoRA placement, prompt routing, trainers) can be tested on CPU in
seconds with the exact module paths it meets in ComfyUI: ``input_blocks.5.1.transformer_blocks.0
.attn2.to_k`` here is the same path as in a real SDXL ``diffusion_model``. Cross-attention calls
``to_k(context)`` and ``to_v(value or context)`` as ComfyUI's ``CrossAttention`` does, which is what
the prompt router relies on. It is also the base denoiser of the toy world.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import NUM_RES_BLOCKS, Arch


@dataclass(frozen=True)
class TinyUNetConfig:
    in_channels: int = 4
    model_channels: int = 32
    channel_mult: tuple[int, ...] = (1, 1, 1)
    down_attention: tuple[int, ...] = (0, 1, 1)  # transformer depth per down level
    up_attention: tuple[int, ...] = (1, 1, 0)    # per up level, level 0 next to the middle
    middle_attention: int = 1
    context_dim: int = 32
    heads: int = 2
    groups: int = 8
    adm_in_channels: int = 0  # > 0 adds a label embedding fed with ``y`` (like SDXL)

    def arch(self, name: str = "sdxl") -> Arch:
        from .blocks import get_arch

        return Arch(name, self.down_attention, self.up_attention, self.middle_attention,
                    presets=get_arch(name).presets)


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class CrossAttention(nn.Module):
    def __init__(self, dim: int, context_dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim, dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(dim, dim), nn.Dropout(0.0))

    def forward(self, x, context=None, value=None):
        q = self.to_q(x)
        context = x if context is None else context
        k = self.to_k(context)
        v = self.to_v(value if value is not None else context)
        b, n, d = q.shape
        split = lambda t: t.reshape(b, -1, self.heads, d // self.heads).transpose(1, 2)
        out = F.scaled_dot_product_attention(split(q), split(k), split(v))
        return self.to_out(out.transpose(1, 2).reshape(b, n, d))


class GEGLU(nn.Module):
    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x):
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, dim * 2), nn.Dropout(0.0), nn.Linear(dim * 2, dim))

    def forward(self, x):
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    def __init__(self, dim: int, context_dim: int, heads: int):
        super().__init__()
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn1 = CrossAttention(dim, dim, heads)
        self.attn2 = CrossAttention(dim, context_dim, heads)
        self.ff = FeedForward(dim)

    def forward(self, x, context):
        x = self.attn1(self.norm1(x)) + x
        x = self.attn2(self.norm2(x), context=context) + x
        return self.ff(self.norm3(x)) + x


class SpatialTransformer(nn.Module):
    def __init__(self, channels: int, depth: int, cfg: TinyUNetConfig):
        super().__init__()
        self.norm = nn.GroupNorm(cfg.groups, channels)
        self.proj_in = nn.Linear(channels, channels)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(channels, cfg.context_dim, cfg.heads) for _ in range(depth))
        self.proj_out = nn.Linear(channels, channels)

    def forward(self, x, context):
        b, c, h, w = x.shape
        tokens = self.proj_in(self.norm(x).flatten(2).transpose(1, 2))
        for block in self.transformer_blocks:
            tokens = block(tokens, context)
        return self.proj_out(tokens).transpose(1, 2).reshape(b, c, h, w) + x


class ResBlock(nn.Module):
    def __init__(self, channels: int, out_channels: int, emb_dim: int, groups: int):
        super().__init__()
        self.in_layers = nn.Sequential(nn.GroupNorm(groups, channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, out_channels))
        self.out_layers = nn.Sequential(nn.GroupNorm(groups, out_channels), nn.SiLU(), nn.Dropout(0.0),
                                        nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip_connection = nn.Identity() if channels == out_channels else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x, emb):
        h = self.in_layers(x) + self.emb_layers(emb)[:, :, None, None]
        return self.skip_connection(x) + self.out_layers(h)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x):
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class TimestepEmbedSequential(nn.ModuleList):
    def forward(self, x, emb, context):
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


class TinyUNet(nn.Module):
    """``forward(x, timesteps, context, y=None)`` -> prediction with the shape of ``x``."""

    def __init__(self, cfg: TinyUNetConfig = TinyUNetConfig()):
        super().__init__()
        self.cfg = cfg
        ch = cfg.model_channels
        emb_dim = ch * 4
        self.time_embed = nn.Sequential(nn.Linear(ch, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        if cfg.adm_in_channels:
            self.label_emb = nn.Sequential(nn.Sequential(nn.Linear(cfg.adm_in_channels, emb_dim), nn.SiLU(),
                                                         nn.Linear(emb_dim, emb_dim)))
        self.input_blocks = nn.ModuleList([TimestepEmbedSequential([nn.Conv2d(cfg.in_channels, ch, 3, padding=1)])])
        skips, cur = [ch], ch
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(NUM_RES_BLOCKS):
                layers = [ResBlock(cur, ch * mult, emb_dim, cfg.groups)]
                cur = ch * mult
                if cfg.down_attention[level]:
                    layers.append(SpatialTransformer(cur, cfg.down_attention[level], cfg))
                self.input_blocks.append(TimestepEmbedSequential(layers))
                skips.append(cur)
            if level != len(cfg.channel_mult) - 1:
                self.input_blocks.append(TimestepEmbedSequential([Downsample(cur)]))
                skips.append(cur)
        middle = [ResBlock(cur, cur, emb_dim, cfg.groups)]
        if cfg.middle_attention:
            middle.append(SpatialTransformer(cur, cfg.middle_attention, cfg))
        middle.append(ResBlock(cur, cur, emb_dim, cfg.groups))
        self.middle_block = TimestepEmbedSequential(middle)
        self.output_blocks = nn.ModuleList()
        levels = len(cfg.channel_mult)
        for up_level in range(levels):
            mult = cfg.channel_mult[levels - 1 - up_level]
            for i in range(NUM_RES_BLOCKS + 1):
                layers = [ResBlock(cur + skips.pop(), ch * mult, emb_dim, cfg.groups)]
                cur = ch * mult
                if cfg.up_attention[up_level]:
                    layers.append(SpatialTransformer(cur, cfg.up_attention[up_level], cfg))
                if up_level != levels - 1 and i == NUM_RES_BLOCKS:
                    layers.append(Upsample(cur))
                self.output_blocks.append(TimestepEmbedSequential(layers))
        self.out = nn.Sequential(nn.GroupNorm(cfg.groups, cur), nn.SiLU(), nn.Conv2d(cur, cfg.in_channels, 3, padding=1))

    def forward(self, x, timesteps, context, y=None):
        emb = self.time_embed(timestep_embedding(timesteps, self.cfg.model_channels))
        if self.cfg.adm_in_channels:
            emb = emb + self.label_emb(y)
        hs, h = [], x
        for block in self.input_blocks:
            h = block(h, emb, context)
            hs.append(h)
        h = self.middle_block(h, emb, context)
        for block in self.output_blocks:
            h = block(torch.cat([h, hs.pop()], dim=1), emb, context)
        return self.out(h)
