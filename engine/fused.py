"""The fused inference U-Net: the reference `engine.model.UNet` with its blocks swapped for
versions that call the Triton kernels, with the same weights.

What changes, and why (in a profile of the eager model in bf16 channels_last on an H200, 61% of
the GPU time went to elementwise ops and layout conversions around GroupNorm):
- every GroupNorm(+SiLU) is one `kernels.group_norm` call, reading and writing
  channels_last directly, with float32 statistics;
- the ResBlock's `h + emb_proj(silu(emb))` is folded into its second GroupNorm (`add=`),
  so that sum never reaches memory;
- the embedding projections of all ResBlocks are one matmul per call (`fold_embeddings`),
  one launch instead of ~20, in float32 (it is tiny; the kernel takes the add in fp32);
- attention is `kernels.attention` reading q, k, v as strided views of the qkv
  convolution's output and writing straight into a channels_last tensor (no transposes);
- convolutions run in `dtype` (bf16 by default, fp16 or fp32) on channels_last tensors.

Precision boundaries: x comes in float32 and is cast to `dtype` once; the time and class
embeddings and their projections stay float32 (sin/cos of t up to T - 1 need more than
bf16's 8 bits); the output is cast back to float32.

Module names match the reference, so `state_dict()` keys are the same and a checkpoint
loads into either. The Triton kernels need a CUDA tensor, or TRITON_INTERPRET=1 (set
before `kernels` is first imported) to run on the CPU in the interpreter (slow: tests only).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

import kernels
from engine.config import DTYPES
from engine.errors import ConfigError
from engine.model import AttnBlock, GroupNorm32, ResBlock, UNet, swap_modules, trunk


class FusedGroupNorm(nn.Module):
    """GroupNorm(x + add) * weight + bias, optionally followed by SiLU, in one kernel.

    weight and bias stay float32 whatever the activation dtype (the kernel reads them as
    float32 anyway, and statistics are float32).
    """

    def __init__(self, norm: nn.GroupNorm, silu: bool):
        super().__init__()
        self.num_groups, self.eps, self.silu = norm.num_groups, norm.eps, silu
        self.weight = nn.Parameter(norm.weight.detach().float(), requires_grad=False)
        self.bias = nn.Parameter(norm.bias.detach().float(), requires_grad=False)

    def forward(self, x: torch.Tensor, add: torch.Tensor | None = None) -> torch.Tensor:
        return kernels.group_norm(x, self.weight, self.bias, self.num_groups, self.eps, silu=self.silu, add=add)


class FusedResBlock(nn.Module):
    """ResBlock: norm1+SiLU fused, and the embedding add + norm2 + SiLU fused."""

    def __init__(self, block: ResBlock):
        super().__init__()
        self.norm1 = FusedGroupNorm(block.norm1, silu=True)
        self.conv1 = block.conv1
        self.emb_proj = block.emb_proj
        self.norm2 = FusedGroupNorm(block.norm2, silu=True)
        self.conv2 = block.conv2  # dropout is the identity at inference
        self.shortcut = block.shortcut

    def forward(self, x: torch.Tensor, emb_out: torch.Tensor) -> torch.Tensor:
        """emb_out: this block's emb_proj(silu(emb)), (B, out_ch) float32."""
        h = self.conv1(self.norm1(x))
        h = self.conv2(self.norm2(h, add=emb_out))
        return self.shortcut(x) + h


class FusedAttnBlock(nn.Module):
    def __init__(self, block: AttnBlock):
        super().__init__()
        self.norm = FusedGroupNorm(block.norm, silu=False)
        self.qkv = block.qkv
        self.proj_out = block.proj_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        qkv = self.qkv(self.norm(x))
        # (b, tokens, 3c) views, whatever the layout: for channels_last they are contiguous rows.
        tokens = qkv.flatten(2).transpose(1, 2)
        q, k, v = (tokens[:, None, :, i * c:(i + 1) * c] for i in range(3))  # (b, heads=1, tokens, c)
        out = torch.empty_like(x)  # x's memory format
        kernels.attention(q, k, v, out=out.flatten(2).transpose(1, 2)[:, None])
        return x + self.proj_out(out)


class FusedUNet(nn.Module):
    """eps(x, t, y) of a reference UNet, through the fused blocks; float32 in, float32 out."""

    def __init__(self, model: UNet, dtype: torch.dtype = torch.bfloat16, fold_embeddings: bool = True):
        super().__init__()
        model = swap_modules(copy.deepcopy(model).eval(), {ResBlock: FusedResBlock, AttnBlock: FusedAttnBlock})
        self.config, self.dtype, self.fold_embeddings = model.config, dtype, fold_embeddings
        self.memory_format = torch.channels_last
        self.time_mlp, self.class_embed = model.time_mlp.float(), model.class_embed.float()
        self.conv_in, self.conv_out = model.conv_in.float(), model.conv_out
        self.down, self.mid, self.up = model.down, model.mid, model.up
        self.norm_out = FusedGroupNorm(model.norm_out, silu=True)
        self.res_blocks = [m for m in self.modules() if isinstance(m, FusedResBlock)]  # in forward order
        for module in self.modules():
            if isinstance(module, nn.Conv2d) and module is not self.conv_in:
                module.to(dtype=dtype, memory_format=self.memory_format)
            elif isinstance(module, (GroupNorm32, nn.Dropout)):
                raise AssertionError(f"unfused {type(module).__name__} left in the fused model")
        # All blocks' embedding projections as one (sum of out_ch, emb_dim) float32 matmul.
        self.emb_splits = [blk.emb_proj.out_features for blk in self.res_blocks]
        for blk in self.res_blocks:
            blk.emb_proj.float()
        self.register_buffer("emb_weight", torch.cat([blk.emb_proj.weight for blk in self.res_blocks]), persistent=False)
        self.register_buffer("emb_bias", torch.cat([blk.emb_proj.bias for blk in self.res_blocks]), persistent=False)
        self.requires_grad_(False)

    embed = UNet.embed  # the conditioning vector, float32 here (time_mlp and class_embed are kept float32)

    def block_embeddings(self, emb: torch.Tensor) -> list[torch.Tensor]:
        """emb_proj(silu(emb)) of every ResBlock, in forward order, float32 (B, out_ch) each."""
        act = F.silu(emb)
        if self.fold_embeddings:
            return list(F.linear(act, self.emb_weight, self.emb_bias).split(self.emb_splits, dim=1))
        return [blk.emb_proj(act) for blk in self.res_blocks]

    @torch.no_grad()
    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        emb_outs = iter(self.block_embeddings(self.embed(t, y)))
        # conv_in runs in float32: bf16 would quantize the input image to ~1 intensity level
        # (spacing 2^-7 near 1), and with 27 inputs per output nothing averages that out.
        h = self.conv_in(F.pixel_unshuffle(x.float(), self.config.patch_size)).to(dtype=self.dtype, memory_format=self.memory_format)  # float32 -> dtype
        h = trunk(self, h, lambda layer, h: layer(h, next(emb_outs)) if isinstance(layer, FusedResBlock) else layer(h))
        out = self.conv_out(self.norm_out(h)).float()  # dtype -> float32
        return F.pixel_shuffle(out, self.config.patch_size)


def fuse(model: UNet, dtype: torch.dtype | str = torch.bfloat16, fold_embeddings: bool = True) -> FusedUNet:
    """The fused inference model of `model` (which is left untouched), on the same device; channels_last."""
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ConfigError(f"unknown precision {dtype!r}; use {', '.join(DTYPES)}")
        dtype = DTYPES[dtype]
    return FusedUNet(model, dtype, fold_embeddings).eval()
