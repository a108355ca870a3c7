"""`ddpm-engine`: sample images or interpolations from a checkpoint, convert diffusers checkpoints,
benchmark the backends, or score samples with FID and IS, or by how many a classifier recognises."""

from __future__ import annotations

import argparse
import json
import os
import sys
import zipfile
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch

from engine import backends, distributed
from engine.apps.bench import bench, format_header
from engine.apps.clitools import (
    Parser,
    UsageError,
    field_flag,
    int_range,
    non_negative_float,
    positive_float,
    reported,
    settings_of,
)
from engine.backends import BACKENDS, PRECISIONS, build_engine
from engine.config import PRESETS
from engine.evaluation.classifier import BUNDLED_CLASSIFIER, load_classifier, recognition
from engine.evaluation.datasets import SPLITS, ImageSource, open_images
from engine.evaluation.fid import (
    INCEPTION_BACKENDS,
    NO_CLASSIFIER,
    PREPROCESSING,
    InceptionNetwork,
    Stats,
    frechet_distance,
    image_stats,
    load_network,
    load_stats,
    save_stats,
)
from engine.formats.checkpoint import Checkpoint, atomic_write, meta_unet, save_checkpoint
from engine.formats.diffusers_format import load_diffusers, sampling_hint, save_diffusers
from engine.formats.images import SampleRun, check_writable, grid, save_png, staged_output
from engine.formats.opener import BUNDLED_CHECKPOINT, model_digest, open_checkpoint, open_model
from engine.generate import INTERPOLATION, generate, image_progress, interpolate
from engine.model import count_parameters
from engine.settings import DDIM_STEPS, DPM_STEPS, FIELDS, SETTINGS, SampleSettings, model_classes, resolve_guidance
from engine.timing import BENCH_BACKENDS

SAMPLE = SampleSettings()  # the sample command's defaults


EXAMPLES = """examples:
  ddpm-engine sample --checkpoint runs/tiny/model.safetensors -n 20 --out samples
  ddpm-engine sample -n 100 --classes cat,dog --guidance 1.8 --sampler ddim --steps 50
  ddpm-engine sample -n 100 --sampler dpm++2m --steps 20 --spacing trailing   # DPM-Solver++(2M)
  ddpm-engine sample -n 8 --sampler ddpm --variance small --seed 7 --batch-size 4
  ddpm-engine sample -n 100 --guidance 3 --threshold 0.995     # dynamic thresholding at high guidance
  ddpm-engine interpolate --class 3 --pairs 2 --frames 9 --out interp
  ddpm-engine sample --checkpoint model.onnx -n 16           # ONNX Runtime (.plan: TensorRT)
  ddpm-engine sample --checkpoint ddpm-cifar10-32 --sampler ddpm --variance small --clip-x0   # a diffusers folder
  ddpm-engine serve --port 8000                             # HTTP: POST /v1/images, a page at /, /metrics
  ddpm-engine convert --from-diffusers ddpm-cifar10-32 --out ddpm-cifar10.safetensors
  ddpm-engine convert runs/tiny/model.safetensors --to-diffusers tiny-diffusers
  ddpm-engine sample -n 1000 --backend fused --device cuda     # fused U-Net + CUDA graphs, bf16
  torchrun --nproc-per-node 8 -m engine.apps.cli sample -n 100000  # one share of the images per GPU
  ddpm-engine bench --preset ddpm-cifar10 --batch-sizes 2,256,1024
  ddpm-engine fid-ref cifar10-jpeg.tar.gz --split test --out runs/fid/cifar10-jpeg-test.npz
  ddpm-engine fid samples/samples.npz --ref runs/fid/cifar10-jpeg-test.npz   # -> samples/fid.json
  ddpm-engine fid samples/ --ref cifar-10-python.tar.gz --split train --inception inception-2015-12-05.pt
  ddpm-engine score samples/                  # share of samples recognised as their class -> samples/score.json
"""


# -n's bound: 2,000 times a 50,000-image FID run; the run's bookkeeping (a shard list, one file a
# shard) grows with n / SHARD_IMAGES, and past ~1e9 images it would not fit in memory.
MAX_IMAGES = 100_000_000
SHARD_IMAGES = 1024  # images a shard of a sampling run: what an interrupt can lose, and the largest --batch-size


