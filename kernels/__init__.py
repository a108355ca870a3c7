"""Triton kernels used by the engine's fused U-Net (engine/fused.py): fused GroupNorm and fused attention."""

from kernels.attention import attention
from kernels.group_norm import group_norm

__all__ = ["attention", "group_norm"]
