"""`build_engine`: the one place a sampling engine (engine.core.Engine) is built, with the eps model of
each `--backend`.

    eager     the reference UNet; in bf16/fp16 a channels_last copy with float32 norms
    compile   torch.compile of that eager model
    fused     engine.fused.FusedUNet (Triton kernels), one CUDA graph per step and batch bucket
              (engine.graphs); on the CPU only under TRITON_INTERPRET=1
    onnx      ONNX Runtime on an exported graph (a .onnx checkpoint, or exported on the fly)
    tensorrt  a .plan built by ddpm-export (CUDA and TensorRT only)
    auto      fused on CUDA; on the CPU ONNX Runtime for long runs, else eager (why: below)

Every backend takes float32 x and returns float32 eps, so the samplers run unchanged and
the same seed gives the same images up to the precision used.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import tempfile
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from engine.config import DTYPES
from engine.core import Engine
from engine.errors import ConfigError
from engine.formats.checkpoint import Checkpoint, CheckpointError
from engine.model import UNet, keep_float32_islands

BACKENDS = ("auto", "fused", "eager", "compile", "onnx", "tensorrt")
PRECISIONS = ("auto", *DTYPES)

# The CPU's `auto` follows the runtimes table (benchmarks/bench_runtimes.py; the numbers are in
# benchmarks/results/2026-12-01-cpu-runtimes.md and docs/benchmarks.md): in fp32 ONNX Runtime was the
# fastest or tied at every model size and batch, so fp32 `auto` is ONNX Runtime when onnxruntime is
# installed and the model's graph is cached, or the run has at least ONNX_MIN_IMAGE_STEPS (images x
# steps) to pay for exporting it; eager otherwise. bf16 (eager: ONNX Runtime has no bf16 path here) was
# faster still on a CPU with bf16 instructions, from U-Net batch 64 on.
ONNX_MIN_IMAGE_STEPS = 500
# bf16 is not the CPU's default: its rounding costs FID, most under guidance ((1 + w) eps_c - w eps_u
# amplifies it), by more than the 0.5 FID that separates settings at n = 2,000 (the rule that chose w),
# guided and unguided (the model card's "Precision" table, engine/weights/README.md). So `--precision
# bf16` is the speed option, and `auto` stays fp32 on the CPU.


class BackendError(ConfigError):
    """A backend that cannot run here, or cannot run this checkpoint; the message says why."""


class EagerModel(nn.Module):
    """The reference UNet in `dtype` (below fp32 a copy with float32 GroupNorm/embeddings), channels_last
    below fp32 and on the CPU (a copy there too: a memory layout, not a change of the model).

    channels_last is where oneDNN's CPU convolutions are fastest in fp32 (the runtimes table:
    benchmarks/results/2026-12-01-cpu-runtimes.md); fp32 on CUDA keeps the model's own layout."""

    def __init__(self, model: UNet, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.config, self.dtype = model.config, dtype
        on_cpu = next(model.parameters()).device.type == "cpu"
        self.memory_format = torch.channels_last if dtype != torch.float32 or on_cpu else torch.contiguous_format
        if dtype != torch.float32:
            model = keep_float32_islands(copy.deepcopy(model).to(dtype=dtype, memory_format=self.memory_format))
        elif self.memory_format != torch.contiguous_format:  # a copy: the caller's module keeps its layout
            model = copy.deepcopy(model).to(memory_format=self.memory_format)
        self.unet = model.eval()

    @torch.no_grad()
    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x = x.to(dtype=self.dtype, memory_format=self.memory_format)
        return self.unet(x, t, y).float().contiguous()


def native_cpu_bf16() -> bool:
    """Whether this CPU has bf16 dot-product instructions (AVX512-BF16 or AMX): there oneDNN runs
    bf16 convolutions at about twice fp32's rate (above); elsewhere bf16 is emulated, slower than fp32."""
    return any(getattr(torch.cpu, probe, lambda: False)()
               for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))


def resolve_precision(precision: str, device: torch.device) -> str:
    """auto: bf16 on CUDA (tensor cores), fp32 on the CPU (where bf16 costs FID, above)."""
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if precision not in DTYPES:
        raise BackendError(f"unknown precision {precision!r}; use {', '.join(PRECISIONS)}")
    return precision


def resolve_backend(name: str, device: torch.device, image_steps: int | None = None, onnx_cached: bool = False,
                    precision: str = "fp32") -> str:
    """auto: fused on CUDA; on the CPU eager in bf16, in fp32 ONNX Runtime when its graph of this model is
    cached or the run is long enough to pay for exporting it, else eager (see above)."""
    if name not in BACKENDS:
        raise BackendError(f"unknown backend {name!r}; use {', '.join(BACKENDS)}")
    if name != "auto":
        return name
    if device.type == "cuda":
        return "fused"
    if precision != "fp32":
        return "eager"
    long_run = image_steps is not None and image_steps >= ONNX_MIN_IMAGE_STEPS
    if (onnx_cached or long_run) and onnxruntime_installed():
        return "onnx"
    return "eager"


def onnxruntime_installed() -> bool:
    return importlib.util.find_spec("onnxruntime") is not None and importlib.util.find_spec("onnx") is not None


def interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def default_max_batch(device: torch.device) -> int:
    """Images in a step: 256 on a GPU, 32 on the CPU (a U-Net batch of 64 under guidance), where both
    eager and ONNX Runtime had their lowest cost per image on the project's 2-core machine (the bundled
    model: benchmarks/results/2026-11-29-cpu-sample.md)."""
    return 256 if device.type != "cpu" else 32


def build_engine(ckpt: Checkpoint, backend: str = "auto", device: torch.device | str = "cpu", precision: str = "auto",
                 max_batch: int | None = None, graphs: bool | None = None, image_steps: int | None = None,
                 admission: str = "step") -> Engine:
    """The sampling engine of `ckpt` (its model already on `device`) through `backend`.

    max_batch: the most images in a step (default_max_batch; the U-Net sees twice as many under
    guidance, and it is the largest CUDA-graph bucket). graphs: CUDA graphs for the fused backend
    (default: on CUDA). image_steps: images x sampling steps of the run, for `auto` on the CPU.
    """
    device = torch.device(device)
    precision = resolve_precision(precision, device)
    name, model, use_graphs = eps_model(ckpt, backend, device, precision, graphs, image_steps)
    config = ckpt.config
    return Engine(name, model, ckpt.diffusion, (config.in_channels, config.image_size, config.image_size),
                  config.null_class, device, max_batch or default_max_batch(device), use_graphs, admission=admission)


def eps_model(ckpt: Checkpoint, name: str, device: torch.device, precision: str, graphs: bool | None,
              image_steps: int | None) -> tuple[str, Callable, bool]:
    """(what runs, the eps model, whether it runs under CUDA graphs) for backend `name`."""
    if ckpt.runtime != "pytorch":  # an exported model: it is its own backend
        if name not in ("auto", ckpt.runtime):
            raise BackendError(f"this checkpoint is a {ckpt.runtime} export: use --backend {ckpt.runtime} (or auto), "
                               f"or pass the .safetensors checkpoint for --backend {name}")
        return f"{ckpt.runtime}-{ckpt.precision}", ckpt.model, False
    # auto on the CPU in fp32: a cached graph decides for ONNX Runtime, and is what it then loads (one hash of the weights).
    fp32_auto = name == "auto" and device.type == "cpu" and precision == "fp32"
    cached = cached_graph(ckpt) if fp32_auto and onnxruntime_installed() else None
    name = resolve_backend(name, device, image_steps, cached is not None, precision)
    dtype = DTYPES[precision]
    match name:
        case "eager":
            return f"eager-{precision}", EagerModel(ckpt.unet, dtype), False
        case "compile":
            # The default mode: max-autotune did not finish in 5 min at batch 1024 on an H200.
            return f"compile-{precision}", torch.compile(EagerModel(ckpt.unet, dtype)), False
        case "fused":
            from engine.fused import fuse

            if device.type != "cuda" and not interpreter_on():
                raise BackendError("--backend fused runs Triton kernels and needs a CUDA device "
                                   "(on the CPU only in the Triton interpreter, TRITON_INTERPRET=1, for testing)")
            use_graphs = device.type == "cuda" if graphs is None else graphs
            if use_graphs and device.type != "cuda":
                raise BackendError("CUDA graphs need a CUDA device")
            return f"fused-{precision}", fuse(ckpt.unet, dtype), use_graphs
        case "onnx":
            return (f"onnx-{'fp16' if precision == 'fp16' else 'fp32'}",
                    onnx_from_checkpoint(ckpt, device, fp16=precision == "fp16",
                                         cached=cached if precision != "fp16" else None), False)
        case "tensorrt":
            raise BackendError("--backend tensorrt runs a .plan file: build one with ddpm-export --tensorrt, "
                               "then pass it as --checkpoint")
    raise AssertionError(name)


def onnx_from_checkpoint(ckpt: Checkpoint, device: torch.device, fp16: bool = False, cached: Path | None = None):
    """The checkpoint as a verified ONNX graph in ONNX Runtime: from the cache of exported graphs
    (engine.formats.onnx_export.cached_onnx; `cached`: its entry, already looked up), exported into
    it on first use; through a temporary folder when the cache cannot be written."""
    from engine.formats.onnx import load_onnx
    from engine.formats.onnx_export import ExportError, cached_onnx, export_onnx

    try:
        try:
            path = cached or cached_onnx(ckpt, fp16)
        except OSError:  # an unwritable cache: export for this run only
            with tempfile.TemporaryDirectory(prefix="ddpm-onnx-") as folder:
                path = Path(folder) / "model.onnx"
                export_onnx(ckpt, path, fp16=fp16)
                return load_onnx(path, device).model  # the session holds the graph in memory
    except ExportError as e:
        raise BackendError(f"--backend onnx: {e}") from None
    try:
        return load_onnx(path, device).model
    except CheckpointError:  # a damaged cache entry: export it again
        path.unlink(missing_ok=True)
        return load_onnx(cached_onnx(ckpt, fp16), device).model


def cached_graph(ckpt: Checkpoint) -> Path | None:
    """The cached fp32 ONNX graph of the checkpoint's weights, or None."""
    from engine.formats.onnx_export import cached_onnx

    return cached_onnx(ckpt, fp16=False, export=False)
