"""Sampling on several processes under torchrun: rank r samples every world-size-th shard of the
run (shards r, r + W, r + 2W, ...) into the shared work folder, and rank 0 assembles the one output.

Image i's noise and label depend only on (seed, i) (engine.noise, engine.generate), so the
gathered result is the single-process result whatever the number of ranks. NCCL on CUDA
(each rank on cuda:LOCAL_RANK), gloo on the CPU.

    torchrun --nproc-per-node 8 -m engine.apps.cli sample -n 100000 --out samples
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from engine.errors import ConfigError


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(name: str) -> torch.device:
    """--device: "auto" (CUDA when there is one), "cpu" or "cuda[:k]"; ValueError for anything unusable."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown device {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda asked for, but CUDA is not available")
    return device


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(device_type: str) -> World:
    """Join the process group torchrun set up (NCCL for CUDA, gloo for the CPU); a no-op alone."""
    if not launched_by_torchrun():
        return World()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)  # before NCCL starts, so each rank talks from its own GPU
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    return World(dist.get_rank(), dist.get_world_size(), local_rank)


def device_for(world: World, device: torch.device) -> torch.device:
    """cuda -> this rank's own GPU (cuda:LOCAL_RANK); other devices unchanged."""
    if device.type == "cuda" and world.size > 1:
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
    return device


def broadcast_flag(world: World, flag: bool) -> bool:
    """Rank 0's flag, on every rank (e.g. rank 0's clock deciding when all stop)."""
    if world.size == 1:
        return flag
    value = torch.tensor([int(flag)], device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.broadcast(value, src=0)
    return bool(value.item())


def barrier(world: World) -> None:
    if world.size > 1:
        dist.barrier()


def finish(world: World) -> None:
    if world.size > 1 and dist.is_initialized():
        dist.destroy_process_group()
