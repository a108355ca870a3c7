"""The engine's GPU check, for one run on the H200 (issue 5): correctness first, then speed.

    python benchmarks/engine_gpu_check.py            # ~8-10 min on an H200
    python benchmarks/engine_gpu_check.py --quick    # correctness + the batch-2/256 steps only

1. pip install -e . if the console script is missing (no network needed: no new deps);
2. the GPU tests of the engine (fused vs eager on the real presets, graphed == not graphed,
   no host sync while replaying, 50-step DDIM images vs eager fp32, backends);
3. `ddpm-engine bench` for ddpm-cifar10 at U-Net batch 2, 256, 1024 and ddpm-stl10 at 2, 256;
4. the benchmark suite's engine rows (per-step and whole -n 1000 runs) as JSON + markdown
   under benchmarks/results/.
Each stage has its own time limit and its output is teed to benchmarks/results/engine-gpu-check.log;
a failing stage does not stop the later ones. Run its CPU path first: it skips what needs CUDA.
"""

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def stage(name: str, command: list[str], limit_s: int, log, env=None) -> bool:
    print(f"\n=== {name} (limit {limit_s} s): {' '.join(command)}", file=log, flush=True)
    start = time.perf_counter()
    try:
        result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=limit_s,
                                env={**os.environ, **(env or {})})
        output, ok = result.stdout + result.stderr, result.returncode == 0
    except subprocess.TimeoutExpired as e:
        output, ok = f"{e.stdout or ''}{e.stderr or ''}\nTIMED OUT after {limit_s} s", False
    print(output[-6000:], file=log, flush=True)
    print(f"=== {name}: {'ok' if ok else 'FAILED'} in {time.perf_counter() - start:.0f} s", file=log, flush=True)
    return ok


class Tee:
    def __init__(self, *streams):
        self.streams = streams

    def write(self, text):
        for s in self.streams:
            s.write(text)

    def flush(self):
        for s in self.streams:
            s.flush()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="correctness and small batches only")
    args = parser.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    with open(RESULTS / "engine-gpu-check.log", "w") as f:
        log = Tee(sys.stdout, f)
        import torch
        print(f"torch {torch.__version__}, cuda {torch.version.cuda}, "
              f"{torch.cuda.get_device_name() if torch.cuda.is_available() else 'NO GPU'}", file=log)
        try:
            import triton
            print(f"triton {triton.__version__}", file=log)
        except ImportError:
            print("triton missing: the engine cannot run", file=log)
        if subprocess.run([py, "-c", "import engine.cli"], cwd=ROOT).returncode != 0:
            stage("install", [py, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "-e", "."], 180, log)
        results = {}
        results["tests"] = stage("engine tests", [py, "-m", "pytest", "-q", "-rs", "-x", "tests/engine/test_fused.py",
                                                  "tests/engine/test_graphs.py", "tests/engine/test_backends.py"],
                                 300, log)
        batches = "2,256" if args.quick else "2,256,1024"
        results["bench cifar10"] = stage("bench ddpm-cifar10", [py, "-m", "engine.cli", "bench", "--preset", "ddpm-cifar10",
                                                                "--batch-sizes", batches, "--backends",
                                                                "eager-fp32,eager-bf16,compile,engine"], 420, log)
        if not args.quick:
            results["bench stl10"] = stage("bench ddpm-stl10", [py, "-m", "engine.cli", "bench", "--preset", "ddpm-stl10",
                                                                "--batch-sizes", "2,256", "--backends",
                                                                "eager-fp32,eager-bf16,engine"], 300, log)
            results["suite"] = stage("benchmark suite (JSON)", [py, "-m", "pytest", "-q", "-rs", "-s",
                                                                "benchmarks/bench_engine.py"],
                                     540, log, env={"DDPM_BENCH_OUT": str(RESULTS)})
        print("\nsummary: " + ", ".join(f"{k} {'ok' if v else 'FAILED'}" for k, v in results.items()), file=log)
        return 0 if all(results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