def build_parser() -> Parser:
    parser = Parser(prog="ddpm-engine", description="Sample class-conditional DDPM images with classifier-free guidance.",
                    epilog=EXAMPLES)
    commands = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for add in (add_sample, add_interpolate, add_serve, add_bench, add_convert, add_fid, add_fid_ref, add_score):
        add(commands)
    return parser


def model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", type=Path, default=None,
                   help="a .safetensors checkpoint, a diffusers UNet2DModel folder, an exported .onnx file "
                        "(ONNX Runtime) or a .plan (TensorRT) (default: the bundled CIFAR-10 model)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:k] (default: auto)")
    p.add_argument("--backend", choices=BACKENDS, default="auto",
                   help="model implementation (default: auto = fused on CUDA, the fastest correct one on the CPU)")
    p.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="for fused, eager and compile (default: auto = bf16 on CUDA, fp32 on the CPU)")


def sampling_flags(p: argparse.ArgumentParser) -> None:
    model_flags(p)
    field_flag(p, "guidance", "-w", default=None,
               help=f"{FIELDS['guidance'].help} (default: {SAMPLE.guidance:g} for sample, "
                    f"{INTERPOLATION.guidance:g} for interpolate)")
    field_flag(p, "seed", default=0)
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def evaluation_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--split", choices=SPLITS, default=None,
                   help="for a data set with train and test images (default: test)")
    p.add_argument("--inception", type=Path, default=None,
                   help="the Inception TorchScript file (default: $DDPM_INCEPTION, else the one the "
                        "`eval` extra installs); NVIDIA's inception-2015-12-05.pt also gives IS")
    p.add_argument("--batch-size", type=int_range(1), default=8, help="images per network call (default: 8)")
    p.add_argument("--backend", choices=INCEPTION_BACKENDS, default="auto",
                   help="auto = ONNX Runtime on the CPU when installed, else TorchScript (default: auto)")
    p.add_argument("--device", default="cpu", help="cpu, auto or cuda[:k] (default: cpu)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def add_sample(commands) -> None:
    """ddpm-engine sample: N images into a folder (PNGs, a grid and samples.npz)."""
    sample = commands.add_parser("sample", help="sample N images", epilog=EXAMPLES)
    sampling_flags(sample)
    sample.add_argument("-n", type=int_range(1, MAX_IMAGES), default=None,
                        help=f"number of images (default: 10 per class; at most {MAX_IMAGES:,})")
    sample.add_argument("--classes", default=None, help="comma-separated class indices or names (default: all)")
    for name in SETTINGS:
        if name != "guidance":  # sampling_flags': interpolate takes it too, with its own default
            field_flag(sample, name, metavar={"threshold": "P", "guidance_interval": "LO,HI"}.get(name))
    sample.add_argument("--batch-size", type=int_range(1), default=None,
                        help="images per model call (default: 256 on a GPU, 32 on the CPU, where larger batches "
                             f"cost more per image; at most {SHARD_IMAGES})")
    sample.add_argument("--out", type=Path, default=Path("samples"), help="output folder (default: ./samples)")


def add_interpolate(commands) -> None:
    """ddpm-engine interpolate: rows of frames between pairs of samples."""
    interp = commands.add_parser("interpolate", help="interpolate between pairs of samples (lerp and slerp)",
                                 epilog=EXAMPLES)
    sampling_flags(interp)
    interp.add_argument("--class", dest="class_name", default=None, help="class index or name (default: 0)")
    interp.add_argument("--pairs", type=int_range(1), default=1, help="pairs of end points (default: 1)")
    interp.add_argument("--frames", type=int_range(2), default=9, help="images per row, ends included (default: 9)")
    field_flag(interp, "sampler", default=INTERPOLATION.sampler, choices=("ddim", "dpm++2m"),
               help=f"a deterministic sampler (default: {INTERPOLATION.sampler})")
    field_flag(interp, "steps", help=f"sampling steps (default: {DDIM_STEPS} for ddim, {DPM_STEPS} for dpm++2m)")
    interp.add_argument("--out", type=Path, default=Path("interpolation"), help="output folder (default: ./interpolation)")


def add_serve(commands) -> None:
    """ddpm-engine serve: the HTTP server."""
    serve = commands.add_parser("serve", help="serve sampling over HTTP (the `serve` extra)", epilog=SERVE_EXAMPLES)
    model_flags(serve)
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    serve.add_argument("--port", type=int_range(0, 65535), default=8000, help="default: 8000")
    serve.add_argument("--token", default=None,
                       help="require `Authorization: Bearer TOKEN` on every endpoint but /healthz "
                            "(default: $DDPM_SERVE_TOKEN, else none)")
    serve.add_argument("--batch-size", type=int_range(1, SHARD_IMAGES), default=None,
                       help="images in an engine step, over all requests (default: 256 on a GPU, 32 on the CPU)")
    serve.add_argument("--max-images", type=int_range(1), default=256, help="images a request may ask for (default: 256)")
    serve.add_argument("--max-queue", type=int_range(1), default=64,
                       help="requests waiting for slots; more are answered 429 (default: 64)")
    serve.add_argument("--grace", type=non_negative_float, default=30.0,
                       help="seconds SIGTERM gives in-flight requests to finish; those still running then are "
                            "answered 503 (default: 30)")
    serve.add_argument("--header-timeout", type=positive_float, default=10.0,
                       help="seconds a connection has to send a whole request head, from connecting or from "
                            "its last answer; then 408 and closed (default: 10)")
    serve.add_argument("--body-timeout", type=positive_float, default=10.0,
                       help="seconds a request has to send its whole body after its head; then 408 (default: 10)")
    serve.add_argument("--keep-alive", type=positive_float, default=5.0,
                       help="seconds an idle keep-alive connection stays open (default: 5)")
    serve.add_argument("--max-connections", type=int_range(1), default=256,
                       help="open connections; one more is answered 503 and closed (default: 256)")
    serve.add_argument("--admission", choices=["step", "request"], default="step",
                       help="step: requests join the batch at any step (default); request: whole-request batching, "
                            "the baseline of benchmarks/bench_serve.py")


def add_bench(commands) -> None:
    """ddpm-engine bench: per-step speed of each backend."""
    bench_cmd = commands.add_parser("bench", help="per-step latency and images/s of each backend, same run",
                                    epilog=EXAMPLES)
    bench_cmd.add_argument("--preset", choices=list(PRESETS), default="ddpm-cifar10", help="default: ddpm-cifar10")
    bench_cmd.add_argument("--batch-sizes", type=batch_list, default=[2, 256, 1024],
                           help="U-Net batches (2 x images under guidance), comma-separated (default: 2,256,1024)")
    bench_cmd.add_argument("--backends", type=backend_list, default=list(BENCH_BACKENDS),
                           help=f"comma-separated, from {','.join(BENCH_BACKENDS)} (default: all)")
    bench_cmd.add_argument("--steps", type=int_range(1, 1000), default=1000,
                           help="sampling steps a run takes, for images/s (default: 1000)")
    bench_cmd.add_argument("--rounds", type=int_range(1), default=None, help="timed calls per case (default: 30 GPU, 3 CPU)")
    bench_cmd.add_argument("--cpu-budget-s", type=non_negative_float, default=20.0,
                           help="on the CPU, skip cases estimated to take longer (default: 20)")
    bench_cmd.add_argument("--device", default="auto", help="auto, cpu or cuda[:k] (default: auto)")


def add_convert(commands) -> None:
    """ddpm-engine convert: diffusers folders to checkpoints and back."""
    convert = commands.add_parser("convert", help="a diffusers UNet2DModel folder to a checkpoint, or back",
                                  epilog=EXAMPLES)
    convert.add_argument("checkpoint", type=Path, nargs="?", default=None,
                         help="the .safetensors checkpoint to export (with --to-diffusers)")
    direction = convert.add_mutually_exclusive_group(required=True)
    direction.add_argument("--from-diffusers", type=Path, metavar="DIR",
                           help="a UNet2DModel folder (config.json, diffusion_pytorch_model.safetensors; "
                                "scheduler_config.json beside them or in ../scheduler/), or a pipeline folder with unet/")
    direction.add_argument("--to-diffusers", type=Path, metavar="OUT_DIR",
                           help="write CHECKPOINT as a folder diffusers' UNet2DModel and DDPMScheduler load")
    convert.add_argument("--out", type=Path, default=None, help="the checkpoint to write (with --from-diffusers)")


def add_fid(commands) -> None:
    """ddpm-engine fid: FID (and IS) of samples against a reference."""
    fid_cmd = commands.add_parser("fid", help="FID (and IS) of samples against a reference, into fid.json",
                                  epilog=EXAMPLES)
    fid_cmd.add_argument("samples", type=Path,
                         help="a samples.npz, a folder holding one (as `ddpm-engine sample` writes), or a folder of images")
    fid_cmd.add_argument("--ref", type=Path, required=True,
                         help="statistics from `ddpm-engine fid-ref`, or any data set fid-ref reads")
    evaluation_flags(fid_cmd)


def add_fid_ref(commands) -> None:
    """ddpm-engine fid-ref: reference statistics of a data set."""
    ref_cmd = commands.add_parser("fid-ref", help="reference statistics (mu, sigma) of a data set, for fid",
                                  epilog=EXAMPLES)
    ref_cmd.add_argument("data", type=Path,
                         help="a samples.npz, a folder or .tar(.gz) of images, cifar-10-python.tar.gz or cifar-10-batches-py/")
    ref_cmd.add_argument("--out", type=Path, required=True, help="the statistics file to write (.npz)")
    ref_cmd.add_argument("--limit", type=int_range(2), default=None,
                         help="use only N images, evenly spaced over the split (keeps a class-sorted set balanced)")
    evaluation_flags(ref_cmd)


def add_score(commands) -> None:
    """ddpm-engine score: recognition per class by the CIFAR-10 classifier."""
    score_cmd = commands.add_parser("score", help="the share of samples a CIFAR-10 classifier recognises as the class "
                                    "they were sampled for, per class, into score.json", epilog=EXAMPLES)
    score_cmd.add_argument("samples", type=Path, help="a samples.npz, or a folder holding one (as `ddpm-engine sample` "
                           "writes): images x and their classes y")
    score_cmd.add_argument("--checkpoint", type=Path, default=None,
                           help="the model that made the samples: its class names name y (default: the bundled model)")
    score_cmd.add_argument("--classifier", type=Path, default=BUNDLED_CLASSIFIER,
                           help="a classifier from `python -m training.classifier` (default: the bundled one)")


SERVE_EXAMPLES = """examples:
  ddpm-engine serve                                           # the bundled model on http://127.0.0.1:8000/
  ddpm-engine serve --checkpoint runs/tiny/model.safetensors --host 0.0.0.0 --port 8080 --token s3cret
  curl -s localhost:8000/v1/images -d '{"classes": ["cat", "ship"], "n": 4, "guidance": 1.8}'   # JSON, base64 PNGs
  curl -s localhost:8000/v1/images -H 'Accept: image/png' -d '{"class": "horse", "n": 16}' -o grid.png
  curl -sN localhost:8000/v1/images -H 'Accept: text/event-stream' -d '{"n": 10}'   # progress and images as they finish
"""


def batch_list(text: str) -> list[int]:
    parse = int_range(2)
    sizes = [parse(item) for item in text.split(",")]
    if any(b % 2 for b in sizes):
        raise argparse.ArgumentTypeError("batch sizes count the U-Net batch under guidance (2 x images): use even numbers")
    return sizes


def backend_list(text: str) -> list[str]:
    names = [item.strip() for item in text.split(",")]
    unknown = [n for n in names if n not in BENCH_BACKENDS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown backend {unknown[0]!r}; use {','.join(BENCH_BACKENDS)}")
    return names


def cmd_sample(args) -> None:
    """Samples shard by shard into OUT.partial/ (engine.formats.images.SampleRun), so memory stays flat in
    -n and an interrupted run continues where it stopped; under torchrun every rank samples every
    world-size-th shard, and rank 0 assembles the output."""
    check_writable(args.out)
    device = distributed.resolve_device(args.device)
    world = distributed.init(device.type)
    run = None
    try:
        device = distributed.device_for(world, device)
        ckpt = open_model(args.checkpoint, device)
        classes = model_classes(args.classes, ckpt.config, ckpt.class_names)
        n = args.n if args.n is not None else 10 * len(classes)
        settings = settings_of(args, guidance=resolve_guidance(args.guidance, SAMPLE.guidance, ckpt.config))
        image_steps = -(-n // world.size) * settings.num_steps(ckpt.diffusion.num_timesteps)
        engine = build_engine(ckpt, args.backend, device, args.precision,
                              max_batch=args.batch_size and min(args.batch_size, SHARD_IMAGES), image_steps=image_steps)
        run = SampleRun(args.out, n, classes, SHARD_IMAGES, {
            "model": model_digest(args.checkpoint or BUNDLED_CHECKPOINT), "sampler": asdict(settings), "seed": args.seed})
        done, error = 0, None
        if world.is_main:
            try:
                done = run.open()
            except OSError as e:
                error = e
        if not distributed.broadcast_flag(world, error is None):  # the other ranks wait for the work folder
            run = None  # not this call's to discard
            raise error or OSError(f"rank 0 could not open {args.out}.partial")
        todo = [(start, stop) for start, stop in run.shards()[world.rank::world.size] if not run.done(start)]
        with image_progress(sum(stop - start for start, stop in todo), not args.no_progress and world.is_main) as bar:
            for start, stop in todo:
                run.write(start, *generate(engine, settings, torch.arange(start, stop), classes, args.seed, bar=bar))
        distributed.barrier(world)
        if world.is_main:
            run.finish()
            ranks = f", {world.size} processes" if world.size > 1 else ""
            resumed = f"; continued a run that had {done}" if done else ""
            print(f"wrote {n} images to {args.out}/ (grid.png, images/, samples.npz; {engine.name} on {device}{ranks}"
                  f"{resumed})")
        distributed.barrier(world)
    except KeyboardInterrupt:
        raise  # the work folder stays: the same command continues the run
    except BaseException:
        if run is not None and world.is_main:
            run.discard()
        raise
    finally:
        distributed.finish(world)


def cmd_interpolate(args) -> None:
    check_writable(args.out)
    device = distributed.resolve_device(args.device)
    ckpt = open_model(args.checkpoint, device)
    classes = model_classes(args.class_name or "0", ckpt.config, ckpt.class_names, field="class")
    if len(classes) != 1:
        raise UsageError(f"--class takes one class, got {len(classes)}")
    settings = replace(INTERPOLATION, sampler=args.sampler, steps=args.steps,
                       guidance=resolve_guidance(args.guidance, INTERPOLATION.guidance, ckpt.config))
    images = 2 * args.pairs * args.frames  # one batch, one run: no CUDA graphs
    engine = build_engine(ckpt, args.backend, device, args.precision, max_batch=images, graphs=False,
                          image_steps=images * settings.num_steps(ckpt.diffusion.num_timesteps))
    frames = interpolate(engine, settings, classes[0], args.pairs, args.frames, args.seed, progress=not args.no_progress)
    with staged_output(args.out) as stage:
        rows = [frames[i:i + args.frames] for i in range(0, len(frames), args.frames)]
        save_png(stage / "interpolation.png", grid(rows), scale=2)
    print(f"wrote {args.out}/interpolation.png (rows: lerp then slerp for each of {args.pairs} pair(s))")


def cmd_serve(args) -> None:
    try:
        from engine.apps.serve import ServeOptions, serve
    except ModuleNotFoundError as e:
        raise UsageError(f"ddpm-engine serve needs the serve extra ({e.name} is missing): "
                         f"pip install -e '.[serve]'") from None
    if args.token is None:
        args.token = os.environ.get("DDPM_SERVE_TOKEN") or None
    device = distributed.resolve_device(args.device)
    ckpt = open_model(args.checkpoint, device)
    # A server runs for long: auto on the CPU takes ONNX Runtime, whose export pays back within minutes.
    engine = build_engine(ckpt, args.backend, device, args.precision, max_batch=args.batch_size,
                          image_steps=backends.ONNX_MIN_IMAGE_STEPS, admission=args.admission)
    serve(ckpt, engine, ServeOptions(host=args.host, port=args.port, token=args.token, max_images=args.max_images,
                                     max_queue=args.max_queue, grace_s=args.grace,
                                     header_timeout_s=args.header_timeout, body_timeout_s=args.body_timeout,
                                     keep_alive_s=args.keep_alive, max_connections=args.max_connections))


def describe(ckpt: Checkpoint) -> str:
    config = ckpt.config
    classes = ("unconditional" if config.num_classes == 0 else f"{config.num_classes} classes"
               + ("" if config.learned_null else ", no learned null class (no guidance)"))
    parameters = count_parameters(meta_unet(config))  # from the config: any runtime
    return f"{parameters / 1e6:.1f}M parameters, {classes}, T = {ckpt.diffusion.num_timesteps}"


def cmd_convert(args) -> None:
    if args.from_diffusers is not None:
        if args.checkpoint is not None or args.out is None:
            raise UsageError("--from-diffusers DIR takes --out FILE.safetensors, and no CHECKPOINT")
        check_writable(args.out.parent)
        ckpt = load_diffusers(args.from_diffusers)
        save_checkpoint(args.out, ckpt.unet, ckpt.diffusion, ckpt.class_names)
        print(f"wrote {args.out} ({describe(ckpt)}); {sampling_hint(args.from_diffusers)}")
        return
    if args.checkpoint is None or args.out is not None:
        raise UsageError("--to-diffusers OUT_DIR takes a CHECKPOINT, and no --out")
    ckpt = open_checkpoint(args.checkpoint)
    save_diffusers(ckpt, args.to_diffusers)
    print(f"wrote {args.to_diffusers}/ (config.json, diffusion_pytorch_model.safetensors, scheduler_config.json; "
          f"{describe(ckpt)}): diffusers' UNet2DModel.from_pretrained and DDPMScheduler.from_pretrained load it")


def cmd_bench(args) -> None:
    device = distributed.resolve_device(args.device)
    print(f"{args.preset} on {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'the CPU'}, "
          f"torch {torch.__version__}; step = guided U-Net call + update + noise; images/s over {args.steps} steps")
    print(format_header())
    _, skipped = bench(args.preset, args.batch_sizes, args.backends, device, steps=args.steps, rounds=args.rounds,
                       cpu_budget_s=args.cpu_budget_s)
    for line in skipped:
        print(f"skipped {line}")


def open_network(args) -> InceptionNetwork:
    return load_network(args.inception, args.backend, distributed.resolve_device(args.device))


def check_stats_out(out: Path) -> None:
    if out.is_dir():
        raise OSError(f"--out {out} is a folder; name the statistics file, e.g. {out / 'stats.npz'}")
    check_writable(out.parent)


def holds_images(path: Path) -> bool:
    """A .npz of images (key x) rather than of statistics; unreadable files count as statistics,
    so that load_stats reports them."""
    try:
        with np.load(path, allow_pickle=False) as data:
            return "x" in data.files and "mu" not in data.files
    except (ValueError, OSError, EOFError, zipfile.BadZipFile):
        return False


def samples_source(path: Path) -> ImageSource:
    """SAMPLES: a samples.npz, a folder holding one (`ddpm-engine sample --out`), or a folder of images."""
    if path.is_dir() and (path / "samples.npz").is_file():
        path = path / "samples.npz"
    return open_images(path)


def inception_score_text(stats: Stats, network: InceptionNetwork) -> tuple[str, str | None]:
    """("IS m ± s" or "IS n/a: why", why)."""
    if stats.inception_score is not None:
        return f"IS {stats.inception_score[0]:.2f} ± {stats.inception_score[1]:.2f}", None
    why = NO_CLASSIFIER if network.classifier is None else "fewer samples than its 10 splits"
    return f"IS n/a: {why}", why


def cmd_fid(args) -> None:
    """Writes fid.json beside a samples.npz, or inside a folder of images."""
    samples = samples_source(args.samples)
    out = (samples.path.parent if samples.path.is_file() else samples.path) / "fid.json"
    check_writable(out.parent)
    # --ref: a statistics .npz, or a data set whose statistics are computed now; either is
    # opened before the network loads, so that a bad one fails at once.
    ref_images, reference = None, None
    if args.ref.suffix == ".npz" and not holds_images(args.ref):
        if args.split is not None:
            raise UsageError(f"--split picks images of a data set; {args.ref} is a statistics file")
        reference = load_stats(args.ref)
    else:
        ref_images = open_images(args.ref, args.split)
    network = open_network(args)
    if ref_images is not None:
        reference = image_stats(network, ref_images, args.batch_size, progress=not args.no_progress)
    if reference.network and reference.network != network.sha256:
        print(f"note: the reference statistics were made with another network file (sha256 {reference.network[:12]}..., "
              f"this run {network.sha256[:12]}...)", file=sys.stderr)
    stats = image_stats(network, samples, args.batch_size, progress=not args.no_progress)
    fid = frechet_distance(stats, reference)
    score_text, why = inception_score_text(stats, network)
    result = {
        "fid": fid,
        "is_mean": stats.inception_score[0] if stats.inception_score else None,
        "is_std": stats.inception_score[1] if stats.inception_score else None,
        "is_note": why,
        "samples": {"path": str(samples.path), "count": stats.count, "source": stats.source},
        "reference": {"path": str(args.ref), "count": reference.count, "source": reference.source,
                      "network_sha256": reference.network or None},
        "network": {"path": str(network.path), "sha256": network.sha256, "backend": network.backend},
        "preprocessing": PREPROCESSING,
    }
    atomic_write(out, lambda tmp: Path(tmp).write_text(json.dumps(result, indent=1) + "\n"))
    ref_count = f"{reference.count} reference" if reference.count is not None else "reference"
    print(f"FID {fid:.2f} ({score_text}) — {stats.count} samples vs {ref_count} ({reference.source}); wrote {out}")


def cmd_fid_ref(args) -> None:
    check_stats_out(args.out)
    images = open_images(args.data, args.split, args.limit)
    network = open_network(args)
    stats = image_stats(network, images, args.batch_size, progress=not args.no_progress)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_stats(args.out, stats)
    score = f", IS {stats.inception_score[0]:.2f} ± {stats.inception_score[1]:.2f}" if stats.inception_score else ""
    print(f"wrote {args.out}: statistics of {stats.count} images ({stats.source}{score}; {network.backend})")


def labelled_samples(path: Path) -> tuple[Path, np.ndarray, np.ndarray]:
    """(the .npz, its images x, its classes y) of a samples.npz or a folder holding one."""
    if path.is_dir():
        path = path / "samples.npz"
    if not path.is_file():
        raise UsageError(f"no samples at {path}: pass a samples.npz or the folder `ddpm-engine sample --out` wrote")
    try:
        with np.load(path, allow_pickle=False) as data:
            if "x" not in data.files or "y" not in data.files:
                raise UsageError(f"{path} has no labelled images (arrays x and y)")
            return path, data["x"], data["y"]
    except (ValueError, EOFError, zipfile.BadZipFile):
        raise UsageError(f"{path} is not a readable .npz file") from None


def cmd_score(args) -> None:
    """Writes score.json beside the samples.npz."""
    path, images, labels = labelled_samples(args.samples)
    out = path.parent / "score.json"
    check_writable(out.parent)
    class_names = open_model(args.checkpoint, torch.device("cpu")).class_names
    classifier = load_classifier(args.classifier)
    result = recognition(classifier, images, labels, class_names)
    info = json.loads(classifier.metadata.get("info", "{}"))
    report = {"recognised": result.overall, "samples": len(labels), "per_class": {
                  name: {"samples": count, "recognised": share} for name, (count, share) in result.per_class.items()},
              "classifier": {"path": str(args.classifier), "test_accuracy": info.get("test_accuracy")}}
    atomic_write(out, lambda tmp: Path(tmp).write_text(json.dumps(report, indent=1) + "\n"))
    accuracy = f", test accuracy {info['test_accuracy']:.1%}" if "test_accuracy" in info else ""
    print(f"recognised {result.overall:.1%} of {len(labels)} samples as their class (classifier {args.classifier.name}"
          f"{accuracy}); wrote {out}")
    for name, (count, share) in result.per_class.items():
        print(f"  {name:>12s} {share:6.1%} of {count}")


COMMANDS = {"sample": cmd_sample, "interpolate": cmd_interpolate, "serve": cmd_serve, "convert": cmd_convert,
            "bench": cmd_bench, "fid": cmd_fid, "fid-ref": cmd_fid_ref, "score": cmd_score}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    interrupted = "interrupted; nothing was written"
    if args.command == "sample":
        interrupted = (f"interrupted; the finished shards are kept in {args.out}.partial/: the same command "
                       f"continues the run")
    with reported(f"ddpm-engine {args.command}", interrupted) as outcome:
        COMMANDS[args.command](args)
    return outcome.code


if __name__ == "__main__":
    sys.exit(main())
