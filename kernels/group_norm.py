"""Fused GroupNorm: out = GroupNorm(x + add[:, :, None, None]) * weight + bias, then SiLU.

One pass over memory instead of torch's three (add, group_norm, silu) plus the layout
conversions it makes around channels_last inputs. A group of sample n is viewed as an
(H*W, C/G) matrix with strides (stride of W, stride of C), so NCHW (H*W axis contiguous)
and channels_last (channel axis contiguous) share one kernel, and the output is written
in the input's own layout.

Statistics are float32 whatever the input dtype, and the variance is the mean of squared
deviations from a mean computed first (never E[x^2] - E[x]^2, which cancels
catastrophically for fp16 activations of large magnitude and small spread).

Two paths:
- fused: one program per (sample, group); a group that fits in registers is read once.
- split: when N * G programs would leave multiprocessors idle, each group's rows are cut
  into chunks; `_partial_stats_kernel` writes (mean, M2) per chunk and
  `_normalize_chunks_kernel` merges them (Chan et al.'s parallel variance) and
  normalizes its chunk. No atomics, so results are deterministic.

Loop trip counts are constexpr (NUM_BLOCKS): triton 3.6's interpreter cannot take a loop
bound from a runtime argument under numpy >= 2.4 (triton-lang/triton#9171). It costs one
compilation per distinct H*W, of which a U-Net has a handful.
"""

import functools

import torch
import triton
import triton.language as tl

# Largest group (elements) normalized from registers with a single read.
_MAX_TILE = 16384
# Tile (elements) streamed per loop iteration when a group does not fit.
_LOOP_TILE = 4096
# A split chunk is never shorter than this many rows of H*W.
_MIN_SPLIT_ROWS = 64


@triton.jit
def _load_rows(x_ptr, add_ptr, n, c0, Cg, row0, row_end,
               stride_xn, stride_xc, stride_xhw, stride_an, stride_ac,
               HAS_ADD: tl.constexpr, BLOCK_HW: tl.constexpr, BLOCK_C: tl.constexpr):
    """Rows [row0, min(row0 + BLOCK_HW, row_end)) of group channels c0..c0+Cg, as float32."""
    rows = row0 + tl.arange(0, BLOCK_HW)[:, None]
    cols = tl.arange(0, BLOCK_C)[None, :]
    mask = (rows < row_end) & (cols < Cg)
    ptrs = x_ptr + n * stride_xn + (c0 + cols) * stride_xc + rows * stride_xhw
    x = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    if HAS_ADD:
        a = tl.load(add_ptr + n * stride_an + (c0 + cols) * stride_ac, mask=cols < Cg, other=0.0)
        x = tl.where(mask, x + a.to(tl.float32), 0.0)
    return x, mask


