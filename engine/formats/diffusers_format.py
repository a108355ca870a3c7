"""diffusers `UNet2DModel` folders <-> ddpm-engine checkpoints, both ways, without diffusers.

A diffusers folder holds `config.json` (the UNet2DModel's config), `diffusion_pytorch_model.safetensors`
and, beside them or in a pipeline's `scheduler/` folder, `scheduler_config.json` (a DDPMScheduler's).
A pipeline folder (`model_index.json`, `unet/`, `scheduler/`) works too. The files are read as JSON
and safetensors: nothing is unpickled, and diffusers need not be installed.

The U-Net of Ho et al. is the same network in both: module for module (ours -> diffusers')

    time_mlp.0, time_mlp.2          time_embedding.linear_1, .linear_2
    class_embed                     class_embedding (num_class_embeds)
    down.i (level l, layer j)       down_blocks.l.resnets.j, .attentions.j; Downsample: .downsamplers.0
    mid.0, mid.1, mid.2             mid_block.resnets.0, .attentions.0, .resnets.1
    up.i (level l, layer j)         up_blocks.l.resnets.j, .attentions.j;   Upsample: .upsamplers.0
    ResBlock norm1 conv1 emb_proj norm2 conv2 shortcut    norm1 conv1 time_emb_proj norm2 conv2 conv_shortcut
    AttnBlock norm, qkv (1x1 conv), proj_out (1x1 conv)   group_norm, to_q|to_k|to_v (linear), to_out.0 (linear)
    norm_out, conv_out              conv_norm_out, conv_out

Classes: diffusers has no null class. A model we export keeps its learned null class as the last
class embedding (num_class_embeds = classes + 1) and says so, with its class names, in the private
`_ddpm_engine` key of config.json (diffusers ignores keys starting with "_"). A foreign
class-conditional model gets a zero null row (learned_null false: no guidance); an unconditional
one is num_classes 0, whose only label, 0, is that zero row.

Whatever a config asks for that our U-Net cannot compute is refused, naming the field.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterator

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from engine.config import DiffusionConfig, ModelConfig
from engine.formats.checkpoint import (
    Checkpoint,
    CheckpointError,
    atomic_write,
    expected_shapes,
    meta_unet,
    unet_with_weights,
)
from engine.model import AttnBlock, Downsample, ResBlock, UNet, Upsample
from engine.settings import SampleSettings

CONFIG = "config.json"
WEIGHTS = "diffusion_pytorch_model.safetensors"
SCHEDULER = "scheduler_config.json"
MARKER = "_ddpm_engine"  # our private key in config.json
MAX_JSON = 1_000_000  # bytes of a config file

# UNet2DModel's defaults (diffusers 0.42.1) for the fields we read: a config.json may leave any out.
UNET_DEFAULTS = {
    "sample_size": None, "in_channels": 3, "out_channels": 3, "center_input_sample": False,
    "time_embedding_type": "positional", "time_embedding_dim": None, "freq_shift": 0, "flip_sin_to_cos": True,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"],
    "mid_block_type": "UNetMidBlock2D",
    "up_block_types": ["AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [224, 448, 672, 896], "layers_per_block": 2, "mid_block_scale_factor": 1,
    "downsample_padding": 1, "downsample_type": "conv", "upsample_type": "conv", "dropout": 0.0, "act_fn": "silu",
    "attention_head_dim": 8, "norm_num_groups": 32, "attn_norm_num_groups": None, "norm_eps": 1e-5,
    "resnet_time_scale_shift": "default", "add_attention": True, "class_embed_type": None, "num_class_embeds": None,
    "num_train_timesteps": None,
}
# The fields our U-Net computes only one way: field -> the values it accepts.
UNET_FIXED = {
    "center_input_sample": (False,),
    "time_embedding_type": ("positional",),
    "freq_shift": (1,),  # Ho et al.'s embedding: frequencies 10000^(-i / (half - 1)),
    "flip_sin_to_cos": (False,),  # sin before cos
    "mid_block_type": ("UNetMidBlock2D",),
    "mid_block_scale_factor": (1,),
    "downsample_type": ("conv",),
    "upsample_type": ("conv",),
    "act_fn": ("silu", "swish"),  # both are nn.SiLU in diffusers
    "resnet_time_scale_shift": ("default",),
    "add_attention": (True,),
    "class_embed_type": (None,),
}
SCHEDULER_DEFAULTS = {  # DDPMScheduler's (diffusers 0.42.1), for the fields that define the model's noise
    "num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
    "trained_betas": None, "variance_type": "fixed_small", "clip_sample": True, "prediction_type": "epsilon",
    "rescale_betas_zero_snr": False,
}
BETA_SCHEDULES = {"linear": "linear", "squaredcos_cap_v2": "cosine"}  # diffusers' name: ours (same formula)
OLD_ATTENTION_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}  # diffusers < 0.15


def read_json(path: Path) -> dict:
    try:
        if path.stat().st_size > MAX_JSON:
            raise ValueError("too large")
        value = json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError, RecursionError) as e:
        raise CheckpointError(f"{path} is not a readable JSON config: {e}") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path} is not a JSON object")
    return value


def unet_folder(path: Path) -> Path:
    """The folder holding the UNet2DModel: `path` itself, or a pipeline's unet/."""
    if not path.is_dir():
        raise CheckpointError(f"diffusers folder not found: {path}")
    if (path / CONFIG).is_file():
        return path
    if (path / "unet" / CONFIG).is_file():
        return path / "unet"
    raise CheckpointError(f"{path} is not a diffusers UNet2DModel folder (no {CONFIG}, nor unet/{CONFIG})")


