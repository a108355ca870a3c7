"""ONNX export: numerics against the eager model, precision of the graph, metadata, sampling, errors."""

import copy
import shutil

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, shape_inference

from engine.backends import build_engine
from engine.formats import onnx_export
from engine.formats.checkpoint import Checkpoint, CheckpointError, save_checkpoint
from engine.formats.onnx import load_onnx
from engine.formats.onnx_export import export_module, random_inputs, relative_error
from engine.generate import generate
from engine.settings import SampleSettings
from export.cli import main as export_main

TOLERANCE = {"fp32": 1e-4, "fp16": 1e-2}


def eager(tiny, x, t, y):
    with torch.no_grad():
        return tiny.model(x, t, y)


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
@pytest.mark.parametrize("batch", [1, 2, 5])
def test_onnx_matches_eager(tiny, onnx_fp32, onnx_fp16, precision, batch):
    model = load_onnx(onnx_fp32 if precision == "fp32" else onnx_fp16, "cpu").model
    x, t, y = random_inputs(tiny.model.config, batch, seed=100 + batch, num_timesteps=tiny.diffusion.num_timesteps)
    eps = model(x, t, y)
    assert eps.dtype == torch.float32 and eps.shape == x.shape
    assert relative_error(eps, eager(tiny, x, t, y)) <= TOLERANCE[precision]


@pytest.mark.parametrize("scale", [1.0, 300.0])
def test_fp16_export_module_in_torch(tiny, scale):
    """fp16 arithmetic itself, which ONNX Runtime's CPU provider partly runs in float32.

    At scale 300 the squared deviations exceed fp16's range (65504): with the same
    reductions in fp16 the relative error is about 0.6; float32 statistics keep it small.
    """
    x, t, y = random_inputs(tiny.model.config, 3, seed=7, num_timesteps=tiny.diffusion.num_timesteps)
    x = x * scale
    with torch.no_grad():
        eps = export_module(tiny.model, fp16=True)(x, t, y)
    assert torch.isfinite(eps).all()
    assert relative_error(eps, eager(tiny, x, t, y)) <= TOLERANCE["fp16"]


def _elem_types(model: onnx.ModelProto) -> dict[str, int]:
    graph = shape_inference.infer_shapes(model).graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*graph.value_info, *graph.input, *graph.output]}
    types.update({init.name: init.data_type for init in graph.initializer})
    return types


def test_fp16_graph_keeps_statistics_in_fp32(onnx_fp16):
    model = onnx.load(str(onnx_fp16))
    types = _elem_types(model)
    ops = {}
    for node in model.graph.node:
        if node.input:
            ops.setdefault(node.op_type, set()).add(types.get(node.input[0]))
    assert ops["Conv"] == {TensorProto.FLOAT16} and ops["MatMul"] == {TensorProto.FLOAT16}
    for op in ("ReduceMean", "Sqrt", "Softmax"):
        assert ops[op] == {TensorProto.FLOAT}, op
    assert not {"GroupNormalization", "InstanceNormalization"} & ops.keys()
    for value in [*model.graph.input, *model.graph.output]:
        dims = value.type.tensor_type.shape.dim
        assert dims[0].dim_param == "batch"
        expected = TensorProto.FLOAT if value.name in ("x", "eps") else TensorProto.INT64
        assert value.type.tensor_type.elem_type == expected
    assert model.opset_import[0].version == onnx_export.DEFAULT_OPSET


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_metadata_round_trip(tiny, onnx_fp32, onnx_fp16, precision):
    ckpt = load_onnx(onnx_fp32 if precision == "fp32" else onnx_fp16, "cpu")
    assert ckpt.model.config == tiny.model.config
    assert ckpt.diffusion == tiny.diffusion
    assert ckpt.class_names == tiny.class_names
    assert ckpt.model.precision == precision


