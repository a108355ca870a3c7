"""Model and diffusion configurations, with the named presets.

Both configs travel inside every checkpoint (as JSON in the safetensors metadata), so a
checkpoint alone rebuilds its model and its noise schedule.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ModelConfig:
    """The DDPM U-Net of Ho et al. 2020 (their Appendix B), class-conditional."""

    image_size: int = 32
    in_channels: int = 3
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 2, 2)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = (16,)
    dropout: float = 0.1
    num_classes: int = 10  # the null class (unconditional model) is index num_classes
    num_groups: int = 32
    patch_size: int = 1  # > 1: a pixel-unshuffle stem, so the top level runs at image_size / patch_size

    @property
    def null_class(self) -> int:
        return self.num_classes

    @property
    def time_embed_dim(self) -> int:
        return 4 * self.ch

    @property
    def top_resolution(self) -> int:
        """The side of the U-Net's top-level feature maps (what attn_resolutions refer to)."""
        return self.image_size // self.patch_size

    def validate(self) -> None:
        downsamples = len(self.ch_mult) - 1
        if self.patch_size < 1:
            raise ValueError("patch_size must be at least 1")
        if self.image_size % (self.patch_size * 2**downsamples):
            raise ValueError(f"image_size {self.image_size} is not divisible by patch_size x 2^{downsamples}")
        for mult in (1, *self.ch_mult):
            if (self.ch * mult) % self.num_groups or self.ch * mult < 2 * self.num_groups:
                # One channel a group would normalise away the per-channel embedding added before it.
                raise ValueError(f"{self.ch * mult} channels do not split into {self.num_groups} groups "
                                 "of at least 2 channels")
        if self.num_classes < 1:
            raise ValueError("num_classes must be at least 1")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "ModelConfig":
        fields = json.loads(text)
        for key in ("ch_mult", "attn_resolutions"):
            fields[key] = tuple(fields[key])
        return cls(**fields)

    @classmethod
    def from_name(cls, name: str) -> "ModelConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
        return PRESETS[name]


@dataclass(frozen=True)
class DiffusionConfig:
    """Forward-process variances beta_1..beta_T (Ho et al. 2020, section 4)."""

    num_timesteps: int = 1000
    beta_schedule: str = "linear"  # "linear" (Ho et al.) or "cosine" (Nichol & Dhariwal 2021)
    beta_start: float = 1e-4
    beta_end: float = 0.02

    def validate(self) -> None:
        if self.num_timesteps < 1:
            raise ValueError("num_timesteps must be at least 1")
        if self.beta_schedule not in ("linear", "cosine"):
            raise ValueError(f"unknown beta schedule {self.beta_schedule!r}; use linear or cosine")
        if self.beta_schedule == "linear" and not 0 < self.beta_start <= self.beta_end < 1:
            raise ValueError("need 0 < beta_start <= beta_end < 1")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "DiffusionConfig":
        return cls(**json.loads(text))


# The activation dtypes a model can run in (--precision).
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

PRESETS: dict[str, ModelConfig] = {
    # The paper's CIFAR-10 network: 35.7M parameters (+ the class embedding).
    "ddpm-cifar10": ModelConfig(),
    # The report's STL-10 setting: the same network on 64x64 images (attention at 16x16).
    "ddpm-stl10": ModelConfig(image_size=64),
    # The model we ship: under 8M parameters.
    "cifar10-compact": ModelConfig(ch=64, ch_mult=(1, 2, 2)),
    # The bundled model, trained on a 2-core CPU: 2.25M parameters, 0.73 GFLOP a forward; chosen by
    # the ablation in engine/weights/README.md (a 2x2 pixel-unshuffle stem and attention at 16x16 lost).
    "cifar10-cpu": ModelConfig(ch=32, ch_mult=(1, 2, 2, 2), attn_resolutions=(8,), dropout=0.0, num_groups=16),
    # A few hundred thousand parameters, for tests and CPU smoke runs.
    "tiny": ModelConfig(ch=32, ch_mult=(1, 1), num_res_blocks=1, dropout=0.0, num_groups=8),
}

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer",
                   "dog", "frog", "horse", "ship", "truck")

STL10_CLASSES = ("airplane", "bird", "car", "cat", "deer",
                 "dog", "horse", "monkey", "ship", "truck")
