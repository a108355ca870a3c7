"""Collects one row per measurement; with DDPM_BENCH_OUT=DIR set, (re)writes DIR/<date>-<device>.json
and .md after every row, so a run stopped by a time limit keeps what it measured
(benchmarks/gpu.sh sets it to benchmarks/results)."""

from __future__ import annotations

import datetime
import json
import os
import platform
from pathlib import Path

import pytest
import torch

from benchmarks.harness import ON_GPU, ROUNDS, WARMUP, Timing, measure, measure_ceilings

ROWS: list[dict] = []
START = datetime.datetime.now(datetime.timezone.utc)
_CEILINGS: dict = {}


def ceilings() -> dict:
    if not _CEILINGS:
        _CEILINGS.update(measure_ceilings())
    return _CEILINGS


# On the GPU the whole suite does not fit benchmarks/gpu.sh's time limit (torch.compile alone
# takes about a minute a shape), so the rows run most important and cheapest first: a timeout
# then cuts the least useful ones (rows are written as they come).
GPU_ORDER = (  # (test id prefix, suffix)
    ("bench_kernels.py::", ""),
    ("bench_sample.py::test_step[", "-fused]"),
    ("bench_sample.py::test_step[", "-eager-bf16]"),
    ("bench_sample.py::test_step[", "-eager-fp32]"),
    ("bench_sample.py::test_sample_1000[ddim-50-fused]", ""),
    ("bench_train.py::", ""),
    ("bench_sample.py::test_sample_1000[ddim-50-eager-fp32]", ""),
    ("bench_sample.py::test_step[", "-compile]"),
    ("bench_export.py::", ""),
)


def gpu_rank(nodeid: str) -> int:
    """Position of a benchmark in GPU_ORDER (unlisted ones, e.g. DDPM-1000 sampling, last)."""
    name = nodeid.rsplit("/", 1)[-1]
    for rank, (prefix, suffix) in enumerate(GPU_ORDER):
        if name.startswith(prefix) and name.endswith(suffix):
            return rank
    return len(GPU_ORDER)


def pytest_collection_modifyitems(session, config, items):
    if ON_GPU:
        items.sort(key=lambda item: gpu_rank(item.nodeid))  # stable: file order within a rank


@pytest.fixture
def record(request):
    """record(what=, backend=, batch=, timing=Timing, flops=None, bytes=None, **extra)."""

    def add(*, what: str, backend: str, batch: int, timing: Timing, flops: float | None = None,
            bytes: float | None = None, **extra) -> dict:
        row = {"what": what, "backend": backend, "batch": batch, "ms_median": sig(timing.median_ms),
               "ms_min": sig(timing.min_ms), "ms_max": sig(timing.max_ms),
               "first_call_s": sig(timing.first_call_s), "rounds": timing.rounds, **extra,
               "test": request.node.nodeid}
        seconds = timing.median_ms * 1e-3
        if flops is not None:
            row["tflop_per_s"] = sig(flops / seconds / 1e12)
            row["fraction_of_peak"] = sig(flops / seconds / ceilings()["compute_flop_per_s"])
        if bytes is not None:
            row["gb_per_s"] = sig(bytes / seconds / 1e9)
            row["fraction_of_copy"] = sig(bytes / seconds / ceilings()["copy_bytes_per_s"])
        ROWS.append(row)
        print(f"\n{row}")
        write_report()
        return row

    return add


def sig(value: float) -> float:
    """Four significant digits."""
    return float(f"{value:.4g}")


def device_name() -> str:
    return torch.cuda.get_device_name() if ON_GPU else f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


# Row fields that tell cases apart in the markdown table.
CASE_KEYS = ("preset", "shape", "dtype", "layout", "sampler", "steps", "device")


def markdown(report: dict) -> str:
    lines = [f"Measured {report['date']} on {report['device']}, torch {report['torch']}, triton {report['triton']}.",
             f"Ceilings measured in the same run: compute ({report['ceilings'].get('compute_dtype')}, "
             f"{report['ceilings'].get('compute_kernel')}) "
             f"{report['ceilings'].get('compute_flop_per_s', 0) / 1e12:.3g} TFLOP/s, copy "
             f"{report['ceilings'].get('copy_bytes_per_s', 0) / 1e9:.0f} GB/s.", "",
             "| what | case | backend | batch | median ms | min ms | max ms | rate | fraction of ceiling | first call s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        case = " ".join(str(r[k]) for k in CASE_KEYS if k in r)
        rate = f"{r['tflop_per_s']} TFLOP/s" if "tflop_per_s" in r else f"{r['gb_per_s']} GB/s" if "gb_per_s" in r else ""
        frac = r.get("fraction_of_peak", r.get("fraction_of_copy", ""))
        lines.append(f"| {r['what']} | {case} | {r['backend']} | {r['batch']} | {r['ms_median']} | {r['ms_min']} | "
                     f"{r['ms_max']} | {rate} | {frac} | {r['first_call_s']} |")
    return "\n".join(lines) + "\n"


def write_report() -> None:
    out = os.environ.get("DDPM_BENCH_OUT")
    if not out or not ROWS:
        return
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    report = {"gpu": torch.cuda.get_device_name() if ON_GPU else None, "device": device_name(),
              "date": START.isoformat(timespec="seconds"), "torch": torch.__version__, "triton": triton_version,
              "ceilings": ceilings(), "rows": ROWS}
    stem = f"{report['date'][:10]}-{'gpu' if ON_GPU else 'cpu'}"
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / f"{stem}.json").write_text(json.dumps(report, indent=1) + "\n")
    (Path(out) / f"{stem}.md").write_text(markdown(report))


@pytest.fixture
def bench(benchmark, record):
    """Time fn with `measure`, record the row, and give pytest-benchmark its own synchronised rounds.

    bench(fn, what=, backend=, batch=, flops=None, bytes=None, **extra) -> the row.
    """

    def run(fn, *, what: str, backend: str, batch: int, warmup: int = WARMUP, rounds: int = ROUNDS, **row) -> dict:
        cuda_events = ON_GPU and row.get("device") != "cpu"  # rows of CPU work say device="cpu"
        result = record(what=what, backend=backend, batch=batch, timing=measure(fn, warmup, rounds, cuda_events),
                        **row)
        benchmark.extra_info.update({k: v for k, v in result.items() if k != "test"})

        def synchronised():
            fn()
            if ON_GPU:
                torch.cuda.synchronize()

        benchmark.pedantic(synchronised, rounds=rounds, iterations=1)
        return result

    return run
