"""`open_checkpoint`: a checkpoint of any kind by its path, the one place the CLI, the server and the
benchmarks open a model; the bundled model's path; the digest a sampling run's images depend on."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from engine.formats.checkpoint import Checkpoint, CheckpointError, load_checkpoint
from engine.formats.diffusers_format import load_diffusers

BUNDLED_CHECKPOINT = Path(__file__).parents[1] / "weights" / "cifar10.safetensors"


def open_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> Checkpoint:
    """A checkpoint of any kind: a folder is a diffusers UNet2DModel (engine.formats.diffusers_format); a
    file by its suffix: an exported .onnx file (ONNX Runtime), a .plan (TensorRT), else a .safetensors checkpoint."""
    if Path(path).is_dir():
        return load_diffusers(path, device)
    match Path(path).suffix:
        case ".onnx":
            from engine.formats.onnx import load_onnx  # onnxruntime is an extra: imported when asked for
            return load_onnx(path, device)
        case ".plan":
            from engine.formats.tensorrt import load_plan
            return load_plan(path, device)
    return load_checkpoint(path, device)


def open_model(path: Path | None, device: torch.device) -> Checkpoint:
    """--checkpoint of any kind (engine.formats.checkpoint.open_checkpoint), or the bundled model."""
    if path is None:
        if not BUNDLED_CHECKPOINT.is_file():
            raise CheckpointError("this install has no bundled model yet; pass --checkpoint PATH "
                             "(the README's \"Train your own\" makes one in a few minutes)")
        path = BUNDLED_CHECKPOINT
    return open_checkpoint(path, device)


def model_digest(path: Path) -> str:
    """sha256 of a checkpoint file (or of every file of a checkpoint folder): what a run's images depend on."""
    files = sorted(f for f in path.rglob("*") if f.is_file()) if path.is_dir() else [path]
    digest = hashlib.sha256()
    for file in files:
        with open(file, "rb") as f:
            digest.update(hashlib.file_digest(f, "sha256").digest())
    return digest.hexdigest()
