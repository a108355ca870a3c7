"""kernels.attention against softmax(q k^T / sqrt(d)) v written out in float64.

On a machine without CUDA the kernel runs under TRITON_INTERPRET=1 (set by the root
conftest.py) on small shapes; the real U-Net shapes need a GPU.
"""

import math

import pytest
import torch

pytest.importorskip("triton")

from kernels import attention  # noqa: E402
from tests.kernels.common import DEVICE  # noqa: E402

# fp16/bf16 also round the softmax weights to the input dtype before the p @ v product.
TOLERANCE = {
    torch.float32: dict(atol=2e-5, rtol=1e-4),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
}
DTYPES = list(TOLERANCE)


def reference(q, k, v):
    """Softmax attention in float64, the maximum subtracted before exponentiating."""
    q, k, v = q.double(), k.double(), v.double()
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    weights = torch.exp(scores - scores.amax(dim=-1, keepdim=True))
    weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights @ v


def randn(*shape, dtype, scale=1.0):
    return (scale * torch.randn(shape, device=DEVICE)).to(dtype)


def check(q, k, v, *, out=None, tolerance=None):
    if out is None:
        out = torch.full(q.shape, float("nan"), device=q.device, dtype=q.dtype)
    result = attention(q, k, v, out=out)
    assert result is out
    assert out.dtype == q.dtype
    assert not out.isnan().any(), "some outputs were never written"
    torch.testing.assert_close(out.double(), reference(q, k, v),
                               **(tolerance or TOLERANCE[q.dtype]))


# (batch, heads, tokens, head_dim): token counts off the block sizes, head dims that are
# not powers of two (48, 96, 192) and the U-Net's single-head 256.
SHAPES = [
    (1, 2, 16, 32),
    (2, 1, 100, 48),
    (1, 2, 256, 64),
    (1, 1, 64, 96),
    (1, 1, 100, 128),
    (1, 1, 48, 192),
    (1, 1, 256, 256),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_reference(shape, dtype):
    q, k, v = (randn(*shape, dtype=dtype) for _ in range(3))
    check(q, k, v)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_large_logits_stay_finite(dtype):
    # Logits of about +-1e3: exp without the running maximum would overflow.
    q = randn(1, 2, 100, 64, dtype=dtype, scale=30.0)
    k = randn(1, 2, 100, 64, dtype=dtype, scale=30.0)
    v = randn(1, 2, 100, 64, dtype=dtype)
    logits = (q.double() @ k.double().transpose(-1, -2)) / 8.0
    assert logits.abs().max() > 1e3
    # Scores near 1e3 carry ~1e-4 absolute float32 error, which exp turns into relative
    # error of the weights: float32 cannot meet its usual tolerance here.
    loose = dict(atol=2e-3, rtol=2e-3) if dtype == torch.float32 else None
    check(q, k, v, tolerance=loose)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_strided_inputs_and_output(dtype):
    B, H, T, D = 2, 3, 40, 48
    # q and the output in (B, T, H, D) memory, k a slice of a wider buffer, v with a
    # head-dim stride of 2.
    q = randn(B, T, H, D, dtype=dtype).transpose(1, 2)
    k = randn(B, H, T + 7, D, dtype=dtype)[:, :, 3:T + 3]
    v = randn(B, H, T, 2 * D, dtype=dtype)[..., ::2]
    out = torch.full((B, T, H, D), float("nan"), device=DEVICE, dtype=dtype).transpose(1, 2)
    check(q, k, v, out=out)


def test_queries_and_keys_may_differ_in_length():
    q = randn(1, 2, 20, 64, dtype=torch.float16)
    k = randn(1, 2, 70, 64, dtype=torch.float16)
    v = randn(1, 2, 70, 64, dtype=torch.float16)
    check(q, k, v)


def test_default_output_has_the_input_dtype_and_shape():
    q = randn(1, 1, 16, 32, dtype=torch.bfloat16)
    out = attention(q, q, q)
    assert out.shape == q.shape and out.dtype == torch.bfloat16


def test_rejects_head_dims_above_256():
    q = randn(1, 1, 16, 320, dtype=torch.float16)
    with pytest.raises(ValueError, match="256"):
        attention(q, q, q)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [
    (1024, 1, 256, 256),
    (256, 1, 1024, 256),
    (64, 4, 256, 64),
    (16, 2, 1024, 128),
    (8, 1, 1024, 192),
], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_real_shapes_on_gpu(shape, dtype):
    q, k, v = (randn(*shape, dtype=dtype) for _ in range(3))
    check(q, k, v)
