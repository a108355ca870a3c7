"""Triton kernels used by the engine and export: fused GroupNorm and fused attention."""

from kernels.attention import attention
from kernels.group_norm import group_norm

__all__ = ["attention", "group_norm"]
