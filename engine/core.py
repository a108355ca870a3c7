"""The sampling engine: one step-level batcher that every sampling path drives.

An `Engine` owns a set of slots, the rows of the U-Net batch. Each slot holds one image of one
request (`Request`): its x_t, its position in its own sampler plan, its class label, its
guidance w, its noise key and DPM-Solver++(2M)'s previous x0_hat. One engine step (`Engine.step`):

    admit      fill free slots from the waiting requests, fewest rows admitted so far first (a
               1-image request waits for free slots, never for a big request to end)
    eps        ONE model call on the conditional rows plus the unconditional rows of those with
               w != 0 (rows are kept guided-first, so those are x[:g]); per row
               eps = (1 + w) eps(x, c) - w eps(x, null)  (Ho & Salimans 2022, Eq. 6)
    update     x <- c_x0 x0_hat + c_xt x + c_eps eps + c_prev x0_hat_prev + sigma z, each row with
               the coefficients of its own plan and step, gathered from one table on the device
               (engine.sampler.step); z is the row's own noise of its own step (engine.noise)
    retire     rows past their last step leave at once; a request is done with its last image

So rows at different steps of different samplers, step counts, classes and guidance scales share
a U-Net call, and an image is the same whatever else shares its batch (each row's maths reads
only that row; the convolutions may sum in another order for another batch size, last bits
only). Offline sampling (`ddpm-engine sample`, interpolation, training's grids and FID, the
benchmarks) is every request submitted at once and `run()` until idle; `ddpm-engine serve`
submits from other threads and runs `serve_forever` on one engine thread.

A step reads nothing from the device on the host: the host keeps each row's step count and
rebuilds the row tensors only when rows join or leave. With `graphs` (the fused backend on
CUDA) the step runs as one CUDA graph per batch bucket (engine.graphs), padded to the bucket,
and then every row also computes its unconditional half (w = 0 rows weigh it by 0).
"""

from __future__ import annotations

import collections
import itertools
import queue
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Callable

import torch

from engine.config import DiffusionConfig
from engine.errors import UserError
from engine.graphs import StepGraphs, default_buckets
from engine.noise import INITIAL_STREAM, gaussian_noise
from engine.sampler import SamplerPlan, step
from engine.settings import SampleSettings

PLAN_CAPACITY = 1 << 14  # plan-table entries (sampling steps over all plans in use); compacted when full
ADMISSIONS = ("step", "request")


class EngineClosed(RuntimeError):
    """The engine stopped admitting (shutdown) before this request could run."""


class NonFiniteImages(UserError):
    """A request's images came out NaN or infinite: broken weights or settings, not a bug here."""


@dataclass(eq=False)
class Request:
    """n images with one sampler setting: row j has label labels[j] and noise key keys[j] (and x_T[j]
    when given; else it is drawn from the key). Thread-safe to submit, cancel and wait on."""

    settings: SampleSettings
    labels: torch.Tensor                      # int64 (n,)
    keys: torch.Tensor                        # int64 (n,): engine.noise.image_keys(seed, indices)
    x_T: torch.Tensor | None = None           # (n, C, H, W), else drawn from the keys
    on_progress: Callable[[Request, int], object] | None = None  # (request, image-steps just taken), engine thread
    on_image: Callable[[Request, int], object] | None = None     # (request, image index) as each image finishes
    on_done: Callable[[Request], object] | None = None           # engine thread
    images: torch.Tensor | None = field(default=None, repr=False)  # x_0, float32 on the engine's device, when done
    error: BaseException | None = None
    cancelled: bool = False
    admitted: int = 0                         # rows that have entered the batch
    finished: int = 0                         # rows that have left it with their x_0
    steps_done: int = 0                       # image-steps taken
    num_steps: int = 0                        # S of this request's plan (set on submit)
    sequence: int = 0                         # arrival order (set on submit)
    _done: threading.Event = field(default_factory=threading.Event, repr=False)

    @property
    def n(self) -> int:
        return len(self.labels)

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def cancel(self) -> None:
        """Free its slots at the next step (from any thread)."""
        self.cancelled = True

    def wait(self, timeout: float | None = None) -> torch.Tensor:
        """The finished x_0 (float32, nominally in [-1, 1]); raises the request's error."""
        if not self._done.wait(timeout):
            raise TimeoutError("the request did not finish in time")
        if self.error is not None:
            raise self.error
        return self.images


