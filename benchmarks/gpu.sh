#!/usr/bin/env bash
# The GPU check, in ONE run on the machine described in ../shared/GPU.md (torch 2.11, triton 3.6,
# onnx, onnxruntime, pytest, pytest-benchmark already there; no network):
#   1. installs what is missing from wheels carried in .carry/wheels (pip --no-index),
#   2. runs the tests (the GPU-only ones run there, not skipped),
#   3. runs the benchmarks, writing benchmarks/results/<date>-gpu.json and .md,
# within 8 minutes, and copies the results, the logs and the JUnit report to $OUT if set.
# Usage (device tool): bash benchmarks/gpu.sh
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT="${OUT:-}"
results=benchmarks/results
mkdir -p "$results"

if compgen -G ".carry/wheels/*.whl" >/dev/null; then
    python -m pip install --quiet --no-index --no-deps .carry/wheels/*.whl
fi
python - <<'PY'
import importlib
missing = [m for m in ("torch", "triton", "numpy", "safetensors", "PIL", "tqdm", "onnx", "onnxruntime",
                       "pytest", "pytest_benchmark") if importlib.util.find_spec(m) is None]
print("missing:", ", ".join(missing) or "nothing")
import torch
print("torch", torch.__version__, "cuda", torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else "")
PY

status=0
# 2. Tests: 180 s at most (the CPU-only suites take about a minute; what matters here are the GPU ones,
#    so tests/kernels and tests/engine run first). The limit sends SIGINT: pytest then stops, prints
#    the failures so far and writes the JUnit report; -v names each test as it finishes.
tests=(tests/kernels tests/engine $(ls -d tests/*/ | grep -v -e '^tests/kernels/$' -e '^tests/engine/$' -e __pycache__) tests/test_*.py)
timeout -s INT -k 8 172 python -m pytest -v -p no:cacheprovider "${tests[@]}" --junitxml="$results/tests-gpu.xml" \
    2>&1 | tee "$results/tests-gpu.log" | tail -40 || status=1
# 3. Benchmarks: 270 s at most; the JSON is rewritten after every row, so a timeout keeps what finished.
#    (The eager fp32 DDPM-1000 sampling row, ~5 min alone, runs only with DDPM_BENCH_SLOW=1.)
#    On CUDA benchmarks/conftest.py orders them most important first (GPU_ORDER), as not all fit.
DDPM_BENCH_OUT="$results" timeout -s INT -k 8 262 python -m pytest -q -s -p no:cacheprovider benchmarks \
    2>&1 | tee "$results/bench-gpu.log" | grep -E "^\{|passed|failed|rror" | tail -80 || status=1
if [ -n "$OUT" ]; then
    tar -czf "$OUT/gpu-results.tgz" "$results"
    cp "$results"/tests-gpu.log "$results"/bench-gpu.log "$OUT"/ 2>/dev/null
fi
exit $status
