"""The fused Triton kernels against torch at the U-Net's shapes.

Each case is one row (benchmarks/conftest.py `bench`): CUDA-event median, min and max after
warm-up, the effective bandwidth (bytes read + written) of GroupNorm or the TFLOP/s of
attention, and their fraction of the ceilings measured in the same run. The first call,
which includes Triton's compilation, is reported separately.

On the CPU the kernels run under TRITON_INTERPRET=1: one tiny shape per kernel and a few
rounds prove the benchmark runs; the real shapes are skipped. Nothing asserts a speed.
"""

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

import kernels  # noqa: E402
from benchmarks.harness import ON_GPU  # noqa: E402

DEVICE = "cuda" if ON_GPU else "cpu"
needs_gpu = pytest.mark.skipif(
    not ON_GPU, reason="real shapes need a GPU; on the CPU only the tiny interpreter case runs")


# (N, C, H, W, groups, dtype, memory format, fuse the per-channel add)
GROUP_NORM_CASES = [
    pytest.param((2, 32, 4, 4), 8, torch.float32, torch.contiguous_format, True, id="tiny"),
    pytest.param((1024, 256, 16, 16), 32, torch.bfloat16, torch.channels_last, False,
                 id="1024x256x16x16-bf16-channels_last", marks=needs_gpu),
    pytest.param((1024, 256, 16, 16), 32, torch.bfloat16, torch.contiguous_format, False,
                 id="1024x256x16x16-bf16-nchw", marks=needs_gpu),
    pytest.param((1024, 256, 16, 16), 32, torch.bfloat16, torch.channels_last, True,
                 id="1024x256x16x16-bf16-channels_last-add", marks=needs_gpu),
    pytest.param((256, 128, 32, 32), 32, torch.bfloat16, torch.channels_last, False,
                 id="256x128x32x32-bf16-channels_last", marks=needs_gpu),
    pytest.param((2, 256, 32, 32), 32, torch.bfloat16, torch.channels_last, False,
                 id="2x256x32x32-bf16-channels_last-split", marks=needs_gpu),
]


@pytest.mark.parametrize("provider", ["triton", "torch"])
@pytest.mark.parametrize("shape, groups, dtype, layout, fuse_add", GROUP_NORM_CASES)
def test_group_norm_silu(bench, provider, shape, groups, dtype, layout, fuse_add):
    N, C, H, W = shape
    x = torch.randn(shape, device=DEVICE, dtype=dtype).contiguous(memory_format=layout)
    weight = torch.randn(C, device=DEVICE, dtype=dtype)
    bias = torch.randn(C, device=DEVICE, dtype=dtype)
    add = torch.randn(N, C, device=DEVICE) if fuse_add else None
    if provider == "triton":
        def fn():
            kernels.group_norm(x, weight, bias, groups, silu=True, add=add)
    else:
        def fn():
            h = x + add[:, :, None, None].to(dtype) if fuse_add else x
            F.silu(F.group_norm(h, groups, weight, bias))
    # Effective bytes: the input read and the output written once.
    bytes_moved = 2 * x.numel() * x.element_size() + (add.numel() * 4 if fuse_add else 0)
    bench(fn, what="group_norm_silu" + ("_add" if fuse_add else ""), backend=provider, batch=N, bytes=bytes_moved,
          shape=list(shape), dtype=str(dtype).removeprefix("torch."),
          layout="channels_last" if layout == torch.channels_last else "nchw")


# (batch, heads, tokens, head_dim, dtype)
ATTENTION_CASES = [
    pytest.param((1, 1, 16, 32), torch.float32, id="tiny"),
    pytest.param((1024, 1, 256, 256), torch.bfloat16, id="1024x1x256x256-bf16",
                 marks=needs_gpu),
    pytest.param((1024, 1, 256, 256), torch.float16, id="1024x1x256x256-fp16",
                 marks=needs_gpu),
    pytest.param((256, 1, 1024, 256), torch.bfloat16, id="256x1x1024x256-bf16",
                 marks=needs_gpu),
    pytest.param((2, 1, 256, 256), torch.bfloat16, id="2x1x256x256-bf16", marks=needs_gpu),
]


@pytest.mark.parametrize("provider", ["triton", "torch"])
@pytest.mark.parametrize("shape, dtype", ATTENTION_CASES)
def test_attention(bench, provider, shape, dtype):
    B, H, T, D = shape
    q, k, v = (torch.randn(shape, device=DEVICE, dtype=dtype) for _ in range(3))
    if provider == "triton":
        def fn():
            kernels.attention(q, k, v)
    else:
        def fn():
            F.scaled_dot_product_attention(q, k, v)
    # q k^T and p v: two (T x D) by (D x T)-sized products per (batch, head).
    flops = 4 * B * H * T * T * D
    bench(fn, what="attention", backend=provider, batch=B, flops=flops, shape=list(shape),
          dtype=str(dtype).removeprefix("torch."))
