"""Run a TensorRT `.plan` (built by `ddpm-export --tensorrt`) as the engine's epsilon model.

Written against the documented TensorRT 10 Python API (Runtime, IExecutionContext.execute_async_v3).
TensorRT is not installable on this project's machines, so this path has NOT been run: only
its refusals (no tensorrt package, no GPU, a foreign file) are tested.

The `.plan` file is laid out like a safetensors file, so that it alone rebuilds a sampler:
8 bytes little-endian N, N bytes of JSON metadata (the checkpoint's keys, plus the
TensorRT version and the batch buckets), then TensorRT's serialized engine. It is
therefore not a bare engine for `trtexec --loadEngine`. export/tensorrt.py writes it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from engine.config import ModelConfig
from engine.errors import UserError
from engine.formats.checkpoint import Checkpoint, CheckpointError, json_header
from engine.formats.onnx import INPUT_NAMES, OUTPUT_NAME, parse_metadata

# One optimisation profile per bucket: profile k serves batches (bucket[k-1], bucket[k]] and
# is tuned for its largest batch. 512 = the sampler's default batch of 256 doubled by guidance;
# larger batches are run in chunks of 512.
BATCH_BUCKETS = (8, 64, 512)


class TensorRTUnavailable(UserError):
    """TensorRT, or a GPU for it, is missing here; the message says which."""


def require_tensorrt():
    """Import tensorrt (>= 10), or say exactly what is missing."""
    missing = []
    try:
        import tensorrt as trt
    except ImportError:
        trt = None
        missing.append("the tensorrt package is not installed (pip install 'tensorrt>=10' on a machine with an NVIDIA GPU)")
    if not torch.cuda.is_available():
        missing.append("no CUDA GPU is available to torch")
    if missing:
        raise TensorRTUnavailable("TensorRT cannot run here: " + "; and ".join(missing))
    if int(trt.__version__.split(".")[0]) < 10:
        raise TensorRTUnavailable(f"TensorRT {trt.__version__} is too old: this code uses the TensorRT 10 API")
    return trt


def read_plan(path: str | os.PathLike) -> tuple[dict[str, str], bytes]:
    """(metadata, serialized engine) of a .plan file written by build_plan."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        with open(path, "rb") as f:
            metadata, _ = json_header(f, path.stat().st_size)
            return metadata, f.read()
    except (ValueError, RecursionError):
        raise CheckpointError(f"{path} is not a ddpm-engine TensorRT plan (no metadata header)") from None


class TensorRTEpsilonModel:
    """eps(x, t, y) through a TensorRT execution context, on torch's current CUDA stream."""

    def __init__(self, engine, config: ModelConfig, device: torch.device, batch_buckets: tuple[int, ...]):
        self.engine, self.config, self.device, self.batch_buckets = engine, config, device, batch_buckets
        self.context = engine.create_execution_context()
        self.profile = 0

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        largest = self.batch_buckets[-1]
        if len(x) > largest:
            return torch.cat([self(x[i:i + largest], t[i:i + largest], y[i:i + largest])
                              for i in range(0, len(x), largest)])
        x = x.detach().to(self.device, torch.float32).contiguous()
        t = t.detach().to(self.device, torch.int64).contiguous()
        y = y.detach().to(self.device, torch.int64).contiguous()
        eps = torch.empty_like(x)
        stream = torch.cuda.current_stream(self.device).cuda_stream
        profile = next(k for k, high in enumerate(self.batch_buckets) if len(x) <= high)
        if profile != self.profile:
            self.context.set_optimization_profile_async(profile, stream)
            self.profile = profile
        for name, v in zip(INPUT_NAMES, (x, t, y)):
            self.context.set_input_shape(name, tuple(v.shape))
            self.context.set_tensor_address(name, v.data_ptr())
        self.context.set_tensor_address(OUTPUT_NAME, eps.data_ptr())
        if not self.context.execute_async_v3(stream):
            raise RuntimeError("TensorRT execution failed")
        return eps


def load_plan(path: str | os.PathLike, device: str | torch.device = "cuda") -> Checkpoint:
    """Open a .plan written by build_plan: the model, its diffusion config and class names."""
    device = torch.device(device)
    metadata, serialized = read_plan(path)
    config, diffusion, class_names = parse_metadata(metadata, path, "a TensorRT plan")
    trt = require_tensorrt()
    if device.type != "cuda":
        raise TensorRTUnavailable(f"a TensorRT plan runs on a CUDA device, not {device}; use --device cuda")
    with torch.cuda.device(device):
        engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(serialized)
    if engine is None:
        raise CheckpointError(f"{path}: TensorRT {trt.__version__} could not load this engine (built by TensorRT "
                              f"{metadata.get('tensorrt_version', '?')}, perhaps for another GPU)")
    buckets = tuple(json.loads(metadata.get("batch_buckets", json.dumps(list(BATCH_BUCKETS)))))
    return Checkpoint(TensorRTEpsilonModel(engine, config, device, buckets), diffusion, class_names,
                      runtime="tensorrt", precision="fp16")
