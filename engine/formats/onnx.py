"""Run an exported `.onnx` file as the engine's epsilon model, through ONNX Runtime.

`load_onnx(path, device)` returns the same `Checkpoint` as `engine.formats.checkpoint.load_checkpoint`,
with a callable eps(x, t, y) in place of the U-Net (and runtime "onnx"), so the engine's
samplers run unchanged. engine/formats/onnx_export.py writes the file and verifies it through
`open_session`.
On a CUDA device with onnxruntime-gpu installed the CUDA provider runs the graph with I/O
bound to the torch tensors (no host copies, on torch's current stream); otherwise the CPU
provider runs it and the tensors are copied through host memory.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from engine.config import DiffusionConfig, ModelConfig
from engine.formats.checkpoint import FORMAT, Checkpoint, CheckpointError, configs_from_metadata

INPUT_NAMES = ("x", "t", "class")
OUTPUT_NAME = "eps"


def parse_metadata(metadata: dict[str, str], path: str | os.PathLike,
                   kind: str) -> tuple[ModelConfig, DiffusionConfig, tuple[str, ...]]:
    """The configs and class names of an exported file (`kind`: "an ONNX model", "a TensorRT plan")."""
    if metadata.get("format") != FORMAT:
        raise CheckpointError(f"{path} is {kind} but not a ddpm-engine export (no '{FORMAT}' metadata)")
    return configs_from_metadata(metadata, path)


def _onnxruntime():
    try:
        import onnxruntime
    except ImportError:
        raise CheckpointError("running .onnx files needs onnxruntime: pip install 'ddpm-engine[export]'") from None
    return onnxruntime


def uses_cuda_provider(device: torch.device) -> bool:
    return device.type == "cuda" and "CUDAExecutionProvider" in _onnxruntime().get_available_providers()


def open_session(path: str | os.PathLike, device: torch.device):
    """An InferenceSession on the CUDA provider for a CUDA device when it exists, else the CPU provider."""
    ort = _onnxruntime()
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: the CPU provider's fp16 fallbacks are expected
    if uses_cuda_provider(device):
        index = device.index if device.index is not None else torch.cuda.current_device()
        stream = torch.cuda.current_stream(index).cuda_stream
        providers = [("CUDAExecutionProvider", {"device_id": index, "user_compute_stream": str(stream)}),
                     "CPUExecutionProvider"]
    else:
        providers = ["CPUExecutionProvider"]
    try:
        return ort.InferenceSession(str(path), options, providers=providers)
    except Exception as e:  # onnxruntime raises its own pybind exception types
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path} is not a readable ONNX model: {reason}") from None


class OnnxEpsilonModel:
    """eps(x, t, y) through an ONNX Runtime session; float32 in, float32 out, on `device`."""

    def __init__(self, session, config: ModelConfig, device: torch.device, precision: str):
        self.session, self.config, self.device, self.precision = session, config, device, precision
        self.provider = session.get_providers()[0]
        self.io_binding = self.provider == "CUDAExecutionProvider"

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        inputs = [v.detach().to(self.device if self.io_binding else "cpu", dtype).contiguous()
                  for v, dtype in zip((x, t, y), (torch.float32, torch.int64, torch.int64))]
        if self.io_binding:
            return self._run_bound(*inputs)
        (eps,) = self.session.run([OUTPUT_NAME], {name: v.numpy() for name, v in zip(INPUT_NAMES, inputs)})
        return torch.from_numpy(eps).to(self.device)

    def _run_bound(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Inputs and output stay in torch's CUDA memory; ONNX Runtime reads and writes them in place."""
        eps = torch.empty_like(x)
        index = self.device.index if self.device.index is not None else torch.cuda.current_device()
        binding = self.session.io_binding()
        for name, v, dtype in zip(INPUT_NAMES, (x, t, y), (np.float32, np.int64, np.int64)):
            binding.bind_input(name, "cuda", index, dtype, tuple(v.shape), v.data_ptr())
        binding.bind_output(OUTPUT_NAME, "cuda", index, np.float32, tuple(eps.shape), eps.data_ptr())
        self.session.run_with_iobinding(binding)
        return eps

    def __repr__(self) -> str:
        return f"OnnxEpsilonModel({self.precision}, {self.provider}, device={self.device})"


def load_onnx(path: str | os.PathLike, device: str | torch.device = "cpu") -> Checkpoint:
    """Open an exported .onnx file: the model, its diffusion config and class names, from the file alone."""
    device = torch.device(device)
    session = open_session(path, device)
    metadata = session.get_modelmeta().custom_metadata_map
    config, diffusion, class_names = parse_metadata(metadata, path, "an ONNX model")
    inputs = tuple(i.name for i in session.get_inputs())
    if inputs != INPUT_NAMES or [o.name for o in session.get_outputs()] != [OUTPUT_NAME]:
        raise CheckpointError(f"{path}: graph has inputs {inputs}, expected {INPUT_NAMES} -> {OUTPUT_NAME}")
    image = [config.in_channels, config.image_size, config.image_size]
    x_shape = session.get_inputs()[0].shape  # [batch, C, H, W]; a dynamic dimension is a name
    if len(x_shape) != 4 or [d if isinstance(d, int) else None for d in x_shape[1:]] != image:
        raise CheckpointError(f"{path}: the graph takes x of shape {x_shape}, but its config says (batch, "
                              f"{', '.join(map(str, image))})")
    precision = metadata.get("precision", "fp32")
    return Checkpoint(OnnxEpsilonModel(session, config, device, precision), diffusion, class_names,
                      runtime="onnx", precision=precision)