@triton.jit
def _store_rows(out_ptr, y, n, c0, Cg, row0, row_end, stride_on, stride_oc, stride_ohw,
                BLOCK_HW: tl.constexpr, BLOCK_C: tl.constexpr):
    rows = row0 + tl.arange(0, BLOCK_HW)[:, None]
    cols = tl.arange(0, BLOCK_C)[None, :]
    mask = (rows < row_end) & (cols < Cg)
    ptrs = out_ptr + n * stride_on + (c0 + cols) * stride_oc + rows * stride_ohw
    tl.store(ptrs, y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _load_affine(w_ptr, b_ptr, c0, Cg, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
                 BLOCK_C: tl.constexpr):
    cols = tl.arange(0, BLOCK_C)[None, :]
    if HAS_WEIGHT:
        w = tl.load(w_ptr + c0 + cols, mask=cols < Cg, other=0.0).to(tl.float32)
    else:
        w = tl.full([1, BLOCK_C], 1.0, tl.float32)
    if HAS_BIAS:
        b = tl.load(b_ptr + c0 + cols, mask=cols < Cg, other=0.0).to(tl.float32)
    else:
        b = tl.zeros([1, BLOCK_C], tl.float32)
    return w, b


@triton.jit
def _affine_silu(x_hat, w, b, SILU: tl.constexpr):
    y = x_hat * w + b
    if SILU:
        y = y * tl.sigmoid(y)
    return y


@triton.jit
def _rows_mean_m2(x_ptr, add_ptr, n, c0, Cg, row0, row_end,
                  stride_xn, stride_xc, stride_xhw, stride_an, stride_ac,
                  HAS_ADD: tl.constexpr, NUM_BLOCKS: tl.constexpr,
                  BLOCK_HW: tl.constexpr, BLOCK_C: tl.constexpr):
    """Mean and sum of squared deviations (M2) over rows [row0, row_end), two passes."""
    total = tl.zeros([BLOCK_HW, BLOCK_C], tl.float32)
    for i in range(NUM_BLOCKS):
        x, mask = _load_rows(x_ptr, add_ptr, n, c0, Cg, row0 + i * BLOCK_HW, row_end,
                             stride_xn, stride_xc, stride_xhw, stride_an, stride_ac,
                             HAS_ADD, BLOCK_HW, BLOCK_C)
        total += x
    mean = tl.sum(total) / ((row_end - row0) * Cg)
    squares = tl.zeros([BLOCK_HW, BLOCK_C], tl.float32)
    for i in range(NUM_BLOCKS):
        x, mask = _load_rows(x_ptr, add_ptr, n, c0, Cg, row0 + i * BLOCK_HW, row_end,
                             stride_xn, stride_xc, stride_xhw, stride_an, stride_ac,
                             HAS_ADD, BLOCK_HW, BLOCK_C)
        d = tl.where(mask, x - mean, 0.0)
        squares += d * d
    return mean, tl.sum(squares)


@triton.jit
def _normalize_rows(x_ptr, add_ptr, w, b, out_ptr, n, c0, Cg, row0, row_end, mean, rstd,
                    stride_xn, stride_xc, stride_xhw, stride_an, stride_ac,
                    stride_on, stride_oc, stride_ohw,
                    HAS_ADD: tl.constexpr, SILU: tl.constexpr, NUM_BLOCKS: tl.constexpr,
                    BLOCK_HW: tl.constexpr, BLOCK_C: tl.constexpr):
    for i in range(NUM_BLOCKS):
        x, mask = _load_rows(x_ptr, add_ptr, n, c0, Cg, row0 + i * BLOCK_HW, row_end,
                             stride_xn, stride_xc, stride_xhw, stride_an, stride_ac,
                             HAS_ADD, BLOCK_HW, BLOCK_C)
        y = _affine_silu((x - mean) * rstd, w, b, SILU)
        _store_rows(out_ptr, y, n, c0, Cg, row0 + i * BLOCK_HW, row_end,
                    stride_on, stride_oc, stride_ohw, BLOCK_HW, BLOCK_C)


@triton.jit
def _group_norm_kernel(x_ptr, add_ptr, w_ptr, b_ptr, out_ptr,
                       HW, Cg, G, eps,
                       stride_xn, stride_xc, stride_xhw, stride_an, stride_ac,
                       stride_on, stride_oc, stride_ohw,
                       HAS_ADD: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
                       SILU: tl.constexpr, SINGLE_TILE: tl.constexpr, NUM_BLOCKS: tl.constexpr,
                       BLOCK_HW: tl.constexpr, BLOCK_C: tl.constexpr):
    """One program normalizes one (sample, group)."""
    pid = tl.program_id(0)
    n = (pid // G).to(tl.int64)
    c0 = (pid % G) * Cg
    w, b = _load_affine(w_ptr, b_ptr, c0, Cg, HAS_WEIGHT, HAS_BIAS, BLOCK_C)
    count = HW * Cg
    if SINGLE_TILE:
        # The whole group stays in registers: one read, one write.
        x, mask = _load_rows(x_ptr, add_ptr, n, c0, Cg, 0, HW,
                             stride_xn, stride_xc, stride_xhw, stride_an, stride_ac,
                             HAS_ADD, BLOCK_HW, BLOCK_C)
        mean = tl.sum(x) / count
        d = tl.where(mask, x - mean, 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(d * d) / count + eps)
        y = _affine_silu(d * rstd, w, b, SILU)
        _store_rows(out_ptr, y, n, c0, Cg, 0, HW, stride_on, stride_oc, stride_ohw,
                    BLOCK_HW, BLOCK_C)
    else:
        mean, m2 = _rows_mean_m2(x_ptr, add_ptr, n, c0, Cg, 0, HW,
                                 stride_xn, stride_xc, stride_xhw, stride_an, stride_ac,
                                 HAS_ADD, NUM_BLOCKS, BLOCK_HW, BLOCK_C)
        rstd = 1.0 / tl.sqrt(m2 / count + eps)
        _normalize_rows(x_ptr, add_ptr, w, b, out_ptr, n, c0, Cg, 0, HW, mean, rstd,
                        stride_xn, stride_xc, stride_xhw, stride_an, stride_ac,
                        stride_on, stride_oc, stride_ohw,
                        HAS_ADD, SILU, NUM_BLOCKS, BLOCK_HW, BLOCK_C)


@triton.jit
def _partial_stats_kernel(x_ptr, add_ptr, stats_ptr,
                          HW, Cg, G, chunk_rows,
                          stride_xn, stride_xc, stride_xhw, stride_an, stride_ac,
                          HAS_ADD: tl.constexpr, NUM_BLOCKS: tl.constexpr,
                          BLOCK_HW: tl.constexpr, BLOCK_C: tl.constexpr):
    """Split path, step 1: (mean, M2) of rows chunk s of group (n, g) into stats[n*G+g, s]."""
    pid = tl.program_id(0)
    s = tl.program_id(1)
    num_chunks = tl.num_programs(1)
    n = (pid // G).to(tl.int64)
    c0 = (pid % G) * Cg
    row0 = s * chunk_rows
    row_end = tl.minimum(row0 + chunk_rows, HW)
    mean, m2 = _rows_mean_m2(x_ptr, add_ptr, n, c0, Cg, row0, row_end,
                             stride_xn, stride_xc, stride_xhw, stride_an, stride_ac,
                             HAS_ADD, NUM_BLOCKS, BLOCK_HW, BLOCK_C)
    base = stats_ptr + (pid * num_chunks + s) * 2
    tl.store(base, mean)
    tl.store(base + 1, m2)


@triton.jit
def _normalize_chunks_kernel(x_ptr, add_ptr, w_ptr, b_ptr, out_ptr, stats_ptr,
                             HW, Cg, G, chunk_rows, eps,
                             stride_xn, stride_xc, stride_xhw, stride_an, stride_ac,
                             stride_on, stride_oc, stride_ohw,
                             HAS_ADD: tl.constexpr, HAS_WEIGHT: tl.constexpr,
                             HAS_BIAS: tl.constexpr, SILU: tl.constexpr,
                             NUM_BLOCKS: tl.constexpr, BLOCK_S: tl.constexpr,
                             BLOCK_HW: tl.constexpr, BLOCK_C: tl.constexpr):
    """Split path, step 2: merge the group's chunk statistics, normalize chunk s."""
    pid = tl.program_id(0)
    s = tl.program_id(1)
    num_chunks = tl.num_programs(1)
    n = (pid // G).to(tl.int64)
    c0 = (pid % G) * Cg

    # Chan et al.: mean = sum(n_i mean_i) / n, M2 = sum(M2_i + n_i (mean_i - mean)^2).
    chunk = tl.arange(0, BLOCK_S)
    valid = chunk < num_chunks
    base = stats_ptr + (pid * num_chunks + chunk) * 2
    chunk_mean = tl.load(base, mask=valid, other=0.0)
    chunk_m2 = tl.load(base + 1, mask=valid, other=0.0)
    chunk_count = (tl.minimum(chunk_rows, HW - chunk * chunk_rows) * Cg).to(tl.float32)
    chunk_count = tl.where(valid, chunk_count, 0.0)
    count = HW * Cg
    mean = tl.sum(chunk_count * chunk_mean) / count
    spread = chunk_mean - mean
    m2 = tl.sum(chunk_m2 + chunk_count * spread * spread)
    rstd = 1.0 / tl.sqrt(m2 / count + eps)

    w, b = _load_affine(w_ptr, b_ptr, c0, Cg, HAS_WEIGHT, HAS_BIAS, BLOCK_C)
    row0 = s * chunk_rows
    row_end = tl.minimum(row0 + chunk_rows, HW)
    _normalize_rows(x_ptr, add_ptr, w, b, out_ptr, n, c0, Cg, row0, row_end, mean, rstd,
                    stride_xn, stride_xc, stride_xhw, stride_an, stride_ac,
                    stride_on, stride_oc, stride_ohw,
                    HAS_ADD, SILU, NUM_BLOCKS, BLOCK_HW, BLOCK_C)


@functools.lru_cache(maxsize=None)
def _multiprocessor_count(device_index):
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def default_split(x, num_groups):
    """Chunks per group: enough programs for about two waves, 1 off the GPU or when full."""
    if not x.is_cuda:
        return 1
    num_sm = _multiprocessor_count(x.device.index if x.device.index is not None else 0)
    programs = x.shape[0] * num_groups
    if programs >= num_sm:
        return 1
    hw = x.shape[2] * x.shape[3]
    return max(1, min(triton.cdiv(2 * num_sm, programs), hw // _MIN_SPLIT_ROWS))


def _hw_stride(t):
    """Stride of the flattened H*W index; H and W must merge (true for NCHW and NHWC)."""
    n, c, h, w = t.shape
    if h > 1 and t.stride(2) != w * t.stride(3):
        raise ValueError(f"H and W of a tensor with strides {t.stride()} do not merge")
    return t.stride(3) if w > 1 else t.stride(2)


def _num_warps(tile_elements):
    return max(1, min(16, tile_elements // 512))


def group_norm(x, weight, bias, num_groups, eps=1e-5, *, silu=False, add=None, out=None,
               split=None):
    """GroupNorm(x + add[:, :, None, None]) * weight + bias, then SiLU if `silu`.

    x: (N, C, H, W), NCHW-contiguous or channels_last (other layouts are copied to
    NCHW first), fp32/fp16/bf16.
    weight, bias: (C,) or None (identity affine). add: (N, C) or None, any float dtype.
    out: optional destination of x's shape and dtype; by default a tensor in x's memory
    format. split: chunks per group (1 = fused single-kernel path); None picks from the
    device's multiprocessor count.
    """
    if x.dim() != 4:
        raise ValueError(f"expected an (N, C, H, W) tensor, got shape {tuple(x.shape)}")
    N, C, H, W = x.shape
    if C % num_groups:
        raise ValueError(f"{C} channels do not split into {num_groups} groups")
    if not (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)):
        x = x.contiguous()
    if out is None:
        out = torch.empty_like(x, memory_format=torch.preserve_format)
    elif out.shape != x.shape or out.dtype != x.dtype:
        raise ValueError(f"out must be {tuple(x.shape)} {x.dtype}, got "
                         f"{tuple(out.shape)} {out.dtype}")
    if add is not None and add.shape != (N, C):
        raise ValueError(f"add must be ({N}, {C}), got {tuple(add.shape)}")
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None and p.shape != (C,):
            raise ValueError(f"{name} must be ({C},), got {tuple(p.shape)}")
    if weight is not None:
        weight = weight.contiguous()
    if bias is not None:
        bias = bias.contiguous()

    HW, Cg, G = H * W, C // num_groups, num_groups
    if N * HW * C == 0:
        return out
    has_add = add is not None
    # Unused pointers still need a tensor; x stands in, never dereferenced.
    add_arg = add if has_add else x
    stride_an, stride_ac = (add.stride(0), add.stride(1)) if has_add else (0, 0)
    x_strides = (x.stride(0), x.stride(1), _hw_stride(x), stride_an, stride_ac)
    out_strides = (out.stride(0), out.stride(1), _hw_stride(out))
    flags = dict(HAS_ADD=has_add, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
                 SILU=silu)

    block_c = triton.next_power_of_2(Cg)
    num_chunks = default_split(x, G) if split is None else max(1, min(split, HW))
    if num_chunks == 1:
        rows_pow2 = triton.next_power_of_2(HW)
        single_tile = rows_pow2 * block_c <= _MAX_TILE
        block_hw = rows_pow2 if single_tile else max(1, _LOOP_TILE // block_c)
        _group_norm_kernel[(N * G,)](
            x, add_arg, weight if weight is not None else x, bias if bias is not None else x,
            out, HW, Cg, G, eps, *x_strides, *out_strides,
            SINGLE_TILE=single_tile, NUM_BLOCKS=triton.cdiv(HW, block_hw),
            BLOCK_HW=block_hw, BLOCK_C=block_c,
            num_warps=_num_warps(block_hw * block_c), **flags)
        return out

    chunk_rows = triton.cdiv(HW, num_chunks)
    num_chunks = triton.cdiv(HW, chunk_rows)  # no empty chunks
    block_hw = min(triton.next_power_of_2(chunk_rows), max(1, _LOOP_TILE // block_c))
    num_blocks = triton.cdiv(chunk_rows, block_hw)
    num_warps = _num_warps(block_hw * block_c)
    stats = torch.empty((N * G, num_chunks, 2), device=x.device, dtype=torch.float32)
    grid = (N * G, num_chunks)
    _partial_stats_kernel[grid](
        x, add_arg, stats, HW, Cg, G, chunk_rows, *x_strides,
        HAS_ADD=has_add, NUM_BLOCKS=num_blocks, BLOCK_HW=block_hw, BLOCK_C=block_c,
        num_warps=num_warps)
    _normalize_chunks_kernel[grid](
        x, add_arg, weight if weight is not None else x, bias if bias is not None else x,
        out, stats, HW, Cg, G, chunk_rows, eps, *x_strides, *out_strides,
        NUM_BLOCKS=num_blocks, BLOCK_S=triton.next_power_of_2(num_chunks),
        BLOCK_HW=block_hw, BLOCK_C=block_c,
        num_warps=num_warps, **flags)
    return out