def scheduler_file(unet_dir: Path) -> Path | None:
    for path in (unet_dir / SCHEDULER, unet_dir.parent / "scheduler" / SCHEDULER, unet_dir / "scheduler" / SCHEDULER):
        if path.is_file():
            return path
    return None


# --- configs -----------------------------------------------------------------------------------


def refuse(source: str, field: str, value: object, why: str) -> CheckpointError:
    return CheckpointError(f"{source}: {field} {json.dumps(value)[:60]} cannot be represented: {why}")


def model_config(unet: dict, source: str = CONFIG) -> tuple[ModelConfig, tuple[str, ...]]:
    """Our ModelConfig and class names for a UNet2DModel config; refuses what our U-Net cannot compute."""
    cfg = unet_fields(unet, source)
    channels, attention = block_layout(cfg, source)
    ch, size = channels[0], sample_size(cfg, source)
    check_attention(cfg, channels, attention, source)
    num_classes, learned_null, names = class_labels(unet, cfg, source)
    config = ModelConfig(
        image_size=size, in_channels=cfg["in_channels"], ch=ch, ch_mult=tuple(c // ch for c in channels),
        num_res_blocks=cfg["layers_per_block"],
        attn_resolutions=tuple(size >> level for level, attn in enumerate(attention) if attn),
        dropout=cfg["dropout"], num_classes=num_classes, num_groups=cfg["norm_num_groups"],
        downsample_padding=cfg["downsample_padding"], norm_eps=cfg["norm_eps"], learned_null=learned_null)
    try:
        config.validate()
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{source}: {e}") from None
    return config, names


def unet_fields(unet: dict, source: str) -> dict:
    """The UNet2DModel config with diffusers' defaults filled in; only the fields and values we compute."""
    name = unet.get("_class_name", "UNet2DModel")
    if name != "UNet2DModel":
        raise CheckpointError(f"{source}: _class_name {str(name)[:40]!r} is not UNet2DModel (only pixel-space "
                              "UNet2DModel checkpoints can be converted)")
    unknown = sorted(k for k in unet if not k.startswith("_") and k not in UNET_DEFAULTS)
    if unknown:
        raise refuse(source, unknown[0], unet[unknown[0]], "not a UNet2DModel field of diffusers 0.42")
    cfg = {**UNET_DEFAULTS, **unet}
    for field, accepted in UNET_FIXED.items():
        if cfg[field] not in accepted:
            raise refuse(source, field, cfg[field], f"our U-Net supports only {json.dumps(accepted[0])}")
    if cfg["out_channels"] != cfg["in_channels"]:
        raise refuse(source, "out_channels", cfg["out_channels"], "the model must predict eps, with in_channels channels")
    if cfg["downsample_padding"] not in (0, 1):
        raise refuse(source, "downsample_padding", cfg["downsample_padding"], "only 0 (bottom/right) or 1 (every side)")
    return cfg


def block_layout(cfg: dict, source: str) -> tuple[list[int], list[bool]]:
    """(width of each level, whether it attends), from block_out_channels and the block types."""
    channels = cfg["block_out_channels"]
    if not isinstance(channels, list) or not channels or not all(type(c) is int and c > 0 for c in channels):
        raise refuse(source, "block_out_channels", channels, "must be a list of positive integers")
    if any(c % channels[0] for c in channels):
        raise refuse(source, "block_out_channels", channels, "every width must be a multiple of the first")
    down, up = cfg["down_block_types"], cfg["up_block_types"]
    for field, types, kinds in (("down_block_types", down, ("DownBlock2D", "AttnDownBlock2D")),
                                ("up_block_types", up, ("UpBlock2D", "AttnUpBlock2D"))):
        if not isinstance(types, list) or len(types) != len(channels) or any(t not in kinds for t in types):
            raise refuse(source, field, types, f"need {len(channels)} of {' or '.join(kinds)}")
    attention = [t == "AttnDownBlock2D" for t in down]
    if [t == "AttnUpBlock2D" for t in reversed(up)] != attention:
        raise refuse(source, "up_block_types", up, "attention must be at the same resolutions as in down_block_types")
    return channels, attention


def sample_size(cfg: dict, source: str) -> int:
    size = cfg["sample_size"]
    if isinstance(size, list) and len(size) == 2 and size[0] == size[1]:
        size = size[0]
    if type(size) is not int:
        raise refuse(source, "sample_size", size, "need one integer side (square images)")
    return size


def check_attention(cfg: dict, channels: list[int], attention: list[bool], source: str) -> None:
    """The time embedding's width and attention's norm and heads as our U-Net has them."""
    ch = channels[0]
    if cfg["time_embedding_dim"] not in (None, 4 * ch):
        raise refuse(source, "time_embedding_dim", cfg["time_embedding_dim"], f"ours is 4 x block_out_channels[0] = {4 * ch}")
    if cfg["attn_norm_num_groups"] not in (None, cfg["norm_num_groups"]):
        raise refuse(source, "attn_norm_num_groups", cfg["attn_norm_num_groups"], "must equal norm_num_groups")
    head_dim = cfg["attention_head_dim"]
    widths = [c for c, attn in zip(channels, attention) if attn] + [channels[-1]]  # the middle block always attends
    if head_dim is not None and any(head_dim != c for c in widths):
        raise refuse(source, "attention_head_dim", head_dim, "our attention is single-head: use null "
                     "(one head as wide as the block)")


def class_labels(unet: dict, cfg: dict, source: str) -> tuple[int, bool, tuple[str, ...]]:
    """(classes, whether the last class embedding is our learned null class, class names): the names and
    the null class from our own marker in the config when it is there (a folder we wrote)."""
    classes = cfg["num_class_embeds"]
    if classes is not None and (type(classes) is not int or classes < 1):
        raise refuse(source, "num_class_embeds", classes, "must be a positive integer")
    ours = unet.get(MARKER) if isinstance(unet.get(MARKER), dict) else {}
    learned_null = classes is not None and ours.get("learned_null") is True
    num_classes = 0 if classes is None else classes - learned_null
    names = ours.get("class_names")
    if not (isinstance(names, list) and len(names) == num_classes):
        names = [str(i) for i in range(num_classes)]
    return num_classes, learned_null, tuple(names)


def unet_config(config: ModelConfig, class_names: tuple[str, ...]) -> dict:
    """The UNet2DModel config.json of our config."""
    if config.patch_size != 1:
        raise CheckpointError(f"patch_size {config.patch_size} cannot be exported: diffusers' UNet2DModel has "
                              "no pixel-unshuffle stem")
    levels = range(len(config.ch_mult))
    attention = [config.top_resolution >> level in config.attn_resolutions for level in levels]
    return {
        "_class_name": "UNet2DModel",
        "sample_size": config.image_size, "in_channels": config.in_channels, "out_channels": config.in_channels,
        "center_input_sample": False, "time_embedding_type": "positional", "time_embedding_dim": None,
        "freq_shift": 1, "flip_sin_to_cos": False,
        "down_block_types": ["AttnDownBlock2D" if a else "DownBlock2D" for a in attention],
        "mid_block_type": "UNetMidBlock2D",
        "up_block_types": ["AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)],
        "block_out_channels": [config.ch * m for m in config.ch_mult], "layers_per_block": config.num_res_blocks,
        "mid_block_scale_factor": 1, "downsample_padding": config.downsample_padding, "downsample_type": "conv",
        "upsample_type": "conv", "dropout": config.dropout, "act_fn": "silu", "attention_head_dim": None,
        "norm_num_groups": config.num_groups, "attn_norm_num_groups": None, "norm_eps": config.norm_eps,
        "resnet_time_scale_shift": "default", "add_attention": True, "class_embed_type": None,
        "num_class_embeds": (config.num_classes + config.learned_null) or None,
        MARKER: {"class_names": list(class_names), "learned_null": config.learned_null},
    }


def diffusion_config(scheduler: dict | None, source: str = SCHEDULER) -> DiffusionConfig:
    """Our DiffusionConfig for a DDPM/DDIM scheduler config (None: DDPMScheduler's defaults). Only the
    fields that define the forward process are read; how diffusers samples (variance_type, clip_sample,
    timestep_spacing, ...) is a sampling setting here (see sampling_hint)."""
    cfg = {**SCHEDULER_DEFAULTS, **(scheduler or {})}
    if cfg["beta_schedule"] not in BETA_SCHEDULES:
        raise refuse(source, "beta_schedule", cfg["beta_schedule"], f"use {' or '.join(BETA_SCHEDULES)}")
    for field, accepted in (("trained_betas", None), ("prediction_type", "epsilon"), ("rescale_betas_zero_snr", False)):
        if cfg[field] != accepted:
            raise refuse(source, field, cfg[field], f"our samplers need {json.dumps(accepted)}")
    if cfg["variance_type"] in ("learned", "learned_range"):
        raise refuse(source, "variance_type", cfg["variance_type"], "our U-Net predicts eps only, not a variance")
    diffusion = DiffusionConfig(num_timesteps=cfg["num_train_timesteps"], beta_schedule=BETA_SCHEDULES[cfg["beta_schedule"]],
                                beta_start=cfg["beta_start"], beta_end=cfg["beta_end"])
    try:
        diffusion.validate()
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{source}: {e}") from None
    return diffusion


def scheduler_config(diffusion: DiffusionConfig) -> dict:
    """A DDPMScheduler config of our diffusion config, sampling as `ddpm-engine sample --sampler ddpm` does by default."""
    defaults = SampleSettings()
    return {
        "_class_name": "DDPMScheduler",
        "num_train_timesteps": diffusion.num_timesteps, "beta_start": diffusion.beta_start,
        "beta_end": diffusion.beta_end,
        "beta_schedule": next(k for k, v in BETA_SCHEDULES.items() if v == diffusion.beta_schedule),
        "trained_betas": None, "variance_type": f"fixed_{defaults.variance}", "clip_sample": defaults.clip_x0,
        "prediction_type": "epsilon",
        # Dynamic thresholding as ours: s = max(1, quantile), with no upper bound (diffusers caps s at
        # sample_max_value, 1.0 by default, which is plain clipping).
        "thresholding": defaults.threshold > 0, "dynamic_thresholding_ratio": defaults.threshold or 0.995,
        "sample_max_value": 1e9,
    }


def sampling_hint(path: str | os.PathLike) -> str:
    """How to sample here as the DDPMScheduler of a diffusers folder samples."""
    scheduler = scheduler_file(unet_folder(Path(path)))
    cfg = {**SCHEDULER_DEFAULTS, **({} if scheduler is None else read_json(scheduler))}
    variance = "large" if str(cfg["variance_type"]).startswith("fixed_large") else "small"
    if cfg.get("thresholding"):  # s capped at sample_max_value (default 1: clipping); ours has no cap
        ratio, cap = cfg.get("dynamic_thresholding_ratio", 0.995), cfg.get("sample_max_value", 1.0)
        numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (ratio, cap))
        bound = f" --threshold {ratio}" if numbers and cap > 1 else " --clip-x0"
        how = f"thresholding true (ratio {ratio}, sample_max_value {cap})"
    else:
        bound = " --clip-x0" if cfg["clip_sample"] else " --threshold 0"
        how = f"clip_sample {json.dumps(cfg['clip_sample'])}"
    return (f"its DDPMScheduler samples with variance_type {cfg['variance_type']}, {how}: --sampler ddpm "
            f"--variance {variance}{bound}")


# --- weights -----------------------------------------------------------------------------------


def module_pairs(model: UNet) -> list[tuple[str, str, torch.nn.Module]]:
    """(our name, diffusers' name, our module) of every module of `model` that holds weights."""
    pairs = [("time_mlp.0", "time_embedding.linear_1", model.time_mlp[0]),
             ("time_mlp.2", "time_embedding.linear_2", model.time_mlp[2]),
             ("conv_in", "conv_in", model.conv_in), ("norm_out", "conv_norm_out", model.norm_out),
             ("conv_out", "conv_out", model.conv_out)]

    def path(blocks, ours: str, theirs: str, resample: type, resampler: str) -> None:
        level, layer = 0, 0
        for i, block in enumerate(blocks):
            if isinstance(block[0], resample):
                pairs.append((f"{ours}.{i}.0.conv", f"{theirs}.{level}.{resampler}.0.conv", block[0].conv))
                level, layer = level + 1, 0
                continue
            for k, module in enumerate(block):
                kind = "resnets" if isinstance(module, ResBlock) else "attentions"
                pairs.append((f"{ours}.{i}.{k}", f"{theirs}.{level}.{kind}.{layer}", module))
            layer += 1

    path(model.down, "down", "down_blocks", Downsample, "downsamplers")
    pairs += [("mid.0", "mid_block.resnets.0", model.mid[0]), ("mid.1", "mid_block.attentions.0", model.mid[1]),
              ("mid.2", "mid_block.resnets.1", model.mid[2])]
    path(model.up, "up", "up_blocks", Upsample, "upsamplers")
    return pairs


RESBLOCK_NAMES = {"norm1": "norm1", "conv1": "conv1", "emb_proj": "time_emb_proj", "norm2": "norm2",
                  "conv2": "conv2", "shortcut": "conv_shortcut"}


def tensor_pairs(model: UNet) -> Iterator[tuple[str, tuple[str, ...], bool]]:
    """(our name, their names, reshape) for every weight and bias of `model` but the class embedding: the
    one name table both directions follow. Where they name several tensors (attention's to_q, to_k,
    to_v), ours is their concatenation; reshape: ours is a 1x1 convolution where theirs is a linear."""
    for our_name, their_name, module in module_pairs(model):
        for p in ("weight", "bias"):
            if isinstance(module, ResBlock):
                for a, b in RESBLOCK_NAMES.items():
                    if a != "shortcut" or not isinstance(module.shortcut, torch.nn.Identity):
                        yield f"{our_name}.{a}.{p}", (f"{their_name}.{b}.{p}",), False
            elif isinstance(module, AttnBlock):
                yield f"{our_name}.norm.{p}", (f"{their_name}.group_norm.{p}",), False
                yield f"{our_name}.qkv.{p}", tuple(f"{their_name}.to_{x}.{p}" for x in "qkv"), p == "weight"
                yield f"{our_name}.proj_out.{p}", (f"{their_name}.to_out.0.{p}",), p == "weight"
            else:
                yield f"{our_name}.{p}", (f"{their_name}.{p}",), False


def to_ours(theirs: dict[str, torch.Tensor], model: UNet) -> dict[str, torch.Tensor]:
    """Our state dict from diffusers' (keys it does not consume are left in `theirs`)."""
    ours = {}

    def take(name: str) -> torch.Tensor:
        if name not in theirs:
            raise CheckpointError(f"{WEIGHTS} has no tensor {name[:100]} (its config.json asks for it)")
        return theirs.pop(name)

    for our_name, their_names, reshape in tensor_pairs(model):
        tensor = torch.cat([take(name) for name in their_names])
        ours[our_name] = tensor[..., None, None] if reshape else tensor
    config = model.config
    rows = theirs.pop("class_embedding.weight", None)
    if (rows is None) != (config.num_classes == 0):
        raise CheckpointError(f"{WEIGHTS}: class_embedding.weight is {'missing' if rows is None else 'unexpected'} "
                              "for its config.json")
    null = torch.zeros(1, config.time_embed_dim)
    ours["class_embed.weight"] = null if rows is None else rows if config.learned_null else torch.cat([rows.float(), null])
    return ours


def to_theirs(ours: dict[str, torch.Tensor], model: UNet) -> dict[str, torch.Tensor]:
    """diffusers' state dict from ours."""
    theirs = {}
    for our_name, their_names, reshape in tensor_pairs(model):
        tensor = ours[our_name].flatten(1) if reshape else ours[our_name]
        theirs.update(zip(their_names, tensor.chunk(len(their_names))))
    config, rows = model.config, ours["class_embed.weight"]
    if config.num_classes == 0:
        # The only label, 0, adds a constant to the embedding: diffusers' unconditional model has it in the bias.
        theirs["time_embedding.linear_2.bias"] = theirs["time_embedding.linear_2.bias"] + rows[0]
    else:
        theirs["class_embedding.weight"] = rows if config.learned_null else rows[:config.num_classes]
    return theirs


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        if path.with_suffix(".bin").is_file():
            raise CheckpointError(f"{path.parent} holds only {path.with_suffix('.bin').name}, a pickle, which is never "
                                  f"loaded here: save it as safetensors with diffusers first "
                                  f"(UNet2DModel.from_pretrained(DIR).save_pretrained(DIR))")
        raise CheckpointError(f"{path.parent} has no {path.name}")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path} could not be read: {e}") from None
    for name, t in tensors.items():
        if not t.is_floating_point():
            raise CheckpointError(f"{path}: tensor {name[:100]} is not floating-point")
        if not torch.isfinite(t).all():
            raise CheckpointError(f"{path}: tensor {name[:100]} holds NaN or inf")
    renamed = {}
    for name, t in tensors.items():  # attention weights of diffusers < 0.15 (e.g. google/ddpm-*) by today's names
        module, _, param = name.rpartition(".")
        head, _, last = module.rpartition(".")
        if ".attentions." in name and last in OLD_ATTENTION_NAMES:
            name = f"{head}.{OLD_ATTENTION_NAMES[last]}.{param}"
        renamed[name] = t
    return renamed


