"""TensorRT: the refusals run everywhere; building and running an engine needs tensorrt and a GPU."""

import copy
import importlib.util
import json
import sys
import types

import pytest
import torch

from engine.formats import tensorrt as trt_runtime
from engine.formats.checkpoint import CheckpointError
from engine.formats.onnx_export import random_inputs, relative_error
from engine.formats.tensorrt import TensorRTUnavailable, load_plan, read_plan, require_tensorrt
from export.cli import main as export_main
from export.tensorrt import build_plan, write_plan

HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None


def test_missing_package_is_named(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import tensorrt -> ImportError
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(TensorRTUnavailable, match=r"the tensorrt package is not installed \(pip install") as e:
        require_tensorrt()
    assert "GPU" not in str(e.value).split("(")[0]


def test_missing_gpu_is_named(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__="10.0.1"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(TensorRTUnavailable, match="no CUDA GPU") as e:
        require_tensorrt()
    assert "package" not in str(e.value)


def test_old_tensorrt_is_refused(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__="8.6.1"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(TensorRTUnavailable, match="8.6.1 is too old"):
        require_tensorrt()


def test_cli_without_tensorrt_says_so_and_writes_nothing(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    out = tmp_path / "model.onnx"
    assert export_main(["--checkpoint", str(tiny_checkpoint), "--tensorrt", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "ddpm-export: error: TensorRT cannot run here: the tensorrt package" in err
    assert list(tmp_path.iterdir()) == []


def test_plan_container_round_trip(tmp_path, tiny, monkeypatch):
    metadata = {"format": "ddpm-engine/1", "model_config": tiny.model.config.to_json(),
                "diffusion_config": tiny.diffusion.to_json(), "class_names": json.dumps(list(tiny.class_names))}
    path = tmp_path / "model.plan"
    write_plan(path, metadata, b"\x00engine bytes\xff")
    assert read_plan(path) == (metadata, b"\x00engine bytes\xff")
    # A readable plan on a machine without TensorRT: the error is about TensorRT, not the file.
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(TensorRTUnavailable, match="tensorrt package is not installed"):
        load_plan(path, "cuda")


def test_load_plan_refuses_other_files(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_plan(tmp_path / "missing.plan")
    garbage = tmp_path / "garbage.plan"
    garbage.write_bytes(b"\xff" * 64)
    with pytest.raises(CheckpointError, match="not a ddpm-engine TensorRT plan"):
        load_plan(garbage)
    foreign = tmp_path / "foreign.plan"
    write_plan(foreign, {"format": "something-else"}, b"")
    with pytest.raises(CheckpointError, match="not a ddpm-engine export"):
        load_plan(foreign)


NO_TENSORRT = ", ".join(reason for reason, missing in (("tensorrt is not installed", not HAS_TENSORRT),
                                                       ("no CUDA GPU", not torch.cuda.is_available())) if missing)


@pytest.mark.gpu
@pytest.mark.skipif(bool(NO_TENSORRT), reason=f"building a TensorRT engine: {NO_TENSORRT}")
def test_tensorrt_engine_matches_eager(tiny, onnx_fp16, tmp_path):
    plan = tmp_path / "tiny.plan"
    build_plan(onnx_fp16, plan)
    ckpt = load_plan(plan, "cuda")
    assert ckpt.model.config == tiny.model.config and ckpt.diffusion == tiny.diffusion
    model = copy.deepcopy(tiny.model).cuda()
    largest = trt_runtime.BATCH_BUCKETS[-1]
    for batch in (1, 9, 70, largest + 3):  # every profile, and a batch run in chunks
        x, t, y = (v.cuda() for v in random_inputs(tiny.model.config, batch, batch, tiny.diffusion.num_timesteps))
        with torch.no_grad():
            want = model(x, t, y)
        got = ckpt.model(x, t, y)
        torch.cuda.synchronize()
        assert relative_error(got, want) <= 1e-2, batch
