"""Build a TensorRT engine from the exported fp16 ONNX file, as a `.plan` that
engine/formats/tensorrt.py runs (its docstring describes the file).

Written against the documented TensorRT 10 Python API (Builder, OnnxParser,
IOptimizationProfile). TensorRT is not installable on this project's machines, so this
path has NOT been run: only its refusals (no tensorrt package, no GPU, a foreign file) are tested.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from engine.formats.checkpoint import CheckpointError, atomic_write
from engine.formats.onnx import INPUT_NAMES, parse_metadata
from engine.formats.tensorrt import BATCH_BUCKETS, require_tensorrt

WORKSPACE_BYTES = 4 << 30


def write_plan(path: str | os.PathLike, metadata: dict[str, str], engine: bytes) -> None:
    header = json.dumps(metadata).encode()
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(len(header).to_bytes(8, "little") + header + engine))


def build_plan(onnx_path: str | os.PathLike, plan_path: str | os.PathLike,
               batch_buckets: tuple[int, ...] = BATCH_BUCKETS) -> None:
    """Compile the ONNX file into a TensorRT engine with one optimisation profile per batch bucket."""
    import onnx

    trt = require_tensorrt()
    metadata = {p.key: p.value for p in onnx.load(str(onnx_path), load_external_data=False).metadata_props}
    config, _, _ = parse_metadata(metadata, onnx_path, "an ONNX model")

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    # Strongly typed: every tensor keeps its ONNX type, so the float32 GroupNorm statistics and
    # softmax stay float32 (with BuilderFlag.FP16 on a weakly typed network TensorRT may run them in fp16).
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise CheckpointError(f"TensorRT could not parse {onnx_path}: {errors}")
    builder_config = builder.create_builder_config()
    builder_config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
    image = (config.in_channels, config.image_size, config.image_size)
    low = 1
    for high in batch_buckets:
        profile = builder.create_optimization_profile()
        profile.set_shape("x", (low, *image), (high, *image), (high, *image))
        for name in INPUT_NAMES[1:]:
            profile.set_shape(name, (low,), (high,), (high,))
        builder_config.add_optimization_profile(profile)
        low = high + 1
    engine = builder.build_serialized_network(network, builder_config)
    if engine is None:
        raise CheckpointError(f"TensorRT failed to build an engine from {onnx_path} (see its log above)")
    metadata.update(tensorrt_version=trt.__version__, batch_buckets=json.dumps(list(batch_buckets)))
    write_plan(plan_path, metadata, bytes(engine))