def load_diffusers(path: str | os.PathLike, device: str | torch.device = "cpu") -> Checkpoint:
    """A diffusers UNet2DModel folder (with its scheduler config, if any) as a Checkpoint of our U-Net."""
    folder = unet_folder(Path(path))
    config, class_names = model_config(read_json(folder / CONFIG), str(folder / CONFIG))
    scheduler = scheduler_file(folder)
    diffusion = diffusion_config(None if scheduler is None else read_json(scheduler), str(scheduler))
    theirs = read_weights(folder / WEIGHTS)
    ours = to_ours(theirs, meta_unet(config))
    if theirs:
        raise CheckpointError(f"{folder / WEIGHTS}: {len(theirs)} tensors its config.json does not account for "
                              f"(e.g. {min(theirs)[:80]})")
    shapes = expected_shapes(config)
    wrong = sorted(name for name, t in ours.items() if tuple(t.shape) != shapes[name])
    if wrong:
        raise CheckpointError(f"{folder / WEIGHTS}: {len(wrong)} tensors do not match config.json's shapes "
                              f"(e.g. {wrong[0]})")
    return Checkpoint(unet_with_weights(config, ours, device), diffusion, class_names)


def save_diffusers(ckpt: Checkpoint, out: str | os.PathLike) -> None:
    """Write `ckpt` as a folder UNet2DModel.from_pretrained and DDPMScheduler.from_pretrained load (float32)."""
    if ckpt.runtime != "pytorch":
        raise CheckpointError(f"a {ckpt.runtime} export cannot be converted: pass its .safetensors checkpoint")
    out = Path(out)
    unet = unet_config(ckpt.config, ckpt.class_names)
    state = {name: t.detach().to("cpu", torch.float32) for name, t in ckpt.unet.state_dict().items()}
    tensors = {name: t.contiguous() for name, t in to_theirs(state, ckpt.unet).items()}
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / WEIGHTS, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    atomic_write(out / SCHEDULER, lambda tmp: Path(tmp).write_text(json.dumps(scheduler_config(ckpt.diffusion), indent=2) + "\n"))
    atomic_write(out / CONFIG, lambda tmp: Path(tmp).write_text(json.dumps(unet, indent=2) + "\n"))
