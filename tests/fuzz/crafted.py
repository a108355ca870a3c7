"""Writers of crafted inputs for the fuzz tables: checkpoints, ONNX files, plans, training states."""

from __future__ import annotations

import json
import math
from pathlib import Path

from engine.config import PRESETS, DiffusionConfig

NAMES = [f"class{i}" for i in range(10)]
TINY = json.loads(PRESETS["tiny"].to_json())


def metadata(model: dict | None = None, **fields) -> dict[str, str]:
    """A ddpm-engine metadata dict for the tiny preset; `model` changes model_config fields,
    the keyword arguments replace whole entries."""
    return {"format": "ddpm-engine/1", "model_config": json.dumps(TINY | (model or {})),
            "diffusion_config": DiffusionConfig().to_json(), "class_names": json.dumps(NAMES)} | fields


def safetensors(path: Path, header: object, data: bytes = b"") -> Path:
    """8 bytes of header length, the JSON header (any JSON), then `data`."""
    text = json.dumps(header).encode()
    path.write_bytes(len(text).to_bytes(8, "little") + text + data)
    return path


def checkpoint_claiming(path: Path, meta: dict[str, str], shapes: dict[str, list[int]], dtype: str = "F32",
                        data: bytes = b"") -> Path:
    """A checkpoint whose header lists `shapes` (consecutive offsets), whatever data it holds."""
    header, offset = {"__metadata__": meta}, 0
    for name, shape in shapes.items():
        size = 4 * math.prod(shape)
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    return safetensors(path, header, data)


def plan(path: Path, header: object, engine: bytes = b"\0" * 16) -> Path:
    """A .plan as export/tensorrt.py lays it out: 8 bytes N, N bytes of JSON, the serialized engine."""
    text = json.dumps(header).encode()
    path.write_bytes(len(text).to_bytes(8, "little") + text + engine)
    return path


def onnx_model(path: Path, meta: dict[str, str] | None, image_size: int = 32) -> Path:
    """A valid ONNX graph with the engine's inputs (x, t, class) and output eps = x, carrying `meta`."""
    import onnx
    from onnx import TensorProto, helper
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, image_size, image_size])
    t = helper.make_tensor_value_info("t", TensorProto.INT64, ["n"])
    y = helper.make_tensor_value_info("class", TensorProto.INT64, ["n"])
    eps = helper.make_tensor_value_info("eps", TensorProto.FLOAT, ["n", 3, image_size, image_size])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["eps"])], "crafted", [x, t, y], [eps])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    if meta is not None:
        helper.set_model_props(model, meta)
    onnx.save(model, str(path))
    return path


def npz_claiming(path: Path, shape: tuple[int, ...], descr: str = "|u1", data: bytes = b"\0" * 64) -> Path:
    """A .npz whose x.npy header claims `shape` whatever data follows it."""
    import io
    import zipfile

    import numpy as np
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": descr, "fortran_order": False, "shape": shape})
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("x.npy", header.getvalue() + data)
    return path