class PlanTable:
    """Every plan the rows run, one after another in fixed device tensors (a CUDA graph reads them
    by address): the coefficient fields as (N, 1, 1, 1), so a row's gathered coefficient
    broadcasts over its image, and `stream`, each entry's step index i (its noise stream)."""

    def __init__(self, diffusion: DiffusionConfig, device: torch.device, capacity: int = PLAN_CAPACITY):
        self.diffusion, self.capacity = diffusion, capacity
        column = torch.zeros(capacity, 1, 1, 1, device=device)
        self.coefs = SamplerPlan(torch.zeros(capacity, dtype=torch.int64, device=device),
                                 *(column.clone() for _ in range(7)))
        self.stream = torch.zeros(capacity, dtype=torch.int64, device=device)
        self.offsets: dict[SampleSettings, int] = {}
        self.used = 0

    def key(self, settings: SampleSettings) -> SampleSettings:
        """What a plan depends on: the settings without guidance and x0_hat's bounds, steps resolved."""
        return replace(settings, guidance=0.0, clip_x0=False, threshold=0.0,
                       steps=settings.num_steps(self.diffusion.num_timesteps))

    def fits(self, key: SampleSettings) -> bool:
        return key in self.offsets or self.used + key.steps <= self.capacity

    def offset(self, key: SampleSettings) -> int:
        """Where plan `key` starts (entry offset + i is its step i), written on first use."""
        if key not in self.offsets:
            plan = key.plan(self.diffusion)
            if self.used + plan.num_steps > self.capacity:
                raise RuntimeError("the plan table is full")  # the engine compacts before this
            at = slice(self.used, self.used + plan.num_steps)
            for name, column in vars(self.coefs).items():
                values = getattr(plan, name).to(column.device)
                column[at] = values if name == "timesteps" else values.view(-1, 1, 1, 1)
            self.stream[at] = torch.arange(plan.num_steps)
            self.offsets[key] = self.used
            self.used += plan.num_steps
        return self.offsets[key]

    def keep_only(self, keys: set[SampleSettings]) -> None:
        """Drop every plan but `keys`, rewriting the table in place (offsets change)."""
        self.offsets, self.used = {}, 0
        for key in keys:
            self.offset(key)


@dataclass
class _Row:
    request: Request
    image: int        # its index in the request
    key: SampleSettings
    remaining: int    # steps left; the next step is i = remaining - 1


