"""The sampling step as one CUDA graph per batch bucket (the fused backend on CUDA).

One replay runs a whole step of the reverse process for a fixed batch B, the Runner's own
step body (engine.generate.Runner.step: the 2B guided U-Net call, the per-image noise, the
update, and the x0_hat that DPM-Solver++(2M) keeps for the next step), and then i <- i - 1. The step index lives in a device tensor of shape (1,) that the
graph itself decrements, and every coefficient is read from the Runner's `SamplerPlan`
already on the device, so the host only calls `replay()` S times: no copies, no
synchronisation inside the loop.

The index has shape (1,), not (): indexing a tensor with a 0-d integer tensor is turned
into a Python int by `.item()` (a host sync, illegal while capturing), whereas a (1,) index
is a gather on the device, and broadcasts like a scalar in `step`.

A request smaller than its bucket is padded (padded rows get label 0 and key 0, and are
dropped); with `capture=False` the same bucketed step runs eagerly, which is what the test
of "graphed == not graphed" compares against (and what runs the fused model on the CPU in
the Triton interpreter). Graphs are captured lazily, on first use of a bucket, after
warm-up iterations on a side stream (cuDNN/cuBLAS/Triton autotuning and allocations happen
there, not in the capture); all buckets share one memory pool, which is safe because
replays never overlap and nothing allocated inside a graph outlives its replay except
through the static buffers. A StepGraphs belongs to one Runner (its model, plan and
guidance are baked into the graphs).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import torch

from engine.noise import INITIAL_STREAM, gaussian_noise

if TYPE_CHECKING:
    from engine.generate import Runner

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
    """The static tensors a graph reads and writes, for one batch size."""

    x: torch.Tensor           # x_t, float32 (B, C, H, W), updated in place
    x0: torch.Tensor          # the last step's x0_hat (DPM-Solver++(2M)'s memory), same shape
    labels: torch.Tensor      # int64 (B,)
    keys: torch.Tensor        # int64 (B,)
    index: torch.Tensor       # int64 (1,): the step i the next replay runs
    graph: torch.cuda.CUDAGraph | None = None


@dataclass
class StepGraphs:
    """Batches of up to max(buckets) images, each padded to its bucket; one graph per bucket."""

    buckets: tuple[int, ...]
    capture: bool = True
    _runner: object = field(default=None, repr=False)
    _state: dict[int, _Bucket] = field(default_factory=dict, repr=False)
    _pool: object = field(default=None, repr=False)

    def bucket_for(self, n: int) -> int:
        for b in self.buckets:
            if n <= b:
                return b
        raise ValueError(f"batch {n} exceeds the largest bucket {self.buckets[-1]}")

    @torch.no_grad()
    def run(self, runner: Runner, labels: torch.Tensor, keys: torch.Tensor, x_T: torch.Tensor | None = None,
            on_step=None) -> torch.Tensor:
        """Runner.__call__ through the graphs: x_0 of the batch."""
        big = self.buckets[-1]
        if len(labels) > big:  # larger than any graph: run in bucket-sized pieces
            return torch.cat([self.run(runner, labels[i:i + big], keys[i:i + big],
                                       None if x_T is None else x_T[i:i + big], on_step)
                              for i in range(0, len(labels), big)])
        advance, x = self.prepare(runner, labels, keys, x_T)
        for _ in range(runner.plan.num_steps):
            advance()
            if on_step is not None:
                on_step()
        return x.clone()

    @torch.no_grad()
    def prepare(self, runner: Runner, labels: torch.Tensor, keys: torch.Tensor,
                x_T: torch.Tensor | None = None) -> tuple[Callable[[], None], torch.Tensor]:
        """Load a batch into its bucket at step S - 1 (capturing the bucket's graph on first use).

        Returns (advance, x): each advance() runs the current step i and moves to i - 1; x is
        the view of the batch's rows of x_t, updated in place.
        """
        if self._runner is None:
            self._runner = runner
        if runner is not self._runner:
            raise ValueError("a StepGraphs serves the one Runner it was built for")
        n = len(labels)
        bucket = self._bucket(self.bucket_for(n), labels.device, runner.shape)

        def advance_eagerly() -> None:
            x, x0 = runner.step(bucket.index, bucket.x, bucket.x0, bucket.labels, bucket.keys)
            bucket.x.copy_(x)
            bucket.x0.copy_(x0)
            bucket.index.sub_(1)

        if self.capture and bucket.graph is None:
            self._capture(bucket, advance_eagerly)
        bucket.labels.zero_()
        bucket.keys.zero_()
        bucket.labels[:n] = labels
        bucket.keys[:n] = keys
        # x_T for every row, padded ones too, so the padded batch is a valid input.
        bucket.x.copy_(gaussian_noise(bucket.keys, INITIAL_STREAM, runner.shape))
        if x_T is not None:
            bucket.x[:n] = x_T
        bucket.x0.zero_()
        bucket.index.fill_(runner.plan.num_steps - 1)
        return (bucket.graph.replay if self.capture else advance_eagerly), bucket.x[:n]

    def _bucket(self, size: int, device: torch.device, shape: tuple[int, ...]) -> _Bucket:
        if size not in self._state:
            self._state[size] = _Bucket(
                x=torch.zeros(size, *shape, device=device),
                x0=torch.zeros(size, *shape, device=device),
                labels=torch.zeros(size, dtype=torch.int64, device=device),
                keys=torch.zeros(size, dtype=torch.int64, device=device),
                index=torch.zeros(1, dtype=torch.int64, device=device))
        return self._state[size]

    def _capture(self, bucket: _Bucket, advance) -> None:
        """Warm up on a side stream, then capture one step (`advance`) into the bucket's graph."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(WARMUP_ITERS):
                bucket.index.fill_(0)  # a valid step of any plan; prepare() resets x and the index
                advance()
        torch.cuda.current_stream().wait_stream(side)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        bucket.graph = torch.cuda.CUDAGraph()
        bucket.index.fill_(0)
        with torch.cuda.graph(bucket.graph, pool=self._pool):
            advance()
        torch.cuda.synchronize()
