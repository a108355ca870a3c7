"""Model and diffusion configurations, with the named presets.

Both configs travel inside every checkpoint (as JSON in the safetensors metadata), so a
checkpoint alone rebuilds its model and its noise schedule.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass

import torch

from engine.errors import ConfigError


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
    num_classes: int = 10  # the null class (unconditional model) is index num_classes; 0: an unconditional model
    num_groups: int = 32
    patch_size: int = 1  # > 1: a pixel-unshuffle stem, so the top level runs at image_size / patch_size
    # What imported models (engine.formats.diffusers_format) differ in; the defaults are our own models'.
    downsample_padding: int = 1  # 1: the stride-2 conv pads every side; 0: bottom/right only (TF 'SAME', Ho et al.)
    norm_eps: float = 1e-5  # GroupNorm's epsilon (Ho et al.'s TF code and diffusers' DDPM configs: 1e-6)
    learned_null: bool = True  # class row num_classes was trained as the null class; False: it is zero, no guidance

    @property
    def null_class(self) -> int:
        return self.num_classes

    @property
    def guidable(self) -> bool:
        """Classifier-free guidance needs classes to condition on and a trained null class."""
        return self.num_classes > 0 and self.learned_null

    @property
    def time_embed_dim(self) -> int:
        return 4 * self.ch

    @property
    def top_resolution(self) -> int:
        """The side of the U-Net's top-level feature maps (what attn_resolutions refer to)."""
        return self.image_size // self.patch_size

    def validate(self) -> None:
        """Types and ranges first (a config may come from a crafted file), then the architecture's rules."""
        for name in ("image_size", "in_channels", "ch", "num_res_blocks", "num_classes", "num_groups", "patch_size"):
            check_int(name, getattr(self, name), *MODEL_LIMITS[name])
        for name, limit in (("ch_mult", 16), ("attn_resolutions", MAX_ATTENTION_SIDE)):
            values = getattr(self, name)
            if not isinstance(values, tuple) or len(values) > MAX_LEVELS:
                raise ConfigError(f"{name} must be a list of at most {MAX_LEVELS} integers")
            for value in values:
                check_int(name, value, 1, limit)
        if not self.ch_mult:
            raise ConfigError("ch_mult must name at least one level")
        check_number("dropout", self.dropout)
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"dropout {self.dropout} is out of range [0, 1)")
        check_int("downsample_padding", self.downsample_padding, 0, 1)
        check_number("norm_eps", self.norm_eps)
        if not 0 < self.norm_eps <= 0.1:
            raise ConfigError(f"norm_eps {self.norm_eps} is out of range (0, 0.1]")
        if type(self.learned_null) is not bool:
            raise ConfigError(f"learned_null must be true or false, not {short_repr(self.learned_null)}")
        if self.num_classes == 0 and self.learned_null:
            raise ConfigError("an unconditional model (num_classes 0) has no learned null class: learned_null must be false")
        downsamples = len(self.ch_mult) - 1
        if self.image_size % (self.patch_size * 2**downsamples):
            raise ConfigError(f"image_size {self.image_size} is not divisible by patch_size x 2^{downsamples}")
        bottom = self.top_resolution >> downsamples  # the middle block attends here whatever attn_resolutions says
        if bottom > MAX_ATTENTION_SIDE:
            raise ConfigError(f"the middle block would attend over {bottom} x {bottom} positions "
                             f"(at most {MAX_ATTENTION_SIDE} x {MAX_ATTENTION_SIDE}): add levels to ch_mult")
        for mult in (1, *self.ch_mult):
            if (self.ch * mult) % self.num_groups or self.ch * mult < 2 * self.num_groups:
                # One channel a group would normalise away the per-channel embedding added before it.
                raise ConfigError(f"{self.ch * mult} channels do not split into {self.num_groups} groups "
                                 "of at least 2 channels")
        if self.parameter_bound() > MAX_PARAMETERS:
            raise ConfigError(f"the model would have up to {self.parameter_bound():.3g} parameters, "
                             f"over the limit of {MAX_PARAMETERS:.0e}")

    def parameter_bound(self) -> int:
        """An upper bound on the U-Net's parameter count, from the config alone (no allocation).

        Every ResBlock is counted at the widest level with the widest input a skip can give it
        (3x): two 3x3 convolutions, a 1x1 shortcut, the embedding projection, plus an attention
        block (4 c^2); the stem, the time MLP and the class embedding are exact."""
        c, emb = self.ch * max(self.ch_mult), self.time_embed_dim
        blocks = len(self.ch_mult) * (2 * self.num_res_blocks + 2) + 2
        block = 9 * 3 * c * c + 9 * c * c + 3 * c * c + emb * c + 4 * c * c + 8 * c
        pixels = self.in_channels * self.patch_size**2
        return (blocks * block + 2 * 9 * pixels * self.ch + self.ch * emb + emb * emb
                + (self.num_classes + 1) * emb)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "ModelConfig":
        """The config of a JSON object (missing fields take their defaults); raises ValueError or
        TypeError on anything else. Call validate() before trusting the values."""
        fields = json_object(text, cls)
        for key in ("ch_mult", "attn_resolutions"):
            if key in fields:
                if not isinstance(fields[key], list):
                    raise ConfigError(f"{key} must be a list of integers")
                fields[key] = tuple(fields[key])
        return cls(**fields)

    @classmethod
    def from_name(cls, name: str) -> "ModelConfig":
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
        return PRESETS[name]


