"""kernels.group_norm against GroupNorm written out in float64.

On a machine without CUDA the kernels run under TRITON_INTERPRET=1 (set by the root
conftest.py) on small shapes; the real U-Net shapes need a GPU.
"""

import pytest
import torch

pytest.importorskip("triton")

from kernels import group_norm  # noqa: E402
from kernels.group_norm import default_split  # noqa: E402
from tests.kernels.common import DEVICE  # noqa: E402

# Output rounding dominates: about one unit in the last place of each dtype.
TOLERANCE = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=1.6e-2, rtol=1.6e-2),
}
DTYPES = list(TOLERANCE)
LAYOUTS = [torch.contiguous_format, torch.channels_last]


def reference(x, weight, bias, num_groups, eps, silu, add):
    """(x + add) normalized per (sample, group) by its mean and biased variance, in float64."""
    N, C, H, W = x.shape
    x = x.double()
    if add is not None:
        x = x + add.double()[:, :, None, None]
    groups = x.reshape(N, num_groups, -1)
    mean = groups.mean(dim=-1, keepdim=True)
    var = ((groups - mean) ** 2).mean(dim=-1, keepdim=True)
    y = ((groups - mean) / torch.sqrt(var + eps)).reshape(N, C, H, W)
    if weight is not None:
        y = y * weight.double()[None, :, None, None]
    if bias is not None:
        y = y + bias.double()[None, :, None, None]
    if silu:
        y = y * torch.sigmoid(y)
    return y


def make_inputs(shape, dtype, layout, *, affine=True, add=True, scale=1.0, offset=0.0):
    N, C, H, W = shape
    x = (offset + scale * torch.randn(shape, device=DEVICE)).to(dtype)
    x = x.contiguous(memory_format=layout)
    weight = torch.randn(C, device=DEVICE, dtype=dtype) if affine else None
    bias = torch.randn(C, device=DEVICE, dtype=dtype) if affine else None
    # The time-embedding projection arrives in float32 whatever the activations' dtype.
    shift = torch.randn(N, C, device=DEVICE) if add else None
    return x, weight, bias, shift


def poisoned_like(x):
    return torch.full_like(x, float("nan"), memory_format=torch.preserve_format)


def check(x, weight, bias, num_groups, *, silu, add, split, eps=1e-5, tolerance=None):
    out = poisoned_like(x)
    result = group_norm(x, weight, bias, num_groups, eps, silu=silu, add=add, out=out,
                        split=split)
    assert result is out
    assert not out.isnan().any(), "some outputs were never written"
    expected = reference(x, weight, bias, num_groups, eps, silu, add)
    torch.testing.assert_close(out.double(), expected, **(tolerance or TOLERANCE[x.dtype]))


# (N, C, H, W, groups): non-power-of-two channels per group and odd H, W; one group
# larger than a register tile (24 x 96 x 4 channels), which takes the looped path.
SHAPES = [
    (2, 96, 5, 7, 32),
    (2, 48, 8, 8, 16),
    (1, 40, 16, 16, 8),
    (3, 64, 1, 1, 32),
    (1, 8, 48, 96, 2),
]


@pytest.mark.parametrize("layout", LAYOUTS, ids=["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_fused_path_matches_reference(shape, dtype, layout):
    *size, groups = shape
    x, weight, bias, add = make_inputs(size, dtype, layout)
    check(x, weight, bias, groups, silu=True, add=add, split=1)


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no_affine"])
@pytest.mark.parametrize("with_add", [True, False], ids=["add", "no_add"])
@pytest.mark.parametrize("silu", [True, False], ids=["silu", "no_silu"])
def test_each_fusion_option(silu, with_add, affine):
    x, weight, bias, add = make_inputs((2, 48, 6, 5), torch.float16, torch.channels_last,
                                       affine=affine, add=with_add)
    check(x, weight, bias, 8, silu=silu, add=add, split=1)


# (N, C, H, W, groups, chunks per group): chunks that do not divide H*W, and more chunks
# than rows (clamped to one row each).
SPLIT_SHAPES = [
    (1, 32, 9, 9, 4, 3),
    (2, 40, 5, 7, 8, 4),
    (1, 16, 16, 16, 2, 5),
    (1, 12, 3, 3, 3, 100),
]


@pytest.mark.parametrize("layout", LAYOUTS, ids=["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SPLIT_SHAPES, ids=str)
def test_split_path_matches_reference(shape, dtype, layout):
    *size, groups, chunks = shape
    x, weight, bias, add = make_inputs(size, dtype, layout)
    check(x, weight, bias, groups, silu=True, add=add, split=chunks)


@pytest.mark.parametrize("split", [1, 3], ids=["fused", "split"])
@pytest.mark.parametrize("offset, scale", [(1000.0, 4.0), (30000.0, 32.0)],
                         ids=["mean1e3", "mean3e4"])
def test_fp16_large_magnitude_small_spread(offset, scale, split):
    # E[x^2] - E[x]^2 loses the variance here even in float32; fp16 sums would overflow.
    x, weight, bias, _ = make_inputs((2, 64, 8, 8), torch.float16, torch.contiguous_format,
                                     scale=scale, offset=offset)
    check(x, weight, bias, 16, silu=False, add=None, split=split)


def test_add_may_be_strided_and_of_another_dtype():
    x, weight, bias, _ = make_inputs((2, 32, 4, 4), torch.bfloat16, torch.channels_last)
    add = torch.randn(32, 2, device=DEVICE, dtype=torch.float16).t()
    check(x, weight, bias, 8, silu=True, add=add, split=1)


@pytest.mark.parametrize("layout", LAYOUTS, ids=["nchw", "channels_last"])
def test_output_keeps_the_input_memory_format(layout):
    x, weight, bias, add = make_inputs((2, 32, 4, 6), torch.float32, layout)
    out = group_norm(x, weight, bias, 8, add=add)
    assert out.stride() == x.stride()
    torch.testing.assert_close(out.double(), reference(x, weight, bias, 8, 1e-5, False, add),
                               **TOLERANCE[torch.float32])


def test_rejects_channels_that_do_not_split_into_groups():
    x = torch.randn(1, 30, 2, 2, device=DEVICE)
    with pytest.raises(ValueError, match="groups"):
        group_norm(x, None, None, 8)


@pytest.mark.gpu
@pytest.mark.parametrize("layout", LAYOUTS, ids=["nchw", "channels_last"])
@pytest.mark.parametrize("shape", [
    (1024, 256, 16, 16, 32),
    (256, 128, 32, 32, 32),
    (2, 256, 32, 32, 32),     # N x groups below the multiprocessor count: split path
    (2, 128, 64, 64, 32),
    (8, 512, 8, 8, 32),
], ids=str)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_real_shapes_on_gpu(shape, dtype, layout):
    *size, groups = shape
    x, weight, bias, add = make_inputs(size, dtype, layout)
    check(x, weight, bias, groups, silu=True, add=add, split=None)


@pytest.mark.gpu
def test_automatic_split_engages_and_agrees_with_fused():
    x, weight, bias, add = make_inputs((2, 256, 32, 32), torch.bfloat16, torch.channels_last)
    assert default_split(x, 32) > 1
    fused = group_norm(x, weight, bias, 32, silu=True, add=add, split=1)
    automatic = group_norm(x, weight, bias, 32, silu=True, add=add)
    torch.testing.assert_close(automatic, fused, **TOLERANCE[torch.bfloat16])
