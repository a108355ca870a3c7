"""The sampling step as one CUDA graph per batch bucket.

One replay runs a whole step of the reverse process for a fixed batch B:
    eps = (1 + w) eps(x, c) - w eps(x, null)      the 2B U-Net call (engine.sampler.guided_eps)
    z   = per-image noise of step i               (engine.noise.gaussian_noise)
    x  <- c_x0 x0_hat + c_xt x + c_eps eps + sigma z   (engine.sampler.step)
    i  <- i - 1
The step index lives in a device tensor of shape (1,) that the graph itself decrements, and
every coefficient is read from a `SamplerPlan` already on the device, so the host only
calls `replay()` S times: no copies, no synchronisation inside the loop.

The index has shape (1,), not (): indexing a tensor with a 0-d integer tensor is turned
into a Python int by `.item()` (a host sync, illegal while capturing), whereas a (1,) index
is a gather on the device, and broadcasts like a scalar in `step`.

A request smaller than its bucket is padded (padded rows get label 0 and key 0, and are
dropped); the same `_advance` runs eagerly when `graphs=False`, which is what the test of
"graphed == not graphed" compares against. Graphs are captured lazily, on first use of a
bucket, after warm-up iterations on a side stream (cuDNN/cuBLAS/Triton autotuning and
allocations happen there, not in the capture); all buckets share one memory pool, which
is safe because replays never overlap and nothing allocated inside a graph outlives its
replay except through the static buffers.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from engine.noise import INITIAL_STREAM, gaussian_noise
from engine.sampler import SamplerPlan, guided_eps, step

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
    labels: torch.Tensor      # int64 (B,)
    keys: torch.Tensor        # int64 (B,)
    index: torch.Tensor       # int64 (1,): the step i the next replay runs
    graph: torch.cuda.CUDAGraph | None = None
    capture_s: float = 0.0


@dataclass
class GraphedSampler:
    """A `sample_loop` replacement: same arguments, same result, one graph replay per step.

    Call it as engine.sampler.sample_loop is called (generate(..., loop=runner)). The plan,
    guidance and clip_x0 of the first call are baked into the graphs; a call with another
    plan or settings drops them and captures afresh.
    """

    buckets: tuple[int, ...]
    graphs: bool = True
    _key: tuple | None = field(default=None, repr=False)
    _keep: tuple = field(default=(), repr=False)  # the model and plan of _key, held so their ids stay theirs
    _state: dict[int, _Bucket] = field(default_factory=dict, repr=False)
    _pool: object = field(default=None, repr=False)

    @property
    def capture_seconds(self) -> dict[int, float]:
        return {b: s.capture_s for b, s in self._state.items() if s.graph is not None}

    def bucket_for(self, n: int) -> int:
        for b in self.buckets:
            if n <= b:
                return b
        raise ValueError(f"batch {n} exceeds the largest bucket {self.buckets[-1]}")

    @torch.no_grad()
    def __call__(self, model: nn.Module, plan: SamplerPlan, labels: torch.Tensor, keys: torch.Tensor,
                 shape: tuple[int, ...], guidance: float, null_class: int, clip_x0: bool = False,
                 x_T: torch.Tensor | None = None, on_step=None) -> torch.Tensor:
        n = len(labels)
        if n > self.buckets[-1]:  # larger than any graph: run in bucket-sized pieces
            big = self.buckets[-1]
            return torch.cat([self(model, plan, labels[i:i + big], keys[i:i + big], shape, guidance, null_class,
                                   clip_x0, None if x_T is None else x_T[i:i + big], on_step)
                              for i in range(0, n, big)])
        advance, x = self.prepare(model, plan, labels, keys, shape, guidance, null_class, clip_x0, x_T)
        for _ in range(plan.num_steps):
            advance()
            if on_step is not None:
                on_step()
        return x.clone()

    @torch.no_grad()
    def prepare(self, model: nn.Module, plan: SamplerPlan, labels: torch.Tensor, keys: torch.Tensor,
                shape: tuple[int, ...], guidance: float, null_class: int, clip_x0: bool = False,
                x_T: torch.Tensor | None = None) -> tuple[Callable[[], None], torch.Tensor]:
        """Load a batch into its bucket at step S - 1 (capturing the bucket's graph on first use).

        Returns (advance, x): each advance() runs the current step i and moves to i - 1; x is
        the view of the batch's rows of x_t, updated in place.
        """
        n = len(labels)
        key = (id(model), id(plan), tuple(shape), float(guidance), int(null_class), bool(clip_x0))
        if key != self._key:
            self._state.clear()
            # The graphs read the plan's (and model's) device memory: hold both, or a freed plan's
            # memory and id could be reused by a later plan that would then match the key.
            self._key, self._keep = key, (model, plan)
        bucket = self._bucket(self.bucket_for(n), labels.device, shape)
        run = lambda: _advance(model, plan, bucket, shape, guidance, null_class, clip_x0)
        if self.graphs and bucket.graph is None:
            self._capture(bucket, run)

        bucket.labels.zero_()
        bucket.keys.zero_()
        bucket.labels[:n] = labels
        bucket.keys[:n] = keys
        # x_T for every row, padded ones too, so the padded batch is a valid input.
        bucket.x.copy_(gaussian_noise(bucket.keys, INITIAL_STREAM, shape))
        if x_T is not None:
            bucket.x[:n] = x_T
        bucket.index.fill_(plan.num_steps - 1)
        return (bucket.graph.replay if self.graphs else run), bucket.x[:n]

    def _bucket(self, size: int, device: torch.device, shape: tuple[int, ...]) -> _Bucket:
        if size not in self._state:
            self._state[size] = _Bucket(
                x=torch.zeros(size, *shape, device=device),
                labels=torch.zeros(size, dtype=torch.int64, device=device),
                keys=torch.zeros(size, dtype=torch.int64, device=device),
                index=torch.zeros(1, dtype=torch.int64, device=device))
        return self._state[size]

    def _capture(self, bucket: _Bucket, run) -> None:
        """Warm up on a side stream, then capture one step (`run`) into the bucket's graph."""
        start = time.perf_counter()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(WARMUP_ITERS):
                bucket.index.fill_(0)  # a valid step of any plan; prepare() resets x and the index
                run()
        torch.cuda.current_stream().wait_stream(side)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        bucket.graph = torch.cuda.CUDAGraph()
        bucket.index.fill_(0)
        with torch.cuda.graph(bucket.graph, pool=self._pool):
            run()
        torch.cuda.synchronize()
        bucket.capture_s = time.perf_counter() - start


def _advance(model: nn.Module, plan: SamplerPlan, bucket: _Bucket, shape: tuple[int, ...], guidance: float,
             null_class: int, clip_x0: bool) -> None:
    """One step i -> i - 1 on the bucket's static tensors; everything the host passes is fixed."""
    i = bucket.index
    t = plan.timesteps[i].expand(len(bucket.x))
    eps = guided_eps(model, bucket.x, t, bucket.labels, guidance, null_class).float()
    z = gaussian_noise(bucket.keys, i, shape)
    bucket.x.copy_(step(plan, i, bucket.x, eps, z, clip_x0))
    i.sub_(1)