@dataclass(frozen=True)
class DiffusionConfig:
    """Forward-process variances beta_1..beta_T (Ho et al. 2020, section 4)."""

    num_timesteps: int = 1000
    beta_schedule: str = "linear"  # "linear" (Ho et al.) or "cosine" (Nichol & Dhariwal 2021)
    beta_start: float = 1e-4
    beta_end: float = 0.02

    def validate(self) -> None:
        check_int("num_timesteps", self.num_timesteps, 1, MAX_TIMESTEPS)
        if self.beta_schedule not in ("linear", "cosine"):
            raise ConfigError(f"unknown beta schedule {str(self.beta_schedule)[:40]!r}; use linear or cosine")
        check_number("beta_start", self.beta_start)
        check_number("beta_end", self.beta_end)
        if self.beta_schedule == "linear" and not 0 < self.beta_start <= self.beta_end < 1:
            raise ConfigError("need 0 < beta_start <= beta_end < 1")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "DiffusionConfig":
        return cls(**json_object(text, cls))


# Bounds on what a config may ask for, far past every preset, so that a crafted file cannot make
# the loader allocate gigabytes (the largest preset has 36M parameters).
MAX_PARAMETERS = 1_000_000_000
MAX_LEVELS = 8
MAX_ATTENTION_SIDE = 64  # attention over 64 x 64 = 4096 positions; beyond it the score matrix alone is GBs
MAX_TIMESTEPS = 100_000
MODEL_LIMITS = {  # field: (min, max)
    "image_size": (1, 2048), "in_channels": (1, 64), "ch": (1, 4096), "num_res_blocks": (1, 16),
    "num_classes": (0, 100_000), "num_groups": (1, 4096), "patch_size": (1, 64),
}


def check_int(name: str, value: object, lo: int, hi: int) -> None:
    """A real integer (not a bool, not 32.0) in [lo, hi]."""
    if type(value) is not int:
        raise ConfigError(f"{name} must be an integer, not {short_repr(value)}")
    if not lo <= value <= hi:
        raise ConfigError(f"{name} {value} is out of range [{lo}, {hi}]")


def check_number(name: str, value: object) -> None:
    """A finite int or float (not a bool, not a string)."""
    if type(value) not in (int, float) or not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number, not {short_repr(value)}")


def short_repr(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def json_object(text: str, cls: type) -> dict:
    """The fields of a config written as a JSON object; unknown fields are a TypeError."""
    try:
        fields = json.loads(text)
    except RecursionError:
        raise ConfigError("nested too deeply") from None
    if not isinstance(fields, dict):
        raise ConfigError(f"{cls.__name__} must be a JSON object, not {type(fields).__name__}")
    unknown = set(fields) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
        raise ConfigError(f"unknown {cls.__name__} field {short_repr(sorted(unknown)[0])}")
    return fields


# The activation dtypes a model can run in (--precision).
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

PRESETS: dict[str, ModelConfig] = {
    # The paper's CIFAR-10 network: 35.7M parameters (+ the class embedding).
    "ddpm-cifar10": ModelConfig(),
    # The report's STL-10 setting: the same network on 64x64 images (attention at 16x16).
    "ddpm-stl10": ModelConfig(image_size=64),
    # A compact CIFAR-10 network within an 8M-parameter budget (the bundled model is cifar10-cpu, below).
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