@pytest.mark.parametrize("precision, max_levels", [("fp32", 1), ("fp16", 3)])
@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_sampling_through_onnx_gives_the_same_images(tiny, onnx_fp32, onnx_fp16, precision, max_levels, sampler):
    """Same seed, same images as the eager model, up to precision; guidance sends batches of 2B."""
    onnx_ckpt = load_onnx(onnx_fp32 if precision == "fp32" else onnx_fp16, "cpu")
    settings = SampleSettings(sampler=sampler, steps=6, guidance=1.5)
    kwargs = dict(settings=settings, indices=torch.arange(3), classes=[0, 3], seed=11, progress=False)
    want, want_labels = generate(build_engine(tiny, "eager", max_batch=2), **kwargs)
    got, got_labels = generate(build_engine(onnx_ckpt, "onnx", max_batch=2), **kwargs)
    assert (got_labels == want_labels).all()
    assert 0.3 < ((want > 0) & (want < 255)).mean()  # not a comparison of saturated pixels
    assert np.abs(got.astype(int) - want.astype(int)).max() <= max_levels


# Error paths: one line on stderr, a non-zero exit, nothing left behind.

def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("ddpm-export: error: "), err
    return err


def test_help_has_examples(capsys):
    with pytest.raises(SystemExit) as exit_info:
        export_main(["--help"])
    assert exit_info.value.code == 0
    assert "examples:" in capsys.readouterr().out


def test_missing_checkpoint(tmp_path, capsys):
    assert export_main(["--checkpoint", str(tmp_path / "nope.safetensors")]) == 1
    assert "not found" in _one_error_line(capsys)
    assert list(tmp_path.iterdir()) == []


def test_foreign_checkpoint(tmp_path, capsys):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"not a checkpoint at all")
    assert export_main(["--checkpoint", str(path)]) == 1
    assert "not a safetensors file" in _one_error_line(capsys)
    assert list(tmp_path.iterdir()) == [path]


@pytest.mark.parametrize("args, message", [
    (["--out", "model.bin"], "must end in .onnx"),
    (["--out", "missing-folder/model.onnx"], "does not exist"),
])
def test_bad_output(tiny_checkpoint, tmp_path, capsys, args, message):
    args = [a if a.startswith("--") else str(tmp_path / a) for a in args]
    assert export_main(["--checkpoint", str(tiny_checkpoint), *args]) == 1
    assert message in _one_error_line(capsys)
    assert list(tmp_path.iterdir()) == []


def test_bad_opset(tiny_checkpoint, capsys):
    with pytest.raises(SystemExit) as exit_info:
        export_main(["--checkpoint", str(tiny_checkpoint), "--opset", "21"])
    assert exit_info.value.code == 2
    assert "opset" in capsys.readouterr().err


def test_failed_verification_leaves_no_file(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(onnx_export.TOLERANCE, "fp32", -1.0)  # no export can pass
    out = tmp_path / "model.onnx"
    assert export_main(["--checkpoint", str(tiny_checkpoint), "--out", str(out)]) == 1
    assert "disagrees with PyTorch" in _one_error_line(capsys)
    assert list(tmp_path.iterdir()) == []


def test_nan_model_fails_verification_and_keeps_the_good_file(tiny, onnx_fp32, tmp_path, capsys):
    model = copy.deepcopy(tiny.model)
    with torch.no_grad():
        model.conv_out.bias.fill_(float("nan"))  # every output NaN: the relative error is NaN
    bad = tmp_path / "nan.safetensors"
    save_checkpoint(bad, model, tiny.diffusion, tiny.class_names)
    out = tmp_path / "model.onnx"
    shutil.copy(onnx_fp32, out)
    good = out.read_bytes()
    assert export_main(["--checkpoint", str(bad), "--out", str(out)]) == 1
    assert "NaN" in _one_error_line(capsys)  # refused when the checkpoint loads
    assert out.read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "nan.safetensors"]
    # A NaN model that gets past loading (in memory) fails the verification itself.
    with pytest.raises(onnx_export.ExportError, match="disagrees with PyTorch"):
        onnx_export.export_onnx(Checkpoint(model, tiny.diffusion, tiny.class_names), out)
    assert out.read_bytes() == good


def test_load_onnx_refuses_other_files(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_onnx(tmp_path / "missing.onnx")
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x00\x01 definitely not protobuf" * 10)
    with pytest.raises(CheckpointError, match="not a readable ONNX model"):
        load_onnx(garbage)
    identity = helper.make_model(helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])], "foreign",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])]), opset_imports=[helper.make_opsetid("", 17)])
    foreign = tmp_path / "foreign.onnx"
    onnx.save(identity, str(foreign))
    with pytest.raises(CheckpointError, match="not a ddpm-engine export"):
        load_onnx(foreign)
