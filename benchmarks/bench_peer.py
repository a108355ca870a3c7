"""ddpm-engine against diffusers on the same checkpoint and scheduler, in one run (issue 23).

Each case runs as whole processes, start-up and all: `ddpm-engine sample` (its default backend and
precision, first with an empty ONNX cache, then warm; and with `--precision bf16`) and a diffusers loop
(`UNet2DModel.from_pretrained` and the matching scheduler, the pipelines' loop written out: one model
call a step, the conditional and unconditional halves in one batch under guidance), in interleaved
rounds; the diffusers process also reports its loop time from `from_pretrained` on (what the issue's
first table measured), and ours is timed the same way in this process. Rows: what="peer" (whole
processes; backend "diffusers" or "ddpm-engine (what ran, which run)") and what="peer-loop".

Full mode (DDPM_BENCH_FULL=1), the issue's cases:
- the bundled model exported with `convert --to-diffusers`: 100 guided images (w = 1.8),
  DPM-Solver++(2M) 15 steps linspace, batch 32;
- the paper's 35.7M network in the google/ddpm-cifar10-32 layout (random weights, written by
  diffusers): 16 unconditional images, DDIM 20 steps leading, batch 16.
Quick mode (CI): a tiny random class-conditional model, 4 guided images, 3 DPM-Solver++ steps.
The images are not compared here (tests/engine/formats/test_diffusers.py and test_sampler.py hold the parity
tests); this file only times. Never asserts a speed.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from benchmarks.harness import FULL
from engine.backends import build_engine, native_cpu_bf16
from engine.config import PRESETS, DiffusionConfig
from engine.formats.checkpoint import save_checkpoint
from engine.formats.opener import BUNDLED_CHECKPOINT, open_model
from engine.generate import generate
from engine.model import UNet
from engine.settings import SampleSettings
from engine.timing import Timing

diffusers = pytest.importorskip("diffusers", reason="diffusers (test extra) is the peer")
ROUNDS = 3 if FULL else 1

# The network of google/ddpm-cifar10-32 (the paper's, unconditional; its config.json converts to this,
# tests/engine/formats/test_diffusers.py).
PAPER = replace(PRESETS["ddpm-cifar10"], num_classes=0, learned_null=False, downsample_padding=0, norm_eps=1e-6)

# The diffusers side, a whole process: argv = folder, n, sampler, steps, spacing, guidance, batch, null class.
DIFFUSERS_LOOP = r'''
import json, sys, time
start = time.perf_counter()
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, UNet2DModel

folder, n, sampler, steps, spacing, w, batch, null = sys.argv[1:]
n, steps, w, batch, null = int(n), int(steps), float(w), int(batch), int(null)
loaded = time.perf_counter()
unet = UNet2DModel.from_pretrained(folder).eval()
config = json.load(open(folder + "/scheduler_config.json"))
if sampler == "dpm++2m":
    scheduler = DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++", solver_order=2,
                                                        final_sigmas_type="zero", timestep_spacing=spacing)
else:
    scheduler = DDIMScheduler.from_config(config, timestep_spacing=spacing, set_alpha_to_one=True, steps_offset=0,
                                          clip_sample=False)
classes = unet.config.num_class_embeds
size = unet.config.sample_size
g = torch.Generator().manual_seed(0)
with torch.no_grad():
    for first in range(0, n, batch):
        b = min(batch, n - first)
        x = torch.randn(b, unet.config.in_channels, size, size, generator=g)
        y = torch.arange(first, first + b) % (classes - 1) if classes else None
        scheduler.set_timesteps(steps)
        for t in scheduler.timesteps:
            if w:
                eps = unet(torch.cat([x, x]), t, class_labels=torch.cat([y, torch.full_like(y, null)])).sample
                cond, uncond = eps.chunk(2)
                eps = (1 + w) * cond - w * uncond
            else:
                eps = unet(x, t, class_labels=y).sample
            x = scheduler.step(eps, t, x).prev_sample
done = time.perf_counter()
print(json.dumps({"imports_s": loaded - start, "loop_s": done - loaded, "finite": bool(torch.isfinite(x).all())}))
'''


def diffusers_folder(tmp: Path, checkpoint: Path) -> Path:
    """A checkpoint of ours as a diffusers folder (`ddpm-engine convert --to-diffusers`)."""
    folder = tmp / checkpoint.stem
    subprocess.run([sys.executable, "-m", "engine.apps.cli", "convert", str(checkpoint), "--to-diffusers", str(folder)],
                   check=True, capture_output=True)
    return folder


def paper_folder(tmp: Path) -> Path:
    """The paper's network in google/ddpm-cifar10-32's layout, random weights, as a diffusers folder."""
    torch.manual_seed(0)
    save_checkpoint(tmp / "paper.safetensors", UNet(PAPER).eval(), DiffusionConfig(), ())
    return diffusers_folder(tmp, tmp / "paper.safetensors")


def cases(tmp: Path) -> list[dict]:
    if FULL:
        return [dict(name="bundled-cifar10-cpu", folder=diffusers_folder(tmp, BUNDLED_CHECKPOINT), n=100,
                     sampler="dpm++2m", steps=15, spacing="linspace", guidance=1.8, batch=32, null=10),
                dict(name="paper-35.7M", folder=paper_folder(tmp), n=16, sampler="ddim", steps=20, spacing="leading",
                     guidance=0.0, batch=16, null=0)]
    torch.manual_seed(0)
    save_checkpoint(tmp / "tiny.safetensors", UNet(PRESETS["tiny"]).eval(), DiffusionConfig(),
                    tuple(f"c{k}" for k in range(10)))
    folder = diffusers_folder(tmp, tmp / "tiny.safetensors")
    return [dict(name="tiny-dpm++2m", folder=folder, n=4, sampler="dpm++2m", steps=3, spacing="linspace", guidance=1.8,
                 batch=4, null=10)]


def wall(command: list[str], env: dict | None = None) -> tuple[float, str]:
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - start
    assert result.returncode == 0, result.stderr[-2000:]
    return seconds, result.stdout


def timing(seconds: list[float]) -> Timing:
    """Timing of whole-process runs (the first run is the first round)."""
    return Timing.of([t * 1e3 for t in seconds], seconds[0])


def ours_loop(case: dict, env: dict) -> tuple[float, str]:
    """Our side in this process, what the diffusers process times as its loop: from opening the folder to
    the images in memory (engine.apps.cli's open_model, build_engine and generate; no PNGs). (seconds, what ran)."""
    start = time.perf_counter()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DDPM_ENGINE_CACHE", env["DDPM_ENGINE_CACHE"])
        ckpt = open_model(case["folder"], torch.device("cpu"))
        settings = SampleSettings(sampler=case["sampler"], steps=case["steps"], spacing=case["spacing"],
                                  guidance=case["guidance"], threshold=0.0)
        engine = build_engine(ckpt, "auto", "cpu", "auto", max_batch=case["batch"], image_steps=case["n"] * case["steps"])
        images, _ = generate(engine, settings, torch.arange(case["n"]), list(range(ckpt.config.num_classes or 1)), 0,
                             progress=False)
    seconds = time.perf_counter() - start
    assert images.shape[0] == case["n"]
    return seconds, engine.name


def test_peer(record, tmp_path):
    """Per case: ours once with an empty cache (a user's first run of a checkpoint: the ONNX export included
    where `auto` picks ONNX Runtime); then ROUNDS interleaved rounds of the diffusers process, ours with its
    defaults (the cache warm: every later run) and ours with `--precision bf16` (the CPU's speed option, where
    the CPU has bf16 instructions), so that a slow moment of this shared machine falls on every side alike;
    then ours in this process (the loop, as the diffusers process times its own). Speed-ups: medians."""
    env = os.environ | {"DDPM_ENGINE_CACHE": str(tmp_path / "cache")}  # not the user's cache: the first run is cold
    script = tmp_path / "diffusers_loop.py"
    script.write_text(DIFFUSERS_LOOP)
    for case in cases(tmp_path):
        flags = ["--checkpoint", str(case["folder"]), "-n", str(case["n"]), "--sampler", case["sampler"],
                 "--steps", str(case["steps"]), "--spacing", case["spacing"], "--guidance", str(case["guidance"]),
                 "--threshold", "0",  # diffusers' loop does not threshold: the same work on both sides
                 "--batch-size", str(case["batch"]), "--device", "cpu", "--no-progress"]
        common = dict(batch=case["batch"], preset=case["name"], sampler=case["sampler"], steps=case["steps"],
                      images=case["n"], guidance=case["guidance"])

        def ours(run: str, *extra: str) -> tuple[float, str]:
            seconds, out = wall([sys.executable, "-m", "engine.apps.cli", "sample", *flags, *extra,
                                 "--out", str(tmp_path / case["name"] / run)], env)
            return seconds, out.split("; ")[-1].split(" on ")[0]  # what ran, e.g. "onnx-fp32"

        def theirs() -> tuple[float, dict]:
            seconds, out = wall([sys.executable, str(script), str(case["folder"]), str(case["n"]), case["sampler"],
                                 str(case["steps"]), case["spacing"], str(case["guidance"]), str(case["batch"]),
                                 str(case["null"])])
            report = json.loads(out.strip().splitlines()[-1])
            assert report["finite"]
            return seconds, report

        first_s, first_ran = ours("first-run")
        sides = {"diffusers": [], "default": [], "bf16": []}
        loops, ran = [], {}
        for round_ in range(ROUNDS):
            seconds, report = theirs()
            sides["diffusers"].append(seconds)
            loops.append(report["loop_s"])
            for side, extra in (("default", ()), ("bf16", ("--precision", "bf16"))):
                if side == "bf16" and not native_cpu_bf16():
                    continue  # emulated bf16: slower than fp32, not an option worth timing
                seconds, ran[side] = ours(f"{side}-{round_}", *extra)
                sides[side].append(seconds)
        diffusers, loop = timing(sides["diffusers"]), statistics.median(loops)
        record(what="peer", backend="diffusers", timing=diffusers, loop_s=round(loop, 2), **common)
        record(what="peer", backend=f"ddpm-engine ({first_ran}, first run)", timing=timing([first_s]),
               speedup_whole_process=round(diffusers.median_ms / (first_s * 1e3), 2), **common)
        for side, seconds in sides.items():
            if side != "diffusers" and seconds:
                ours_timing = timing(seconds)
                record(what="peer", backend=f"ddpm-engine ({ran[side]}, {'cache warm' if side == 'default' else side})",
                       timing=ours_timing, speedup_whole_process=round(diffusers.median_ms / ours_timing.median_ms, 2),
                       **common)
        loop_s, loop_ran = ours_loop(case, env)
        record(what="peer-loop", backend=f"ddpm-engine ({loop_ran})", timing=timing([loop_s]),
               speedup_loop=round(loop / loop_s, 2), **common)
