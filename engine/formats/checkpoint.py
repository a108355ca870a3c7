"""Checkpoints: ONE `.safetensors` file holding the weights, with the model config, the
diffusion config and the class names in its metadata. Loading never unpickles.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from engine.config import DiffusionConfig, ModelConfig
from engine.errors import UserError
from engine.model import UNet

FORMAT = "ddpm-engine/1"
MAX_HEADER = 100_000_000  # bytes of JSON header safetensors itself accepts
MAX_NAME = 200  # characters of a class name
FLOAT_DTYPES = {"F32": 4, "F16": 2, "BF16": 2}  # safetensors dtype: bytes an element


class CheckpointError(UserError):
    """A checkpoint that is missing, unreadable, foreign or inconsistent with its config."""


class EpsModel(Protocol):
    """What the engine samples from: eps(x_t, t, y), with the config of the model it computes."""

    config: ModelConfig

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor: ...


@dataclass
class Checkpoint:
    """What a sampler needs: the eps model, the diffusion config and the class names.

    runtime says what `model` is: "pytorch" (the reference UNet, from a .safetensors file),
    "onnx" (an ONNX Runtime session) or "tensorrt" (a TensorRT engine), run in `precision`.
    """

    model: EpsModel
    diffusion: DiffusionConfig
    class_names: tuple[str, ...]
    runtime: str = "pytorch"
    precision: str = "fp32"

    @property
    def config(self) -> ModelConfig:
        return self.model.config

    @property
    def unet(self) -> UNet:
        """The reference UNet, which only a .safetensors checkpoint holds (exported models are compiled)."""
        if not isinstance(self.model, UNet):
            raise CheckpointError(f"this needs a .safetensors checkpoint, not an exported ({self.runtime}) model")
        return self.model


def save_checkpoint(path: str | os.PathLike, model: UNet, diffusion: DiffusionConfig,
                    class_names: tuple[str, ...] | list[str], dtype: torch.dtype = torch.float32) -> None:
    """Write atomically (temporary file, then rename), so a crash never leaves half a file."""
    config = model.config
    if len(class_names) != config.num_classes:
        raise ValueError(f"{len(class_names)} class names for {config.num_classes} classes")
    tensors = {name: t.detach().to("cpu", dtype).contiguous() for name, t in model.state_dict().items()}
    metadata = checkpoint_metadata(config, diffusion, class_names)
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def checkpoint_metadata(config: ModelConfig, diffusion: DiffusionConfig,
                        class_names: tuple[str, ...] | list[str]) -> dict[str, str]:
    """What every ddpm-engine file (.safetensors, .onnx, .plan) says of its model; read back by
    `configs_from_metadata`."""
    return {"format": FORMAT, "model_config": config.to_json(), "diffusion_config": diffusion.to_json(),
            "class_names": json.dumps(list(class_names))}


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


def json_header(f: BinaryIO, size: int) -> tuple[dict, int]:
    """The JSON object after the 8-byte little-endian length that opens a file of `size` bytes, and that
    length: the framing of a safetensors file (and of a ddpm-engine .plan). ValueError if there is none."""
    header_len = int.from_bytes(f.read(8), "little")
    if not 0 < header_len <= min(MAX_HEADER, size - 8):
        raise ValueError("no header")
    header = json.loads(f.read(header_len))
    if not isinstance(header, dict):
        raise ValueError("the header is not a JSON object")
    return header, header_len


def safetensors_header(path: str | os.PathLike, what: str = "file") -> tuple[dict[str, str], dict[str, dict], int]:
    """(metadata, tensor entries, size of the data section) of a .safetensors file, from its JSON header
    alone: nothing is read or allocated for the tensors. The one reader of that header here (checkpoints,
    training states, classifiers); the tensors themselves are read by safetensors. `what` names the file
    in the not-found message."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what} not found: {path}")
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            header, header_len = json_header(f, size)
    except (ValueError, OSError, RecursionError):
        raise CheckpointError(f"{path} is not a safetensors file (truncated or another format)") from None
    metadata = header.pop("__metadata__", None)
    metadata = metadata if isinstance(metadata, dict) else {}  # none, or not a map: no format named
    if not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(f"{path} has invalid metadata: values must be strings")
    return metadata, header, size - 8 - header_len


def read_header(path: str | os.PathLike) -> tuple[dict[str, str], dict[str, dict], int]:
    """safetensors_header of a ddpm-engine checkpoint: its metadata names FORMAT."""
    metadata, header, data_size = safetensors_header(path, "checkpoint")
    if metadata.get("format") != FORMAT:
        raise CheckpointError(f"{path} is a safetensors file but not a ddpm-engine checkpoint (no '{FORMAT}' metadata)")
    return metadata, header, data_size


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    return read_header(path)[0]


