"""Export the U-Net epsilon model to ONNX, then verify the file against PyTorch.

`ddpm-export` writes these files for deployment; `--backend onnx` (engine.backends) makes one
for a .safetensors checkpoint on the fly, then runs it through engine/formats/onnx.py.

The graph has inputs x (float32, B x C x H x W), t (int64, B) and class (int64, B) and
one output eps (float32, B x C x H x W), with the batch dimension B dynamic (the sampler
sends 2B images under guidance). The model config, the diffusion config and the class
names ride in the ONNX metadata_props, under the same keys and JSON strings as in the
safetensors checkpoint, so the .onnx file alone rebuilds a sampler.

Before tracing, two modules of the eager U-Net are swapped for export versions with the
same weights, so that the precision of each op is explicit in the graph:
- GroupNorm becomes ReduceMean/Sub/Mul/Sqrt/Div on a float32 copy of the activations
  (no ONNX GroupNormalization, whose meaning changed between opsets 18 and 21 and which
  not every runtime implements; no fp16 InstanceNormalization, a known source of overflow
  in ONNX Runtime and TensorRT);
- attention scales q before q k^T and takes the softmax in float32.
With --fp16 everything else (weights and activations) is float16; the graph's inputs and
output stay float32, with the casts inside the graph. The time and class embeddings stay
float32 too: sin/cos of t * freq for t up to T - 1 needs more than fp16's 11 bits.

Verification runs ONNX Runtime's CPU provider, which runs the fp16 nodes it has no fp16
kernel for (most convolutions on x86) in float32 behind inserted casts: on the CPU it
checks the graph and its fp16 weights, and the fp16 arithmetic itself is tested in torch
(tests/export) and by the TensorRT test on a GPU.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from engine.errors import UserError
from engine.formats.checkpoint import Checkpoint, atomic_write, checkpoint_metadata
from engine.formats.onnx import INPUT_NAMES, OUTPUT_NAME, open_session
from engine.model import AttnBlock, GroupNorm32, UNet, keep_float32_islands, swap_modules

# Opset 17: before GroupNormalization (18/21) and the ReduceMean axes-as-input change (18);
# accepted by ONNX Runtime >= 1.12 and TensorRT 8.6 and 10.
DEFAULT_OPSET = 17
OPSETS = range(14, 21)
# Verification tolerance on ||ort - torch|| / ||torch||, per precision; the reference is
# always the float32 eager model.
TOLERANCE = {"fp32": 1e-4, "fp16": 1e-2}
# The exporter's version, part of the cache key: raise it when a change here changes the graph written.
EXPORTER = 2


class ExportError(UserError):
    """An export that could not be written or did not match PyTorch; no file is left behind."""


class ExportGroupNorm(nn.Module):
    """GroupNorm with float32 statistics, as plain reductions (mean, then mean squared deviation)."""

    def __init__(self, norm: nn.GroupNorm):
        super().__init__()
        self.num_groups, self.eps = norm.num_groups, norm.eps
        self.weight = nn.Parameter(norm.weight.detach().float().clone())
        self.bias = nn.Parameter(norm.bias.detach().float().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        groups = x.float().reshape(b, self.num_groups, -1)  # fp16 -> fp32 boundary
        centered = groups - groups.mean(dim=2, keepdim=True)
        var = centered.square().mean(dim=2, keepdim=True)
        normed = (centered / torch.sqrt(var + self.eps)).reshape(b, c, h, w)
        out = normed * self.weight[:, None, None] + self.bias[:, None, None]
        return out.to(x.dtype)  # fp32 -> activation dtype


class ExportAttnBlock(nn.Module):
    """AttnBlock with q pre-scaled by 1/sqrt(c) and the softmax over float32 logits."""

    def __init__(self, attn: AttnBlock):
        super().__init__()
        self.norm, self.qkv, self.proj_out = attn.norm, attn.qkv, attn.proj_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, c, h * w).unbind(1)  # each (b, c, tokens)
        logits = torch.bmm((q * (1.0 / math.sqrt(c))).transpose(1, 2), k)  # (b, tokens, tokens)
        weights = torch.softmax(logits.float(), dim=-1).to(v.dtype)
        out = torch.bmm(v, weights.transpose(1, 2)).reshape(b, c, h, w)
        return x + self.proj_out(out)


class EpsilonGraph(nn.Module):
    """What is traced: float32 in, float32 out, the U-Net in `dtype` in between."""

    def __init__(self, unet: UNet, dtype: torch.dtype):
        super().__init__()
        self.unet, self.dtype = unet, dtype

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.unet(x.to(self.dtype), t, y).float()


def export_module(model: UNet, fp16: bool) -> EpsilonGraph:
    """A copy of `model` with GroupNorm and attention swapped for their export versions."""
    unet = copy.deepcopy(model).cpu().float().eval()
    if fp16:
        unet = keep_float32_islands(unet.half())
    # Children first: an attention block keeps its norm, already swapped.
    unet = swap_modules(unet, {GroupNorm32: ExportGroupNorm, AttnBlock: ExportAttnBlock})
    return EpsilonGraph(unet, torch.float16 if fp16 else torch.float32).eval()


def metadata_props(ckpt: Checkpoint, fp16: bool) -> dict[str, str]:
    return checkpoint_metadata(ckpt.config, ckpt.diffusion, ckpt.class_names) | {"precision": "fp16" if fp16 else "fp32"}


def random_inputs(config, batch: int, seed: int, num_timesteps: int) -> tuple[torch.Tensor, ...]:
    """Verification inputs: x ~ N(0, I), any timestep, any class including the null class."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, config.in_channels, config.image_size, config.image_size, generator=g)
    t = torch.randint(0, num_timesteps, (batch,), generator=g)
    y = torch.randint(0, config.num_classes + 1, (batch,), generator=g)
    return x, t, y


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||, in float64."""
    a, b = a.double(), b.double()
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


def write_onnx(ckpt: Checkpoint, path: str | os.PathLike, fp16: bool, opset: int) -> None:
    """Trace the export module to `path` (TorchScript exporter), add metadata, run onnx.checker."""
    try:
        import onnx
    except ImportError:
        raise ExportError("exporting needs onnx and onnxruntime: pip install 'ddpm-engine[export]'") from None

    graph = export_module(ckpt.unet, fp16)
    example = random_inputs(ckpt.config, 2, 0, ckpt.diffusion.num_timesteps)
    batch = {0: "batch"}
    with warnings.catch_warnings():
        # The TorchScript exporter is deprecated in favour of dynamo, and the tracer warns
        # about shapes it records symbolically; neither is actionable here.
        warnings.simplefilter("ignore")
        torch.onnx.export(graph, example, str(path), input_names=list(INPUT_NAMES), output_names=[OUTPUT_NAME],
                          dynamic_axes={"x": batch, "t": batch, "class": batch, OUTPUT_NAME: batch},
                          opset_version=opset, do_constant_folding=True, dynamo=False)
    proto = onnx.load(str(path))
    for key, value in metadata_props(ckpt, fp16).items():
        proto.metadata_props.add(key=key, value=value)
    proto.doc_string = "ddpm-engine epsilon model eps(x, t, class)"
    try:
        onnx.checker.check_model(proto, full_check=True)
    except onnx.checker.ValidationError as e:
        raise ExportError(f"onnx.checker rejected the exported graph: {str(e).splitlines()[0]}") from None
    onnx.save(proto, str(path))


@dataclass
class Verification:
    relative_error: float
    tolerance: float
    providers: tuple[str, ...]

    @property
    def passed(self) -> bool:
        return self.relative_error <= self.tolerance


def verify_onnx(path: str | os.PathLike, ckpt: Checkpoint, fp16: bool, batches=(1, 3), seed: int = 0) -> Verification:
    """Compare ONNX Runtime (CPU provider) with the float32 eager model on random inputs.

    Two batch sizes, so a batch dimension baked in at trace time fails. The error is the
    largest over the batches.
    """
    session = open_session(path, torch.device("cpu"))
    # The reference runs on the CPU in float32: on CUDA, convolutions default to TF32 (~1e-3
    # relative), which alone would fail the fp32 tolerance. A copy, so the checkpoint's model
    # keeps its device and dtype.
    model = ckpt.unet
    if next(model.parameters()).device.type != "cpu" or any(p.dtype != torch.float32 for p in model.parameters()):
        model = copy.deepcopy(model).cpu().float()
    model.eval()
    worst = 0.0
    for i, batch in enumerate(batches):
        inputs = random_inputs(model.config, batch, seed + i + 1, ckpt.diffusion.num_timesteps)
        (out,) = session.run([OUTPUT_NAME], {name: v.numpy() for name, v in zip(INPUT_NAMES, inputs)})
        with torch.no_grad():
            ref = model(*inputs)
        error = relative_error(torch.from_numpy(out), ref)
        worst = max(worst, error if math.isfinite(error) else math.inf)  # a NaN must fail, not vanish in max
    return Verification(worst, TOLERANCE["fp16" if fp16 else "fp32"], tuple(session.get_providers()))


def export_onnx(ckpt: Checkpoint, out: str | os.PathLike, fp16: bool = False,
                opset: int = DEFAULT_OPSET) -> Verification:
    """Write a verified ONNX file to `out`, atomically: on any failure nothing is left there."""
    if opset not in OPSETS:
        raise ExportError(f"opset {opset} is not supported; use {OPSETS.start}..{OPSETS.stop - 1}")
    out = Path(out)
    if not out.parent.is_dir():
        raise ExportError(f"output folder {out.parent} does not exist")
    result = None

    def write(tmp: str) -> None:
        nonlocal result
        write_onnx(ckpt, tmp, fp16, opset)
        result = verify_onnx(tmp, ckpt, fp16)
        if not result.passed:
            raise ExportError(f"ONNX Runtime disagrees with PyTorch: relative error {result.relative_error:.2e} "
                              f"> {result.tolerance:.0e} ({'fp16' if fp16 else 'fp32'}); no file written")

    atomic_write(out, write)
    return result


def cache_folder() -> Path:
    """Where exported graphs are kept between runs: $DDPM_ENGINE_CACHE, else $XDG_CACHE_HOME/ddpm-engine,
    else ~/.cache/ddpm-engine; graphs go in its onnx/ folder."""
    if os.environ.get("DDPM_ENGINE_CACHE"):
        return Path(os.environ["DDPM_ENGINE_CACHE"]) / "onnx"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "ddpm-engine" / "onnx"


def content_key(ckpt: Checkpoint, fp16: bool, opset: int = DEFAULT_OPSET) -> str:
    """sha256 of what the exported graph depends on: the weights (as float32), the configs, the
    class names, the precision, the opset and the versions of torch and of this exporter (EXPORTER)."""
    digest = hashlib.sha256(json.dumps([metadata_props(ckpt, fp16), opset, torch.__version__, EXPORTER]).encode())
    for name, tensor in sorted(ckpt.unet.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()[:32]


def cached_onnx(ckpt: Checkpoint, fp16: bool = False, export: bool = True) -> Path | None:
    """The verified ONNX graph of `ckpt` from the cache, exported (and verified) into it first
    when missing and `export` is set; None when missing and not `export`. Only the first run of
    a checkpoint pays for export and verification."""
    path = cache_folder() / f"{content_key(ckpt, fp16)}{'-fp16' if fp16 else ''}.onnx"
    if path.is_file() or not export:
        return path if path.is_file() else None
    path.parent.mkdir(parents=True, exist_ok=True)
    export_onnx(ckpt, path, fp16=fp16)
    return path
