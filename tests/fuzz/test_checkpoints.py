"""Crafted checkpoints (.safetensors), exported models (.onnx) and plans (.plan), fed to
`ddpm-engine sample` and `ddpm-export`: each is refused in one line, fast, writing nothing."""

from __future__ import annotations

import dataclasses
import importlib.util
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine.apps.cli import main as engine_main
from engine.config import PRESETS
from engine.formats.checkpoint import expected_shapes
from export.cli import main as export_main
from tests.fuzz.crafted import checkpoint_claiming, metadata, onnx_model, plan, safetensors

HUGE = {"ch": 1024, "num_groups": 32}  # ~700M parameters: a valid config whose model is GBs


def shapes_of(changes: dict) -> dict[str, list[int]]:
    return {k: list(v) for k, v in expected_shapes(dataclasses.replace(PRESETS["tiny"], **changes)).items()}


def with_tensor(tiny, name, value):
    """The tiny checkpoint's tensors with `name` set to `value` (None: removed)."""
    tensors = load_file(str(tiny[0]))
    tensors[name] = value
    return {k: v for k, v in tensors.items() if v is not None}


def saved(folder, tensors):
    save_file(tensors, folder / "m.safetensors", metadata=metadata())
    return folder / "m.safetensors"


def raw(path, data: bytes):
    path.write_bytes(data)
    return path


# (id, make(tmp_path, tiny checkpoint) -> crafted file, expected words of the error line)
CHECKPOINTS = [
    ("junk", lambda d, c: raw(d / "m.safetensors", b"\x89PNG junk" * 50), "not a safetensors file"),
    ("empty", lambda d, c: raw(d / "m.safetensors", b""), "not a safetensors file"),
    ("huge-header-length", lambda d, c: raw(d / "m.safetensors", b"\xff" * 8 + b"{}"), "not a safetensors file"),
    ("header-is-a-list", lambda d, c: safetensors(d / "m.safetensors", [1, 2]), "not a safetensors file"),
    ("metadata-is-a-string", lambda d, c: safetensors(d / "m.safetensors", {"__metadata__": "ddpm-engine/1"}),
     "not a ddpm-engine checkpoint"),
    ("metadata-value-not-string", lambda d, c: safetensors(d / "m.safetensors", {"__metadata__": metadata(
        model_config={"ch": 32})}), "values must be strings"),
    ("num-groups-0", lambda d, c: safetensors(d / "m.safetensors", {"__metadata__": metadata({"num_groups": 0})}),
     "num_groups 0 is out of range"),
    ("ch-float", lambda d, c: safetensors(d / "m.safetensors", {"__metadata__": metadata({"ch": 32.0})}),
     "ch must be an integer, not 32.0"),
    ("ch-bool", lambda d, c: safetensors(d / "m.safetensors", {"__metadata__": metadata({"ch": True})}),
     "ch must be an integer, not True"),
    ("timesteps-fraction", lambda d, c: safetensors(d / "m.safetensors", {"__metadata__": metadata(
        diffusion_config='{"num_timesteps": 1000.5}')}), "num_timesteps must be an integer"),
    ("num-classes-1e9", lambda d, c: safetensors(d / "m.safetensors", {"__metadata__": metadata({"num_classes": 1e9})}),
     "num_classes must be an integer"),
    ("class-count", lambda d, c: safetensors(d / "m.safetensors", {"__metadata__": metadata({"num_classes": 3})}),
     "10 class names for 3 classes"),
    ("class-names-not-json", lambda d, c: safetensors(d / "m.safetensors", {"__metadata__": metadata(
        class_names="[airplane")}), "invalid metadata"),
    ("no-model-config", lambda d, c: safetensors(d / "m.safetensors", {"__metadata__": {
        k: v for k, v in metadata().items() if k != "model_config"}}), "no 'model_config'"),
    ("deeply-nested", lambda d, c: safetensors(d / "m.safetensors", {"__metadata__": metadata(
        model_config="[" * 50_000 + "]" * 50_000)}), "nested too deeply"),
    ("unknown-field", lambda d, c: safetensors(d / "m.safetensors", {"__metadata__": metadata({"heads": 4})}),
     "unknown ModelConfig field 'heads'"),
    ("missing-tensor", lambda d, c: saved(d, with_tensor(c, "conv_out.bias", None)), "1 missing (e.g. conv_out.bias)"),
    ("extra-tensor", lambda d, c: saved(d, with_tensor(c, "evil", torch.zeros(3))), "1 unexpected (e.g. evil)"),
    ("int64-weights", lambda d, c: saved(d, with_tensor(c, "conv_out.bias", torch.zeros(3, dtype=torch.int64))),
     "1 non-float"),
    ("nan-weights", lambda d, c: saved(d, with_tensor(c, "conv_out.bias", torch.full((3,), float("nan")))),
     "hold NaN or inf"),
]

