"""`ddpm-export`: compile a checkpoint to a verified ONNX file, and optionally a TensorRT engine."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from engine.apps.clitools import Parser, reported
from engine.formats.checkpoint import load_checkpoint
from engine.formats.onnx_export import DEFAULT_OPSET, OPSETS, ExportError, export_onnx
from export.tensorrt import build_plan, require_tensorrt

EXAMPLES = """examples:
  ddpm-export --checkpoint runs/tiny/model.safetensors                 # -> runs/tiny/model.onnx (fp32)
  ddpm-export --checkpoint model.safetensors --fp16 --out model-fp16.onnx
  ddpm-export --checkpoint model.safetensors --tensorrt                # -> model-fp16.onnx and model-fp16.plan
  ddpm-engine sample --checkpoint model-fp16.onnx -n 20                # sample through ONNX Runtime

Every export is checked with onnx.checker and compared with PyTorch on random inputs
(relative error <= 1e-4 in fp32, <= 1e-2 in fp16); a file that fails is not written.
"""


def opset(text: str) -> int:
    if not text.isdigit() or int(text) not in OPSETS:
        raise argparse.ArgumentTypeError(f"{text[:40]!r} is not a supported opset ({OPSETS.start}..{OPSETS.stop - 1})")
    return int(text)


def build_parser() -> Parser:
    parser = Parser(prog="ddpm-export", description="Export a ddpm-engine checkpoint to ONNX (verified with "
                    "ONNX Runtime) and optionally build a TensorRT engine from it.",
                    epilog=EXAMPLES)
    parser.add_argument("--checkpoint", type=Path, required=True, help="the .safetensors checkpoint to export")
    parser.add_argument("--fp16", action="store_true",
                        help="fp16 weights and activations (GroupNorm statistics and softmax stay fp32)")
    parser.add_argument("--out", type=Path, default=None,
                        help="the .onnx file to write (default: beside the checkpoint, NAME.onnx or NAME-fp16.onnx)")
    parser.add_argument("--tensorrt", action="store_true",
                        help="also build a TensorRT engine, OUT with suffix .plan (implies --fp16; "
                             "needs the tensorrt package and an NVIDIA GPU)")
    parser.add_argument("--opset", type=opset, default=DEFAULT_OPSET, help=f"ONNX opset (default: {DEFAULT_OPSET})")
    return parser


def default_out(checkpoint: Path, fp16: bool) -> Path:
    return checkpoint.with_name(checkpoint.stem + ("-fp16" if fp16 else "") + ".onnx")


def run(args: argparse.Namespace) -> None:
    fp16 = args.fp16 or args.tensorrt
    out = args.out or default_out(args.checkpoint, fp16)
    if out.suffix != ".onnx":
        raise ExportError(f"--out {out} must end in .onnx")
    if args.tensorrt:
        require_tensorrt()  # before the export, so a missing TensorRT leaves nothing behind
    ckpt = load_checkpoint(args.checkpoint, "cpu")
    result = export_onnx(ckpt, out, fp16=fp16, opset=args.opset)
    print(f"wrote {out} ({'fp16' if fp16 else 'fp32'}, opset {args.opset}, {out.stat().st_size / 2**20:.1f} MiB); "
          f"ONNX Runtime ({result.providers[0]}) vs PyTorch fp32: relative error {result.relative_error:.1e} "
          f"<= {result.tolerance:.0e}")
    if args.tensorrt:
        plan = out.with_suffix(".plan")
        build_plan(out, plan)
        print(f"wrote {plan} (TensorRT, fp16)")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with reported("ddpm-export") as outcome:
        run(args)
    return outcome.code


if __name__ == "__main__":
    sys.exit(main())
