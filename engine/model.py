"""The DDPM U-Net (Ho et al. 2020, Appendix B), class-conditional for classifier-free
guidance (Ho & Salimans 2022).

This eager PyTorch definition is the reference for every other backend: fast variants
are made from it by swapping modules, with the same weights.

Notation: `t` is the integer timestep in [0, T) (the paper's t - 1), `y` the class
label in [0, num_classes], where `num_classes` is the null class (learned, unless
config.learned_null is false: then its row is zero, as for an unconditional model,
num_classes 0, whose only label is 0).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from engine.config import ModelConfig


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of the timestep, as in the Transformer (Vaswani et al. 2017)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / (half - 1))
    angles = t.float()[:, None] * freqs[None, :]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


class GroupNorm32(nn.GroupNorm):
    """GroupNorm whose statistics are always computed in float32 (guided-diffusion's)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).to(x.dtype)


class ResBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, dropout: float, groups: int, eps: float = 1e-5):
        super().__init__()
        self.norm1 = GroupNorm32(groups, in_ch, eps)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb_proj = nn.Linear(emb_dim, out_ch)
        self.norm2 = GroupNorm32(groups, out_ch, eps)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb_proj(F.silu(emb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H x W positions, with a residual connection."""

    def __init__(self, ch: int, groups: int, eps: float = 1e-5):
        super().__init__()
        self.norm = GroupNorm32(groups, ch, eps)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj_out = nn.Conv2d(ch, ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        qkv = self.qkv(self.norm(x)).reshape(b, 3, 1, c, h * w).transpose(-1, -2)
        q, k, v = qkv.unbind(1)  # each (b, heads=1, tokens, c)
        out = F.scaled_dot_product_attention(q, k, v)
        out = out.transpose(-1, -2).reshape(b, c, h, w)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """A stride-2 3x3 convolution. padding 1 pads every side; padding 0 pads only the bottom and
    right (TF's 'SAME' for an even side, as in Ho et al.'s code and diffusers' downsample_padding 0)."""

    def __init__(self, ch: int, padding: int = 1):
        super().__init__()
        self.pad = (0, 1, 0, 1) if padding == 0 else None
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x if self.pad is None else F.pad(x, self.pad))


class Upsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class UNet(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        config.validate()
        self.config = config
        ch, emb_dim, groups, dropout = config.ch, config.time_embed_dim, config.num_groups, config.dropout
        eps = config.norm_eps

        self.time_mlp = nn.Sequential(nn.Linear(ch, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.class_embed = nn.Embedding(config.num_classes + 1, emb_dim)
        # With patch_size p the image enters as p x p pixel blocks stacked on channels.
        pixels = config.in_channels * config.patch_size**2
        self.conv_in = nn.Conv2d(pixels, ch, 3, padding=1)

        # Downsampling path; skip_channels records what each skip connection carries.
        self.down = nn.ModuleList()
        skip_channels = [ch]
        cur_ch, resolution = ch, config.top_resolution
        for level, mult in enumerate(config.ch_mult):
            for _ in range(config.num_res_blocks):
                block = nn.ModuleList([ResBlock(cur_ch, ch * mult, emb_dim, dropout, groups, eps)])
                cur_ch = ch * mult
                if resolution in config.attn_resolutions:
                    block.append(AttnBlock(cur_ch, groups, eps))
                self.down.append(block)
                skip_channels.append(cur_ch)
            if level != len(config.ch_mult) - 1:
                self.down.append(nn.ModuleList([Downsample(cur_ch, config.downsample_padding)]))
                skip_channels.append(cur_ch)
                resolution //= 2

        self.mid = nn.ModuleList([
            ResBlock(cur_ch, cur_ch, emb_dim, dropout, groups, eps),
            AttnBlock(cur_ch, groups, eps),
            ResBlock(cur_ch, cur_ch, emb_dim, dropout, groups, eps),
        ])

        # Upsampling path: num_res_blocks + 1 blocks a level, each eating one skip.
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(config.ch_mult))):
            for _ in range(config.num_res_blocks + 1):
                block = nn.ModuleList([ResBlock(cur_ch + skip_channels.pop(), ch * mult, emb_dim, dropout, groups, eps)])
                cur_ch = ch * mult
                if resolution in config.attn_resolutions:
                    block.append(AttnBlock(cur_ch, groups, eps))
                self.up.append(block)
            if level != 0:
                self.up.append(nn.ModuleList([Upsample(cur_ch)]))
                resolution *= 2

        self.norm_out = GroupNorm32(groups, cur_ch, eps)
        self.conv_out = nn.Conv2d(cur_ch, pixels, 3, padding=1)

    def embed(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The conditioning vector: time-embedding MLP plus the learned class embedding."""
        return self.time_mlp(timestep_embedding(t, self.config.ch)) + self.class_embed(y)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Predict the noise epsilon in x_t (Ho et al. 2020, Eq. 11)."""
        emb = self.embed(t, y).to(x.dtype)
        h = self.conv_in(F.pixel_unshuffle(x, self.config.patch_size))
        h = trunk(self, h, lambda layer, h: layer(h, emb) if isinstance(layer, ResBlock) else layer(h))
        return F.pixel_shuffle(self.conv_out(F.silu(self.norm_out(h))), self.config.patch_size)


def trunk(unet: nn.Module, h: torch.Tensor, run_layer) -> torch.Tensor:
    """The down, middle and up paths of `unet` (a UNet, or a model made from one by swapping
    modules) with their skip connections; run_layer(layer, h) runs one layer of a block."""
    skips = [h]
    for block in unet.down:
        for layer in block:
            h = run_layer(layer, h)
        skips.append(h)
    for layer in unet.mid:
        h = run_layer(layer, h)
    for block in unet.up:
        if not isinstance(block[0], Upsample):  # every up block but an Upsample eats one skip
            h = torch.cat([h, skips.pop()], dim=1)
        for layer in block:
            h = run_layer(layer, h)
    return h


def swap_modules(model: nn.Module, swaps: dict[type, Callable[[nn.Module], nn.Module]]) -> nn.Module:
    """Replace, in place, every submodule whose type is a key of `swaps` by swaps[type](module), a
    variant with the same weights (stable-fast's patching). Children first: a swapped block gets
    children already swapped. Returns `model`."""
    for name, child in list(model.named_children()):
        swap_modules(child, swaps)
        if type(child) in swaps:
            setattr(model, name, swaps[type(child)](child))
    return model


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def keep_float32_islands(model: UNet) -> UNet:
    """Return `model` (cast to a lower precision) with its float32 islands cast back, in place: the
    time and class embeddings (UNet.forward casts their sum to x's dtype) and every GroupNorm's affine
    parameters (GroupNorm32 computes its statistics in float32 and needs float32 parameters)."""
    for module in (model.time_mlp, model.class_embed, *(m for m in model.modules() if isinstance(m, nn.GroupNorm))):
        module.float()
    return model
