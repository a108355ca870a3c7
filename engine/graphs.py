"""A step function as one CUDA graph per batch bucket (the fused backend on CUDA).

`StepGraphs(fn, buckets)` takes a function of batch-first tensors that returns batch-first
tensors (the engine's step: engine.core.Engine.denoise, which runs every row's U-Net call,
guidance, noise and update) and knows nothing of who calls it. A call pads its inputs to the
smallest bucket that holds them, copies them into that bucket's static tensors, replays the
bucket's graph and returns the first n rows of its static outputs: the host only copies and
calls `replay()`, nothing is read back. Padded rows are zeros (a valid row for the engine:
table entry 0, label 0, key 0, w 0) and are dropped.

Graphs are captured lazily, on first use of a bucket, after warm-up iterations on a side
stream (cuDNN/cuBLAS/Triton autotuning and allocations happen there, not in the capture); all
buckets share one memory pool, which is safe because replays never overlap and nothing
allocated inside a graph outlives its replay except through the static outputs. With
`capture=False` the same padded buckets run eagerly: what the CPU tests compare against the
plain step, and what runs the fused model on the CPU in the Triton interpreter.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

WARMUP_ITERS = 3


def default_buckets(max_batch: int) -> tuple[int, ...]:
    """Powers of two below max_batch, and max_batch: padding wastes under half a batch."""
    buckets, b = [], 1
    while b < max_batch:
        buckets.append(b)
        b *= 2
    return (*buckets, max_batch)


@dataclass
class _Bucket:
    inputs: tuple[torch.Tensor, ...]
    outputs: tuple[torch.Tensor, ...] | None = None
    graph: torch.cuda.CUDAGraph | None = None


class StepGraphs:
    """fn over batches of up to max(buckets) rows, each padded to its bucket; one graph per bucket."""

    def __init__(self, fn: Callable[..., tuple[torch.Tensor, ...]], buckets: tuple[int, ...], capture: bool = True):
        self.fn, self.buckets, self.capture = fn, tuple(buckets), capture
        self._buckets: dict[int, _Bucket] = {}
        self._pool = None

    def bucket_for(self, n: int) -> int:
        for b in self.buckets:
            if n <= b:
                return b
        raise ValueError(f"batch {n} exceeds the largest bucket {self.buckets[-1]}")

    @torch.no_grad()
    def __call__(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        n = len(inputs[0])
        size = self.bucket_for(n)
        if size not in self._buckets:
            self._buckets[size] = _Bucket(tuple(torch.zeros(size, *x.shape[1:], dtype=x.dtype, device=x.device)
                                                for x in inputs))
        bucket = self._buckets[size]
        for static, x in zip(bucket.inputs, inputs):
            static[:n].copy_(x)
            static[n:].zero_()
        if not self.capture:
            return tuple(y[:n] for y in self.fn(*bucket.inputs))
        if bucket.graph is None:
            self._capture(bucket)
        bucket.graph.replay()
        return tuple(y[:n] for y in bucket.outputs)

    def _capture(self, bucket: _Bucket) -> None:
        """Warm up on a side stream, then capture fn on the bucket's static inputs (fn is pure: it
        reads them and writes only its outputs)."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(WARMUP_ITERS):
                self.fn(*bucket.inputs)
        torch.cuda.current_stream().wait_stream(side)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        bucket.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(bucket.graph, pool=self._pool):
            bucket.outputs = tuple(self.fn(*bucket.inputs))
        torch.cuda.synchronize()
