"""Fused attention, softmax(q k^T / sqrt(d)) v, flash-attention style.

Each program owns BLOCK_M query rows of one (batch, head) and streams the keys and
values in blocks of BLOCK_N, keeping a running row maximum m and normaliser l
(online softmax, Milakov & Gimelshein 2018; Dao et al. 2022, Algorithm 1), so the
T x T score matrix never reaches memory. Scores, the softmax and the output accumulator
are float32 whatever the input dtype; subtracting the running maximum before
exponentiating keeps large logits finite. Head dims that are not a power of two are
padded to one with masked (zero) loads.

Loop trip counts are constexpr (NUM_KV_BLOCKS): triton 3.6's interpreter cannot take a
loop bound from a runtime argument under numpy >= 2.4 (triton-lang/triton#9171). It costs
one compilation per distinct token count, of which a U-Net has a handful.
"""

import math

import torch
import triton
import triton.language as tl

_LOG2E = 1.4426950408889634


@triton.jit
def _attention_kernel(q_ptr, k_ptr, v_ptr, out_ptr,
                      num_heads, q_tokens, kv_tokens, head_dim, qk_scale,
                      stride_qb, stride_qh, stride_qt, stride_qd,
                      stride_kb, stride_kh, stride_kt, stride_kd,
                      stride_vb, stride_vh, stride_vt, stride_vd,
                      stride_ob, stride_oh, stride_ot, stride_od,
                      DOT_IN_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr,
                      NUM_KV_BLOCKS: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    # One flat grid (axis 1 would cap batch x heads at 65535); neighbouring programs share
    # a (batch, head) and so its keys and values in L2.
    pid = tl.program_id(0)
    num_m_blocks = tl.cdiv(q_tokens, BLOCK_M)
    start_m = (pid % num_m_blocks) * BLOCK_M
    batch_head = pid // num_m_blocks
    b = (batch_head // num_heads).to(tl.int64)
    h = (batch_head % num_heads).to(tl.int64)
    q_ptr += b * stride_qb + h * stride_qh
    k_ptr += b * stride_kb + h * stride_kh
    v_ptr += b * stride_vb + h * stride_vh
    out_ptr += b * stride_ob + h * stride_oh

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_valid = offs_d < head_dim
    q = tl.load(q_ptr + offs_m[:, None] * stride_qt + offs_d[None, :] * stride_qd,
                mask=(offs_m[:, None] < q_tokens) & d_valid[None, :], other=0.0)
    if DOT_IN_FP32:
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for i in range(NUM_KV_BLOCKS):
        keys = i * BLOCK_N + offs_n
        kv_mask = (keys[:, None] < kv_tokens) & d_valid[None, :]
        k = tl.load(k_ptr + keys[:, None] * stride_kt + offs_d[None, :] * stride_kd,
                    mask=kv_mask, other=0.0)
        if DOT_IN_FP32:
            k = k.to(tl.float32)
        # Scores in log2 units: qk_scale folds 1/sqrt(d) and log2(e), so exp2 gives e^x.
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        s = tl.where(keys[None, :] < kv_tokens, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_ptr + keys[:, None] * stride_vt + offs_d[None, :] * stride_vd,
                    mask=kv_mask, other=0.0)
        if DOT_IN_FP32:
            v = v.to(tl.float32)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
        m_i = m_new

    out = acc / l_i[:, None]
    tl.store(out_ptr + offs_m[:, None] * stride_ot + offs_d[None, :] * stride_od,
             out.to(out_ptr.dtype.element_ty),
             mask=(offs_m[:, None] < q_tokens) & d_valid[None, :])


def _launch_config(head_dim_padded, q_tokens, kv_tokens, fp32_dot):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages): tiles shrink as the head dim grows so
    q, the accumulator and a K/V block fit in registers and shared memory (checked for
    sm_90 with ptxas: no spills at these sizes)."""
    if fp32_dot:
        block_m, block_n = (64, 32) if head_dim_padded <= 128 else (32, 32)
        num_warps, num_stages = 8, 2
    elif head_dim_padded <= 64:
        block_m, block_n, num_warps, num_stages = 128, 64, 4, 3
    elif head_dim_padded <= 128:
        block_m, block_n, num_warps, num_stages = 128, 64, 8, 2
    else:
        block_m, block_n, num_warps, num_stages = 64, 32, 8, 2
    # Short sequences: no point padding beyond the tokens (tl.dot needs >= 16).
    block_m = min(block_m, max(16, triton.next_power_of_2(q_tokens)))
    block_n = min(block_n, max(16, triton.next_power_of_2(kv_tokens)))
    return block_m, block_n, num_warps, num_stages


def attention(q, k, v, *, out=None):
    """softmax(q k^T / sqrt(head_dim)) v for q (B, H, Tq, D) and k, v (B, H, Tk, D).

    fp32, fp16 or bf16, any strides; head_dim up to 256. The result has q's dtype, in
    `out` when given (shape (B, H, Tq, D), any strides).
    """
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError("q, k and v must be (batch, heads, tokens, head_dim)")
    B, H, Tq, D = q.shape
    Tk = k.shape[2]
    if k.shape != (B, H, Tk, D) or v.shape != k.shape:
        raise ValueError(f"shapes do not match: q {tuple(q.shape)}, k {tuple(k.shape)}, "
                         f"v {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"dtypes differ: q {q.dtype}, k {k.dtype}, v {v.dtype}")
    if D > 256:
        raise ValueError(f"head_dim {D} is above the supported 256")
    if out is None:
        out = torch.empty((B, H, Tq, D), device=q.device, dtype=q.dtype)
    elif out.shape != (B, H, Tq, D) or out.dtype != q.dtype:
        raise ValueError(f"out must be {(B, H, Tq, D)} {q.dtype}, got "
                         f"{tuple(out.shape)} {out.dtype}")
    if out.numel() == 0:
        return out
    if Tk == 0:
        raise ValueError("attention over zero keys is undefined")

    # CPU tensors run only under TRITON_INTERPRET=1, whose tl.dot mis-multiplies bf16
    # (triton 3.6): there the products are taken in fp32 instead.
    dot_in_fp32 = q.dtype == torch.float32 or (q.dtype == torch.bfloat16 and not q.is_cuda)
    # Applies to fp32 operands only: true fp32 products, as tf32 would cost ~1e-3 relative.
    precision = "ieee" if dot_in_fp32 else "tf32"
    block_d = max(16, triton.next_power_of_2(D))
    block_m, block_n, num_warps, num_stages = _launch_config(block_d, Tq, Tk, dot_in_fp32)
    grid = (triton.cdiv(Tq, block_m) * B * H,)
    _attention_kernel[grid](
        q, k, v, out, H, Tq, Tk, D, _LOG2E / math.sqrt(D),
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        DOT_IN_FP32=dot_in_fp32, DOT_PRECISION=precision,
        NUM_KV_BLOCKS=triton.cdiv(Tk, block_n), BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
        num_warps=num_warps, num_stages=num_stages)
    return out
