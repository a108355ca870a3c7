"""--backend: the same seed gives the same images on every backend available here, and a
backend that cannot run says why in one line."""

import numpy as np
import pytest
import torch

from engine import backends
from engine.apps.cli import main
from engine.backends import BackendError, EagerModel, build_engine, interpreter_on, resolve_backend
from engine.config import PRESETS
from engine.formats.checkpoint import load_checkpoint, save_checkpoint
from engine.model import UNet


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint):
    return tiny_checkpoint


def sample(checkpoint, out, *extra, runs=None, capsys=None):
    code = main(["sample", "--device", "cpu", "--checkpoint", str(checkpoint), "--out", str(out), "--no-progress", "-n", "2",
                 "--sampler", "ddim", "--steps", "2", "--seed", "3", *extra])
    assert code == 0
    if runs is not None:  # what the command says ran, e.g. "(... onnx-fp32 on cpu)"
        assert f"; {runs} on cpu" in capsys.readouterr().out
    return np.load(out / "samples.npz")["x"].astype(int)


@pytest.fixture(scope="module")
def eager_images(checkpoint, tmp_path_factory):
    return sample(checkpoint, tmp_path_factory.mktemp("eager"), "--backend", "eager")


@pytest.mark.parametrize("extra, runs", [
    (["--backend", "auto"], "onnx-fp32"),  # a run over ONNX_MIN_IMAGE_STEPS (lowered below)
    (["--backend", "onnx"], "onnx-fp32"),
    (["--backend", "eager", "--precision", "bf16"], "eager-bf16"),
], ids=["auto", "onnx", "eager-bf16"])
def test_same_seed_same_images_across_backends(checkpoint, eager_images, tmp_path, capsys, monkeypatch, extra, runs):
    pytest.importorskip("onnxruntime")
    monkeypatch.setattr(backends, "ONNX_MIN_IMAGE_STEPS", 4)  # this run: 2 images x 2 steps
    diff = abs(sample(checkpoint, tmp_path / "out", *extra, runs=runs, capsys=capsys) - eager_images)
    # fp32 backends: rounding only; bf16: a few intensity levels.
    assert diff.mean() <= (0.05 if "bf16" not in extra else 2.0) and diff.max() <= 8, (diff.mean(), diff.max())


def test_fused_backend_in_the_interpreter(checkpoint, eager_images, tmp_path, capsys):
    """The fused model (Triton interpreter on the CPU) through the engine's plain step."""
    if not interpreter_on():  # a CUDA machine: conftest.py leaves TRITON_INTERPRET unset there
        pytest.skip("needs TRITON_INTERPRET=1 (set on machines without CUDA); on CUDA the fused model is tested by "
                    "tests/engine/test_graphs.py and test_fused.py")
    out = sample(checkpoint, tmp_path / "out", "--backend", "fused", "--precision", "fp32", runs="fused-fp32",
                 capsys=capsys)
    diff = abs(out - eager_images)
    assert diff.max() <= 1, diff.max()


def test_exported_onnx_checkpoint_samples_like_eager(checkpoint, eager_images, tmp_path):
    pytest.importorskip("onnxruntime")
    from engine.formats.onnx_export import export_onnx

    onnx_path = tmp_path / "tiny.onnx"
    export_onnx(load_checkpoint(checkpoint), onnx_path)
    diff = abs(sample(onnx_path, tmp_path / "out") - eager_images)
    assert diff.max() <= 1


def test_refusals_are_one_line(checkpoint, tmp_path, capsys, monkeypatch):
    def run(*args, path=checkpoint):
        return main(["sample", "--device", "cpu", "--checkpoint", str(path), "--out", str(tmp_path / "o"), "--no-progress", *args])

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert run("--backend", "fused") == 1
    assert "needs a CUDA device" in capsys.readouterr().err
    assert run("--backend", "tensorrt") == 1
    assert "runs a .plan file" in capsys.readouterr().err
    plan = tmp_path / "model.plan"
    plan.write_bytes(b"junk")
    assert run(path=plan) == 1
    err = capsys.readouterr().err
    assert "not a ddpm-engine TensorRT plan" in err and len(err.strip().splitlines()) == 1
    bad_onnx = tmp_path / "model.onnx"
    bad_onnx.write_bytes(b"junk")
    assert run(path=bad_onnx) == 1
    err = capsys.readouterr().err
    assert ("not a readable ONNX model" in err or "needs onnxruntime" in err) and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_cuda_without_a_gpu_is_one_line(checkpoint, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # any machine, GPU or not
    code = main(["sample", "--device", "cuda", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "o"),
                 "--no-progress"])
    err = capsys.readouterr().err
    assert code == 1 and "CUDA is not available" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_an_onnx_checkpoint_only_runs_on_onnx(checkpoint, tmp_path):
    pytest.importorskip("onnxruntime")
    from engine.formats.onnx import load_onnx
    from engine.formats.onnx_export import export_onnx

    path = tmp_path / "m.onnx"
    export_onnx(load_checkpoint(checkpoint), path)
    ckpt = load_onnx(path)
    assert ckpt.runtime == "onnx"
    assert build_engine(ckpt, "auto").name == "onnx-fp32"
    with pytest.raises(BackendError, match="use --backend onnx"):
        build_engine(ckpt, "eager")


