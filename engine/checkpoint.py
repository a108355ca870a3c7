"""Checkpoints: ONE `.safetensors` file holding the weights, with the model config, the
diffusion config and the class names in its metadata. Loading never unpickles.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from engine.config import DiffusionConfig, ModelConfig
from engine.model import UNet

FORMAT = "ddpm-engine/1"


class CheckpointError(Exception):
    """A checkpoint that is missing, unreadable, foreign or inconsistent with its config."""


@dataclass
class Checkpoint:
    """What a sampler needs: the eps model, the diffusion config and the class names.

    runtime says what `model` is: "pytorch" (the reference UNet, from a .safetensors file),
    "onnx" (an ONNX Runtime session) or "tensorrt" (a TensorRT engine); exported models are
    callables eps(x, t, y) with a `config`, run in `precision`.
    """

    model: UNet
    diffusion: DiffusionConfig
    class_names: tuple[str, ...]
    runtime: str = "pytorch"
    precision: str = "fp32"

    @property
    def config(self) -> ModelConfig:
        return self.model.config


def save_checkpoint(path: str | os.PathLike, model: UNet, diffusion: DiffusionConfig,
                    class_names: tuple[str, ...] | list[str], dtype: torch.dtype = torch.float32) -> None:
    """Write atomically (temporary file, then rename), so a crash never leaves half a file."""
    config = model.config
    if len(class_names) != config.num_classes:
        raise ValueError(f"{len(class_names)} class names for {config.num_classes} classes")
    tensors = {name: t.detach().to("cpu", dtype).contiguous() for name, t in model.state_dict().items()}
    metadata = {
        "format": FORMAT,
        "model_config": config.to_json(),
        "diffusion_config": diffusion.to_json(),
        "class_names": json.dumps(list(class_names)),
    }
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def atomic_write(path: str | os.PathLike, write) -> None:
    """Call write(tmp_path) on a temporary file beside `path`, fsync it, rename it over `path`."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would make a shipped or shared file unreadable to others
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        with open(path, "rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            if not 0 < header_len <= min(100_000_000, path.stat().st_size - 8):
                raise ValueError
            header = json.loads(f.read(header_len))
    except (ValueError, UnicodeDecodeError, OSError):
        raise CheckpointError(f"{path} is not a safetensors file (truncated or another format)") from None
    metadata = header.get("__metadata__") or {}
    if metadata.get("format") != FORMAT:
        raise CheckpointError(f"{path} is a safetensors file but not a ddpm-engine checkpoint (no '{FORMAT}' metadata)")
    return metadata


def configs_from_metadata(metadata: dict[str, str], path: str | os.PathLike
                          ) -> tuple[ModelConfig, DiffusionConfig, tuple[str, ...]]:
    """The model config, diffusion config and class names of a ddpm-engine file's metadata
    (a .safetensors checkpoint, an exported .onnx or a .plan), validated."""
    try:
        config = ModelConfig.from_json(metadata["model_config"])
        diffusion = DiffusionConfig.from_json(metadata["diffusion_config"])
        class_names = tuple(json.loads(metadata["class_names"]))
        config.validate()
        diffusion.validate()
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path} has invalid metadata: {e}") from None
    return config, diffusion, class_names


def open_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu") -> Checkpoint:
    """A checkpoint of any kind, by its suffix: an exported .onnx file (ONNX Runtime), a .plan
    (TensorRT), else a .safetensors checkpoint."""
    match Path(path).suffix:
        case ".onnx":
            from engine.runtimes.onnx import load_onnx
            return load_onnx(path, device)
        case ".plan":
            from engine.runtimes.tensorrt import load_plan
            return load_plan(path, device)
    return load_checkpoint(path, device)


def load_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu") -> Checkpoint:
    """Rebuild the model from the file alone; weights come back in float32, in eval mode."""
    config, diffusion, class_names = configs_from_metadata(read_metadata(path), path)
    model = UNet(config)
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path} could not be read (truncated?): {e}") from None
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong_shape = [k for k in expected.keys() & tensors.keys() if expected[k].shape != tensors[k].shape]
    if missing or unexpected or wrong_shape:
        problems = [f"{len(v)} {what} (e.g. {v[0]})" for what, v in
                    (("missing", missing), ("unexpected", unexpected), ("wrong-shape", wrong_shape)) if v]
        raise CheckpointError(f"{path}: tensors do not match its config: {', '.join(problems)}")
    model.load_state_dict({k: v.float() for k, v in tensors.items()})
    return Checkpoint(model.to(device).eval(), diffusion, class_names)