class Engine:
    """The step-level batcher over one eps model; built by engine.backends.build_engine.

    max_batch: the most rows (images) in a step; the U-Net sees up to twice as many under
    guidance. admission: "step" (rows join at any step; fair across requests, see _admit) or "request"
    (whole-request batching: new rows join only when the batch is empty, in arrival order; kept
    as the baseline of benchmarks/bench_serve.py).
    """

    def __init__(self, name: str, model: Callable, diffusion: DiffusionConfig, shape: tuple[int, int, int],
                 null_class: int, device: torch.device | str = "cpu", max_batch: int = 32,
                 graphs: bool = False, capture: bool = True, admission: str = "step"):
        if admission not in ADMISSIONS:
            raise ValueError(f"unknown admission {admission!r}; use {' or '.join(ADMISSIONS)}")
        self.name, self.model, self.diffusion, self.shape = name, model, diffusion, shape
        self.null_class, self.device, self.max_batch = null_class, torch.device(device), max_batch
        self.admission = admission
        # graphs: the step as one CUDA graph per batch bucket (capture=False: the same padded
        # buckets run eagerly, which the CPU tests compare with the plain step).
        self.graphs = StepGraphs(self.denoise, default_buckets(max_batch), capture) if graphs else None
        self.table = PlanTable(diffusion, self.device)
        self._incoming: queue.SimpleQueue[Request] = queue.SimpleQueue()
        self._waiting: collections.deque[Request] = collections.deque()
        self._rows: list[_Row] = []
        self._state: dict[str, torch.Tensor] = {}
        self._closed = False
        self._arrivals = itertools.count()
        self.steps_run = 0
        self.on_step: Callable[[int, float], object] | None = None  # (rows, the step's host seconds): metrics

    # -- the client side (any thread) --------------------------------------------------------------------

    def submit(self, request: Request) -> Request:
        """Queue a request; it joins the batch at a coming step. Settings errors raise here."""
        request.num_steps = request.settings.plan(self.diffusion).num_steps  # bad settings raise here, not in a step
        if request.x_T is not None and tuple(request.x_T.shape) != (request.n, *self.shape):
            raise ValueError(f"x_T must have shape {(request.n, *self.shape)}")
        if self._closed:
            raise EngineClosed("the engine is shutting down")
        request.sequence = next(self._arrivals)
        self._incoming.put(request)
        return request

    @property
    def active(self) -> int:
        """Rows in the batch now."""
        return len(self._rows)

    @property
    def queued(self) -> int:
        """Requests waiting for their first or further rows (approximate from other threads)."""
        return self._incoming.qsize() + len(self._waiting)

    def close(self) -> None:
        """Stop admitting new requests; those already submitted still run."""
        self._closed = True

    # -- the engine thread -------------------------------------------------------------------------------

    @torch.no_grad()
    def run(self) -> None:
        """Step until every submitted request is done (offline sampling)."""
        while self.step():
            pass

    @torch.no_grad()
    def serve_forever(self, stop: threading.Event, poll_s: float = 0.05) -> None:
        """Step while there is work; wait for requests when idle; return when `stop` is set and the
        submitted work is done. A failed step fails the requests in it and the engine goes on."""
        while not (stop.is_set() and self.idle()):
            try:
                if self.step():
                    continue
            except Exception as error:  # the model failed: its requests get the error, the server lives
                self.fail_active(error)
                continue
            try:
                self._waiting.append(self._incoming.get(timeout=poll_s))
            except queue.Empty:
                pass

    def idle(self) -> bool:
        return not self._rows and not self._waiting and self._incoming.empty()

    @torch.no_grad()
    def step(self) -> bool:
        """One engine step (admit, one U-Net call, update, retire); False when there was nothing to run."""
        while True:
            try:
                self._waiting.append(self._incoming.get_nowait())
            except queue.Empty:
                break
        self._admit()
        if not self._rows:
            return False
        started = time.perf_counter()
        s = self._state
        args = (s["x"], s["x0"], s["pos"], s["labels"], s["keys"], s["w"], s["clip"], s["threshold"])
        if self.graphs is not None:
            x, x0 = self.graphs(*args)
        else:
            x, x0 = self.denoise(*args, guided=s["guided"], bounded=s["bounded"])
        s["x"], s["x0"] = x, x0
        s["pos"] = s["pos"] - 1
        self.steps_run += 1
        advanced = collections.Counter()
        for row in self._rows:
            row.remaining -= 1
            advanced[row.request] += 1
        for request, count in advanced.items():
            request.steps_done += count
            if request.on_progress is not None:
                request.on_progress(request, count)
        if self.on_step is not None:
            self.on_step(len(self._rows), time.perf_counter() - started)
        self._retire()
        return True

    def denoise(self, x: torch.Tensor, x0_prev: torch.Tensor, pos: torch.Tensor, labels: torch.Tensor,
                keys: torch.Tensor, w: torch.Tensor, clip: torch.Tensor, threshold: torch.Tensor,
                guided: int | None = None, bounded: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """The step of every row: x_{t_i} -> x_{t_{i-1}} and this step's x0_hat, row r at table entry
        pos[r]. guided: rows [0, guided) have w != 0 (None: every row computes its unconditional
        half, as under CUDA graphs); bounded: whether any row clips or thresholds x0_hat (clip and
        threshold say which and how; False skips that work)."""
        n = len(x)
        g = n if guided is None else guided
        t = self.table.coefs.timesteps[pos]
        if g:
            null = torch.full((g,), self.null_class, dtype=labels.dtype, device=labels.device)
            eps = self.model(torch.cat([x, x[:g]]), torch.cat([t, t[:g]]), torch.cat([labels, null])).float()
            eps_cond, eps_uncond, w_g = eps[:n], eps[n:], w[:g]
            guided_eps = (1 + w_g) * eps_cond[:g] - w_g * eps_uncond
            eps = guided_eps if g == n else torch.cat([guided_eps, eps_cond[g:]])
        else:
            eps = self.model(x, t, labels).float()
        z = gaussian_noise(keys, self.table.stream[pos], self.shape)
        if not bounded:
            return step(self.table.coefs, pos, x, eps, z, x0_prev)
        return step(self.table.coefs, pos, x, eps, z, x0_prev, clip, threshold)

    def fixed_step(self, settings: SampleSettings, labels: torch.Tensor, keys: torch.Tensor) -> Callable[[], object]:
        """A no-argument function running the step of these rows at the middle of `settings`' plan, again
        and again without advancing (what the benchmarks time): the denoise, or graph replay, `step` runs."""
        key = self.table.key(settings)
        n = len(labels)
        pos = torch.full((n,), self.table.offset(key) + key.steps // 2, device=self.device)
        labels, keys = labels.to(self.device), keys.to(self.device)
        x = gaussian_noise(keys, 0, self.shape)
        w = torch.full((n, 1, 1, 1), float(settings.guidance), device=self.device)
        clip = torch.full((n, 1, 1, 1), settings.clip_x0, device=self.device)
        threshold = torch.full((n, 1, 1, 1), float(settings.threshold), device=self.device)
        args = (x, x, pos, labels, keys, w, clip, threshold)
        if self.graphs is not None:
            return lambda: self.graphs(*args)
        bounded = settings.clip_x0 or settings.threshold > 0
        return torch.no_grad()(lambda: self.denoise(*args, guided=n if settings.guidance else 0, bounded=bounded))

    def fail_active(self, error: BaseException) -> None:
        """End every request with rows in the batch with `error` (a step failed)."""
        for request in {row.request for row in self._rows}:
            self._finish(request, error=error)
        self._rebuild([], [])

    # -- membership --------------------------------------------------------------------------------------

    def _admit(self) -> None:
        """Drop cancelled requests' rows; fill free slots. Step admission: requests with the fewest rows
        admitted so far first (a new request before one that is streaming through the batch), then by
        arrival, each taking what it needs of what is free; so small requests run whole and at once, and
        a big one takes what the others leave. Request admission: only into an empty batch, by arrival."""
        for request in [r for r in self._waiting if r.cancelled]:
            self._waiting.remove(request)
            self._finish(request, error=None)
        keep = [k for k, row in enumerate(self._rows) if not row.request.cancelled]
        for request in {row.request for row in self._rows if row.request.cancelled}:
            self._finish(request, error=None)
        new: list[_Row] = []
        compacted = False
        free = self.max_batch - len(keep)
        if self.admission == "request" and keep:
            free = 0
        if free > 0 and self.admission == "step":
            self._waiting = collections.deque(sorted(self._waiting, key=lambda r: (r.admitted, r.sequence)))
        for request in list(self._waiting):
            if request.n == 0:
                self._waiting.remove(request)
                self._finish(request)
                continue
            if free == 0:
                break
            key = self.table.key(request.settings)
            if not self.table.fits(key):
                self.table.keep_only({self._rows[k].key for k in keep} | {row.key for row in new})
                compacted = True
                if not self.table.fits(key):  # every entry is in use: wait for rows to leave
                    break
            self.table.offset(key)
            take = min(free, request.n - request.admitted)
            new += [_Row(request, request.admitted + j, key, request.num_steps) for j in range(take)]
            request.admitted += take
            free -= take
            if request.admitted == request.n:
                self._waiting.remove(request)
        if new or compacted or len(keep) != len(self._rows):
            self._rebuild(keep, new)

    def _retire(self) -> None:
        done = [k for k, row in enumerate(self._rows) if row.remaining == 0]
        if not done:
            return
        index = torch.tensor(done, device=self.device)
        x = self._state["x"][index]
        for j, row in enumerate(self._rows_at(done)):
            request = row.request
            if request.images is None:
                request.images = torch.empty(request.n, *self.shape, device=self.device)
            request.images[row.image] = x[j]
            request.finished += 1
            if request.on_image is not None:
                request.on_image(request, row.image)
            if request.finished == request.n:
                self._finish(request)
        self._rebuild([k for k, row in enumerate(self._rows) if row.remaining > 0], [])

    def _rows_at(self, indices: list[int]) -> list[_Row]:
        return [self._rows[k] for k in indices]

    def _finish(self, request: Request, error: BaseException | None = None) -> None:
        if request.done:
            return
        request.error = error
        if error is None and request.images is not None and not torch.isfinite(request.images).all():
            request.error = NonFiniteImages(
                "the model produced NaN or infinite values: its weights or the sampling settings are broken")
        request._done.set()
        if request.on_done is not None:
            request.on_done(request)

    def _rebuild(self, keep: list[int], new: list[_Row]) -> None:
        """The row tensors for rows `keep` (indices of the current rows) then `new`, guided rows first."""
        rows = self._rows_at(keep) + new
        order = sorted(range(len(rows)), key=lambda k: rows[k].request.settings.guidance == 0)
        self._rows = [rows[k] for k in order]
        if not self._rows:
            self._state = {}
            return
        device, old = self.device, self._state
        parts = {}
        if keep:
            index = torch.tensor(keep, device=device)
            parts = {name: old[name][index] for name in ("x", "x0")}
        if new:
            keys = torch.stack([row.request.keys[row.image] for row in new]).to(device)
            x_T = gaussian_noise(keys, INITIAL_STREAM, self.shape)
            for k, row in enumerate(new):
                if row.request.x_T is not None:
                    x_T[k] = row.request.x_T[row.image].to(device, torch.float32)
            parts = {"x": torch.cat([parts["x"], x_T]) if keep else x_T,
                     "x0": torch.cat([parts["x0"], torch.zeros_like(x_T)]) if keep else torch.zeros_like(x_T)}
        permutation = torch.tensor(order, device=device)
        s = {name: parts[name][permutation] for name in ("x", "x0")}
        # Per-row values the host knows: rebuilt from the rows (no device read).
        s["pos"] = torch.tensor([self.table.offsets[row.key] + row.remaining - 1 for row in self._rows], device=device)
        s["labels"] = torch.stack([row.request.labels[row.image] for row in self._rows]).to(device, torch.int64)
        s["keys"] = torch.stack([row.request.keys[row.image] for row in self._rows]).to(device, torch.int64)
        s["w"] = torch.tensor([float(row.request.settings.guidance) for row in self._rows],
                              device=device).view(-1, 1, 1, 1)
        clips = [row.request.settings.clip_x0 for row in self._rows]
        thresholds = [float(row.request.settings.threshold) for row in self._rows]
        s["clip"] = torch.tensor(clips, device=device).view(-1, 1, 1, 1)
        s["threshold"] = torch.tensor(thresholds, device=device).view(-1, 1, 1, 1)
        s["bounded"] = any(clips) or any(p > 0 for p in thresholds)
        s["guided"] = sum(row.request.settings.guidance != 0 for row in self._rows)
        self._state = s
