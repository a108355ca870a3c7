"""The fused U-Net against the eager reference, same weights, random inputs.

On the CPU the Triton kernels run in the interpreter (TRITON_INTERPRET=1, set by the
repo-root conftest), which is slow: batch 1-2 and small configs. On a GPU the same tests
run natively, plus the real presets.
"""

import pytest
import torch

from engine.config import PRESETS, ModelConfig
from engine.fused import FusedUNet, fuse
from engine.model import UNet

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Non-power-of-two channels (24, 48), 3 channels per group, attention at 8x8, 5 classes.
ODD = ModelConfig(image_size=16, ch=24, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), num_groups=8,
                  num_classes=5, dropout=0.0)
# Per-call ||fused - eager fp32|| / ||eager fp32||.
TOLERANCE = {"fp32": 1e-4, "bf16": 1e-2, "fp16": 1e-2}


@pytest.fixture(autouse=True)
def no_tf32(monkeypatch):
    """On CUDA, fp32 convolutions default to TF32 (~1e-3 relative): the eager fp32 reference and
    the fused fp32 model must both be float32 for the 1e-4 tolerance to mean anything."""
    if torch.cuda.is_available():
        monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
        monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)


def relative_error(a, b):
    return float(torch.linalg.vector_norm(a.double() - b.double()) / torch.linalg.vector_norm(b.double()))


def inputs(config, batch, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, config.in_channels, config.image_size, config.image_size, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    y = torch.randint(0, config.num_classes + 1, (batch,), generator=g)  # the null class too
    return [v.to(DEVICE) for v in (x, t, y)]


def eager_error(model, x, t, y, ref, dtype=torch.bfloat16):
    """The same error for the eager reference run at `dtype` (channels_last, float32 norms)."""
    from engine.backends import EagerModel
    return relative_error(EagerModel(model, dtype)(x, t, y), ref)


def check_error(error, precision, model, x, t, y, ref):
    if precision == "fp32":
        assert error <= TOLERANCE["fp32"], error
        return
    # Half precision itself costs about 1e-2 on these random networks (eager bf16 channels_last
    # gets 1.2e-2 on tiny): the target is 1e-2, or no worse than eager at the same precision.
    baseline = eager_error(model, x, t, y, ref, {"bf16": torch.bfloat16, "fp16": torch.float16}[precision])
    assert error <= max(TOLERANCE[precision], 1.05 * baseline), (error, baseline)
    assert error <= 1.5e-2, error


@pytest.mark.parametrize("config, batch, precision", [
    (PRESETS["tiny"], 1, "fp32"),
    (PRESETS["tiny"], 1, "bf16"),
    (ODD, 2, "fp32"),
    (ODD, 2, "bf16"),
], ids=["tiny-fp32", "tiny-bf16", "odd-fp32", "odd-bf16"])
def test_fused_matches_eager(config, batch, precision):
    torch.manual_seed(batch)
    model = UNet(config).eval().to(DEVICE)
    x, t, y = inputs(config, batch, seed=1)
    with torch.no_grad():
        ref = model(x, t, y)
    out = fuse(model, precision)(x, t, y)
    assert out.dtype == torch.float32 and out.shape == ref.shape and torch.isfinite(out).all()
    check_error(relative_error(out, ref), precision, model, x, t, y, ref)


def test_same_weights_and_names_and_the_reference_untouched():
    model = UNet(ODD).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fused = fuse(model, "bf16", fold_embeddings=False)
    assert isinstance(fused, FusedUNet) and set(fused.state_dict()) == set(before)
    for k, v in fused.state_dict().items():
        assert torch.equal(v.float(), before[k].to(v.dtype).float()), k
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert next(fused.conv_out.parameters()).dtype == torch.bfloat16
    assert fused.conv_out.weight.is_contiguous(memory_format=torch.channels_last)


def test_folded_embeddings_equal_per_block_projections():
    model = UNet(ODD).eval()
    fused = fuse(model, "fp32", fold_embeddings=True)
    emb = torch.randn(3, ODD.time_embed_dim)
    folded = fused.block_embeddings(emb)
    fused.fold_embeddings = False
    for a, b in zip(folded, fused.block_embeddings(emb)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert len(folded) == len(fused.res_blocks)


def test_unknown_precision_is_refused():
    with pytest.raises(ValueError, match="unknown precision"):
        fuse(UNet(ODD), "fp8")


@pytest.mark.gpu
@pytest.mark.parametrize("preset", ["cifar10-compact", "ddpm-cifar10", "ddpm-stl10"])
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_real_presets_on_the_gpu(preset, precision):
    config = PRESETS[preset]
    torch.manual_seed(0)
    model = UNet(config).eval().cuda()
    fused = fuse(model, precision)
    for seed, batch in ((1, 2), (2, 64)):
        x, t, y = inputs(config, batch, seed)
        with torch.no_grad():
            ref = model(x, t, y)
        check_error(relative_error(fused(x, t, y), ref), precision, model, x, t, y, ref)