def test_auto_choices():
    assert resolve_backend("auto", torch.device("cuda")) == "fused"
    assert resolve_backend("auto", torch.device("cpu"), image_steps=10) == "eager"


def test_auto_precision_is_fp32_on_the_cpu_even_with_bf16_instructions(monkeypatch):
    """bf16 costs FID on the CPU, guided or not (backends.py): it is asked for, never chosen."""
    monkeypatch.setattr(backends, "native_cpu_bf16", lambda: True)
    assert backends.resolve_precision("auto", torch.device("cpu")) == "fp32"
    assert backends.resolve_precision("auto", torch.device("cuda")) == "bf16"


def test_bf16_asked_for_on_the_cpu_runs_eager_even_where_auto_would_pick_onnx(checkpoint, tmp_path, capsys,
                                                                              monkeypatch):
    """ONNX Runtime runs fp32 only: auto with --precision bf16 must not silently sample in fp32."""
    pytest.importorskip("onnxruntime")
    monkeypatch.setattr(backends, "ONNX_MIN_IMAGE_STEPS", 4)  # this run: 2 images x 2 steps
    sample(checkpoint, tmp_path / "a", "--precision", "bf16", runs="eager-bf16", capsys=capsys)
    sample(checkpoint, tmp_path / "b", runs="onnx-fp32", capsys=capsys)
    assert resolve_backend("auto", torch.device("cpu"), image_steps=10**6, precision="bf16") == "eager"


def test_auto_picks_onnx_runtime_for_long_cpu_runs():
    pytest.importorskip("onnxruntime")
    assert resolve_backend("auto", torch.device("cpu"), image_steps=10**6) == "onnx"


def test_eager_bf16_keeps_float32_islands():
    model = EagerModel(UNet(PRESETS["tiny"]), torch.bfloat16)
    assert model.unet.norm_out.weight.dtype == torch.float32 and model.unet.conv_out.weight.dtype == torch.bfloat16
    x = torch.randn(1, 3, 32, 32)
    assert model(x, torch.tensor([3]), torch.tensor([1])).dtype == torch.float32


def test_onnx_graphs_are_cached_by_content(checkpoint, tmp_path, monkeypatch, capsys):
    """The first onnx run exports and verifies; the next run of the same weights loads the cached
    graph (export is not called again) and auto picks it even for a short run; other weights
    get their own entry."""
    pytest.importorskip("onnxruntime")
    from engine.formats import onnx_export

    monkeypatch.setenv("DDPM_ENGINE_CACHE", str(tmp_path / "cache"))
    exports = []
    real_export = onnx_export.export_onnx
    monkeypatch.setattr(onnx_export, "export_onnx", lambda *a, **k: (exports.append(1), real_export(*a, **k))[1])
    first = sample(checkpoint, tmp_path / "a", "--backend", "onnx", runs="onnx-fp32", capsys=capsys)
    assert len(exports) == 1 and len(list((tmp_path / "cache" / "onnx").iterdir())) == 1
    again = sample(checkpoint, tmp_path / "b", "--backend", "auto", runs="onnx-fp32", capsys=capsys)  # 4 image-steps
    assert len(exports) == 1 and np.array_equal(first, again)

    ckpt = load_checkpoint(checkpoint)
    with torch.no_grad():
        ckpt.model.conv_out.bias.add_(0.01)
    other = tmp_path / "other.safetensors"
    save_checkpoint(other, ckpt.model, ckpt.diffusion, ckpt.class_names)
    sample(other, tmp_path / "c", "--backend", "eager")  # short, not cached: auto would be eager too
    assert not onnx_export.cached_onnx(load_checkpoint(other), export=False)
    sample(other, tmp_path / "d", "--backend", "onnx")
    assert len(exports) == 2 and len(list((tmp_path / "cache" / "onnx").iterdir())) == 2


def test_a_damaged_cache_entry_is_exported_again(checkpoint, tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime")
    from engine.formats import onnx_export

    monkeypatch.setenv("DDPM_ENGINE_CACHE", str(tmp_path / "cache"))
    path = onnx_export.cached_onnx(load_checkpoint(checkpoint))
    path.write_bytes(b"junk")
    reference = sample(checkpoint, tmp_path / "eager", "--backend", "eager")
    assert np.abs(sample(checkpoint, tmp_path / "onnx", "--backend", "onnx") - reference).max() <= 1
    assert path.read_bytes()[:4] != b"junk"


def test_native_bf16_follows_the_cpu_flags(monkeypatch):
    for avx512_bf16, amx, expected in [(False, False, False), (True, False, True), (False, True, True)]:
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
        assert backends.native_cpu_bf16() is expected
