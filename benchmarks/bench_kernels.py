"""The fused Triton kernels against torch at the U-Net's shapes.

On CUDA each case is timed with CUDA events after warm-up; `extra_info` holds the median,
min and max in ms, the effective bandwidth (bytes read + written) of GroupNorm or the
TFLOP/s of attention, and their fraction of the H200 ceilings measured in
../shared/GPU.md. The first call, which includes Triton's compilation, is reported
separately. pytest-benchmark's own table shows the host time of a synchronised call.

On the CPU the kernels run under TRITON_INTERPRET=1: one tiny shape per kernel and a few
rounds prove the benchmark runs; the real shapes are skipped. Nothing asserts a speed.
"""

import time

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

import kernels  # noqa: E402

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
needs_gpu = pytest.mark.skipif(
    not ON_GPU, reason="real shapes need a GPU; on the CPU only the tiny interpreter case runs")

# H200 ceilings measured 2026-11-28 (../shared/GPU.md).
COPY_BYTES_PER_S = 4.19e12
BF16_MATMUL_FLOP_PER_S = 778.7e12

WARMUP, ROUNDS = (10, 50) if ON_GPU else (1, 2)


def cuda_event_ms(fn, warmup=WARMUP, rounds=ROUNDS):
    """Per-call device times in ms, one pair of CUDA events per call."""
    for _ in range(warmup):
        fn()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(rounds)]
    torch.cuda.synchronize()
    for start, end in events:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return sorted(start.elapsed_time(end) for start, end in events)


def synchronized(fn):
    def call():
        fn()
        if ON_GPU:
            torch.cuda.synchronize()
    return call


def measure(benchmark, fn, *, bytes_moved=None, flops=None, flop_ceiling=None):
    """Run `fn` under pytest-benchmark and, on CUDA, record event timings and rates."""
    start = time.perf_counter()
    synchronized(fn)()
    benchmark.extra_info["first_call_s"] = round(time.perf_counter() - start, 3)
    if ON_GPU:
        times = cuda_event_ms(fn)
        median = times[len(times) // 2]
        benchmark.extra_info.update(median_ms=median, min_ms=times[0], max_ms=times[-1])
        if bytes_moved is not None:
            rate = bytes_moved / (median * 1e-3)
            benchmark.extra_info.update(GB_per_s=rate / 1e9,
                                        fraction_of_copy=rate / COPY_BYTES_PER_S)
        if flops is not None:
            rate = flops / (median * 1e-3)
            benchmark.extra_info["TFLOP_per_s"] = rate / 1e12
            if flop_ceiling is not None:
                benchmark.extra_info["fraction_of_matmul_peak"] = rate / flop_ceiling
        print(f"\n{benchmark.name}: {benchmark.extra_info}")
    benchmark.pedantic(synchronized(fn), rounds=ROUNDS, warmup_rounds=WARMUP)


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
def test_group_norm_silu(benchmark, provider, shape, groups, dtype, layout, fuse_add):
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
    benchmark.extra_info.update(shape=list(shape), dtype=str(dtype), layout=str(layout))
    measure(benchmark, fn, bytes_moved=bytes_moved)


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
def test_attention(benchmark, provider, shape, dtype):
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
    ceiling = BF16_MATMUL_FLOP_PER_S if dtype in (torch.bfloat16, torch.float16) else None
    benchmark.extra_info.update(shape=list(shape), dtype=str(dtype))
    measure(benchmark, fn, flops=flops, flop_ceiling=ceiling)