# Sizes: each must be refused before anything is allocated (no model built, well under a second).
SIZES = [
    ("parameter-bound", lambda d, c: safetensors(d / "m.safetensors", {"__metadata__": metadata(
        {"ch": 4096, "num_groups": 32})}), "over the limit"),
    ("shape-claims-a-terabyte", lambda d, c: checkpoint_claiming(d / "m.safetensors", metadata(), c[1] | {
        "conv_in.weight": [10**6, 10**6]}), "1 wrong-shape (e.g. conv_in.weight)"),
    ("shapes-of-the-config-but-no-data", lambda d, c: checkpoint_claiming(d / "m.safetensors", metadata(), c[1]),
     "out-of-file"),
    ("huge-model-no-data", lambda d, c: checkpoint_claiming(d / "m.safetensors", metadata(HUGE), shapes_of(HUGE)),
     "out-of-file"),
]


def sample_argv(checkpoint, tmp_path):
    return ["sample", "--checkpoint", checkpoint, "-n", 2, "--steps", 1, "--device", "cpu", "--no-progress",
            "--out", tmp_path / "samples"]


@pytest.fixture
def outputs(tmp_path):
    """Outputs already there, which a refusal must leave alone."""
    (tmp_path / "samples").mkdir()
    (tmp_path / "samples" / "grid.png").write_bytes(b"an earlier grid")
    (tmp_path / "out.onnx").write_bytes(b"an earlier export")
    return tmp_path


@pytest.mark.parametrize("name, make, message", CHECKPOINTS + SIZES, ids=[c[0] for c in CHECKPOINTS + SIZES])
def test_crafted_checkpoint(refused, outputs, fuzz_checkpoint, no_model_built, name, make, message):
    path = make(outputs, fuzz_checkpoint)
    seconds = 2.0 if (name, make, message) in SIZES else None
    refused(engine_main, sample_argv(path, outputs), outputs, message, seconds)
    refused(export_main, ["--checkpoint", path, "--out", outputs / "out.onnx"], outputs, message, seconds)


HAS_ORT = importlib.util.find_spec("onnxruntime") is not None and importlib.util.find_spec("onnx") is not None

ONNX = [
    ("junk", lambda d: raw(d / "m.onnx", b"\x08\x07junk" * 30), "not a readable ONNX model"),
    ("no-metadata", lambda d: onnx_model(d / "m.onnx", None), "not a ddpm-engine export"),
    ("foreign-format", lambda d: onnx_model(d / "m.onnx", {"format": "other/1"}), "not a ddpm-engine export"),
    ("num-classes-1e9", lambda d: onnx_model(d / "m.onnx", metadata({"num_classes": 1e9})), "num_classes must be an integer"),
    ("ch-float", lambda d: onnx_model(d / "m.onnx", metadata({"ch": 32.0})), "ch must be an integer"),
    ("config-a-list", lambda d: onnx_model(d / "m.onnx", metadata(model_config="[1, 2]")), "must be a JSON object"),
    ("class-count", lambda d: onnx_model(d / "m.onnx", metadata(class_names=json.dumps(["a", "b"]))),
     "2 class names for 10 classes"),
]


@pytest.mark.skipif(not HAS_ORT, reason="needs the export extra (onnx, onnxruntime)")
@pytest.mark.parametrize("name, make, message", ONNX, ids=[c[0] for c in ONNX])
def test_crafted_onnx(refused, outputs, no_model_built, name, make, message):
    refused(engine_main, sample_argv(make(outputs), outputs), outputs, message)


@pytest.mark.skipif(not HAS_ORT, reason="needs the export extra (onnx, onnxruntime)")
def test_onnx_graph_that_does_not_match_its_config(refused, outputs):
    path = onnx_model(outputs / "m.onnx", metadata(), image_size=16)  # the config says 32 x 32
    refused(engine_main, sample_argv(path, outputs), outputs, "but its config says")


PLANS = [
    ("junk", lambda d: raw(d / "m.plan", b"\x00" * 40), "no metadata header"),
    ("header-is-a-list", lambda d: plan(d / "m.plan", [1, 2]), "no metadata header"),
    ("foreign-format", lambda d: plan(d / "m.plan", {"format": "x"}), "not a ddpm-engine export"),
    ("num-groups-0", lambda d: plan(d / "m.plan", metadata({"num_groups": 0})), "num_groups 0 is out of range"),
    ("parameter-bound", lambda d: plan(d / "m.plan", metadata(HUGE | {"ch": 4096})), "over the limit"),
]


@pytest.mark.parametrize("name, make, message", PLANS, ids=[c[0] for c in PLANS])
def test_crafted_plan(refused, outputs, no_model_built, name, make, message):
    refused(engine_main, sample_argv(make(outputs), outputs), outputs, message, seconds=2.0)
