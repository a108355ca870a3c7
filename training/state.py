"""The full training state, for --resume: ONE safetensors file, written atomically.

Tensors: `model.*` (raw weights), `ema.*` (EMA weights), `optimizer.<param>.<name>`
(AdamW moments and step counts). Metadata (JSON): the training config, the model config
the run was built with, the step, the optimizer's hyper-parameters.

There is no RNG state to store: every random draw of step s (data order, timesteps,
noise, label drops, flips, dropout masks) comes from generators seeded with (seed, s)
or (seed, epoch), so (seed, step) is the whole of it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from engine.errors import UserError
from engine.formats.checkpoint import CheckpointError, atomic_write, safetensors_header

FORMAT = "ddpm-train-state/1"
STATE_FILE = "state.safetensors"


class StateError(UserError):
    """A training state that is missing, unreadable or inconsistent with the run."""


@dataclass
class TrainingState:
    step: int
    train_config: dict
    model_config: str
    model: dict[str, torch.Tensor]
    ema: dict[str, torch.Tensor]
    optimizer: dict
    ema_long: dict[str, torch.Tensor] | None = None  # the second EMA, where the run keeps one


def save_state(path: str | os.PathLike, step: int, train_config: dict, model_config: str,
               model: torch.nn.Module, ema: torch.nn.Module, optimizer: torch.optim.Optimizer,
               ema_long: torch.nn.Module | None = None) -> None:
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    tensors |= {f"ema.{k}": v for k, v in ema.state_dict().items()}
    if ema_long is not None:
        tensors |= {f"ema_long.{k}": v for k, v in ema_long.state_dict().items()}
    opt = optimizer.state_dict()
    scalars = {}
    for index, param_state in opt["state"].items():
        for name, value in param_state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.{index}.{name}"] = value
            else:
                scalars[f"{index}.{name}"] = value
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    metadata = {
        "format": FORMAT,
        "step": str(step),
        "train_config": json.dumps(train_config),
        "model_config": model_config,
        "optimizer_param_groups": json.dumps(opt["param_groups"]),
        "optimizer_scalars": json.dumps(scalars),
    }
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The metadata of a training state, from its header alone (no tensor is read)."""
    path = Path(path)
    try:
        metadata = safetensors_header(path)[0]
    except CheckpointError as e:
        raise StateError(f"{path} is not a readable training state ({str(e)[:100]})") from None
    if metadata.get("format") != FORMAT:
        raise StateError(f"{path} is not a ddpm-train state (no '{FORMAT}' metadata)")
    return metadata


def read_train_config(path: str | os.PathLike) -> dict:
    """The training config saved in a state file (a JSON object; its values are checked by the caller)."""
    return _train_config(read_metadata(path), path)


def _train_config(metadata: dict[str, str], path) -> dict:
    train_config = _json_field(metadata, "train_config", dict, path)
    if not train_config:
        raise StateError(f"{path} has invalid metadata: its train_config is empty")
    return train_config


def _json_field(metadata: dict[str, str], key: str, kind: type, path) -> object:
    try:
        value = json.loads(metadata[key])
    except KeyError:
        raise StateError(f"{path} has invalid metadata: no {key}") from None
    except (ValueError, RecursionError):
        raise StateError(f"{path} has invalid metadata: {key} is not JSON") from None
    if not isinstance(value, kind):
        raise StateError(f"{path} has invalid metadata: {key} is not a JSON {kind.__name__}")
    return value


def load_state(path: str | os.PathLike) -> TrainingState:
    path = Path(path)
    metadata = read_metadata(path)
    train_config = _train_config(metadata, path)
    param_groups = _json_field(metadata, "optimizer_param_groups", list, path)
    scalars = _json_field(metadata, "optimizer_scalars", dict, path)
    step = metadata.get("step", "")
    if not step.isdigit() or "model_config" not in metadata:
        raise StateError(f"{path} has invalid metadata: no step count or model config")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise StateError(f"{path} is not a readable training state ({str(e)[:100]})") from None
    state: dict[int, dict] = {}
    try:
        for key, value in tensors.items():
            if key.startswith("optimizer."):
                _, index, name = key.split(".", 2)
                state.setdefault(int(index), {})[name] = value
        for key, value in scalars.items():
            index, name = key.split(".", 1)
            state.setdefault(int(index), {})[name] = value
        for group in param_groups:
            group["betas"] = tuple(group["betas"])
    except (ValueError, TypeError, KeyError):
        raise StateError(f"{path} has an invalid optimizer state") from None
    return TrainingState(
        step=int(step),
        train_config=train_config,
        model_config=metadata["model_config"],
        model={k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")},
        ema={k[len("ema."):]: v for k, v in tensors.items() if k.startswith("ema.")},
        optimizer={"state": state, "param_groups": param_groups},
        ema_long={k[len("ema_long."):]: v for k, v in tensors.items() if k.startswith("ema_long.")} or None,
    )