def configs_from_metadata(metadata: dict[str, str], path: str | os.PathLike
                          ) -> tuple[ModelConfig, DiffusionConfig, tuple[str, ...]]:
    """The model config, diffusion config and class names of a ddpm-engine file's metadata
    (a .safetensors checkpoint, an exported .onnx or a .plan), validated: types, ranges, a
    bounded model size, and one name per class."""
    try:
        config = ModelConfig.from_json(metadata["model_config"])
        diffusion = DiffusionConfig.from_json(metadata["diffusion_config"])
        config.validate()
        diffusion.validate()
        class_names = json.loads(metadata["class_names"])
        if not isinstance(class_names, list) or not all(isinstance(n, str) and 0 < len(n) <= MAX_NAME
                                                        for n in class_names):
            raise ValueError(f"class_names must be a list of names of 1 to {MAX_NAME} characters")
        if len(class_names) != config.num_classes:
            raise ValueError(f"{len(class_names)} class names for {config.num_classes} classes")
        if len(set(class_names)) != len(class_names):
            raise ValueError("class names repeat")
    except KeyError as e:
        raise CheckpointError(f"{path} has invalid metadata: no {e}") from None
    except (TypeError, ValueError, RecursionError) as e:
        raise CheckpointError(f"{path} has invalid metadata: {e}") from None
    return config, diffusion, tuple(class_names)


def meta_unet(config: ModelConfig) -> UNet:
    """UNet(config) on the meta device: shapes and structure, no memory, no values.

    Without initialising its embeddings: normal_ on a meta tensor imports torch._dynamo, a large part
    of a `ddpm-engine sample` start-up for nothing (there are no values to draw)."""
    reset = nn.Embedding.reset_parameters
    nn.Embedding.reset_parameters = lambda self: None
    try:
        with torch.device("meta"):
            return UNet(config)
    finally:
        nn.Embedding.reset_parameters = reset


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The state_dict shapes of UNet(config), from a model built on the meta device."""
    return {name: tuple(t.shape) for name, t in meta_unet(config).state_dict().items()}


def unet_with_weights(config: ModelConfig, weights: dict[str, torch.Tensor],
                      device: str | torch.device = "cpu") -> UNet:
    """UNet(config) holding `weights` in float32 on `device`, in eval mode: built on the meta device and
    the tensors assigned in place, so no random initialisation is drawn only to be overwritten (for
    the paper's 35.7M network, most of the time a diffusers folder took to open)."""
    model = meta_unet(config)
    model.load_state_dict({name: t.to(device, torch.float32) for name, t in weights.items()}, assign=True)
    return model.eval()


def check_tensors(path: Path, tensors: dict[str, dict], data_size: int, config: ModelConfig) -> None:
    """Refuse a header whose tensors are not those of UNet(config) in a float dtype, or whose
    offsets do not tile the file's data section: before anything is allocated."""
    expected = expected_shapes(config)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong_shape, wrong_dtype, bad_offsets = [], [], []
    spans = []
    for name in sorted(expected.keys() & tensors.keys()):
        entry = tensors[name]
        shape = entry.get("shape") if isinstance(entry, dict) else None
        if not isinstance(shape, list) or tuple(shape) != expected[name]:
            wrong_shape.append(name)
            continue
        if entry.get("dtype") not in FLOAT_DTYPES:
            wrong_dtype.append(name)
            continue
        offsets = entry.get("data_offsets")
        size = FLOAT_DTYPES[entry["dtype"]] * math.prod(shape)
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int for o in offsets)
                or not 0 <= offsets[0] <= offsets[1] <= data_size or offsets[1] - offsets[0] != size):
            bad_offsets.append(name)
            continue
        spans.append(offsets)
    problems = [f"{len(v)} {what} (e.g. {v[0][:80]})" for what, v in
                (("missing", missing), ("unexpected", unexpected), ("wrong-shape", wrong_shape),
                 ("non-float", wrong_dtype), ("out-of-file", bad_offsets)) if v]
    if problems:
        raise CheckpointError(f"{path}: tensors do not match its config: {', '.join(problems)}")
    spans.sort()
    if any(a[1] > b[0] for a, b in zip(spans, spans[1:])):
        raise CheckpointError(f"{path}: tensors overlap in the file")


def load_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu") -> Checkpoint:
    """Rebuild the model from the file alone; weights come back in float32, in eval mode.

    Everything is checked before the model is built: the configs' types and ranges, and the
    header's tensor names, shapes, dtypes and offsets against the shapes the config implies."""
    metadata, tensors, data_size = read_header(path)
    config, diffusion, class_names = configs_from_metadata(metadata, path)
    check_tensors(Path(path), tensors, data_size, config)
    try:
        weights = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path} could not be read (truncated?): {e}") from None
    not_finite = [name for name, t in weights.items() if not torch.isfinite(t).all()]
    if not_finite:
        raise CheckpointError(f"{path}: {len(not_finite)} tensors hold NaN or inf (e.g. {not_finite[0]})")
    return Checkpoint(unet_with_weights(config, weights, device), diffusion, class_names)
