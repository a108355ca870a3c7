"""The sampling engine: one step-level batcher that every sampling path drives.

An `Engine` owns a set of slots, the rows of the U-Net batch. Each slot holds one image of one
request (`Request`): its x_t, its position in its own sampler plan, its class label, its
guidance w, its noise key and DPM-Solver++(2M)'s previous x0_hat. One engine step (`Engine.step`):

    admit      fill free slots from the waiting requests, a max-min fair share each (fair_shares):
               a 1-image request beside a big one takes its slot at once, and a big one in a
               stream of small ones is never passed over by a request that came after it
    eps        ONE model call on the conditional rows plus the unconditional rows of those with
               w != 0 (rows are kept guided-first, so those are x[:g]); per row
               eps = (1 + w) eps(x, c) - w eps(x, null)  (Ho & Salimans 2022, Eq. 6)
    update     x <- c_x0 x0_hat + c_xt x + c_eps eps + c_prev x0_hat_prev + sigma z, each row with
               the coefficients of its own plan and step, gathered from one table on the device
               (engine.sampler.update); z is the row's own noise of its own step (engine.noise)
    retire     rows past their last step leave at once; a request is done with its last image

So rows at different steps of different samplers, step counts, classes and guidance scales share
a U-Net call, and an image is the same whatever else shares its batch (each row's maths reads
only that row; the convolutions may sum in another order for another batch size, last bits
only). Offline sampling (`ddpm-engine sample`, interpolation, training's grids and FID, the
benchmarks) is every request submitted at once and `run()` until idle; `ddpm-engine serve`
submits from other threads and runs `serve_forever` on one engine thread.

A step reads nothing from the device on the host: the host keeps each row's step count and
rebuilds the row tensors (a `Batch`, built by `batch_of`) only when rows join or leave. A request is
checked whole on submit (its settings against engine.settings.FIELDS and the model, its labels, keys
and x_T), so nothing that reaches a step can make it raise; if a step raises anyway, the requests
whose rows make it raise alone fail, and the others run on (`_isolate`). With `graphs` (the fused backend on
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
from engine.diffusion import alpha_bar
from engine.errors import ConfigError, UserError
from engine.graphs import StepGraphs, default_buckets
from engine.noise import INITIAL_STREAM, gaussian_noise
from engine.sampler import SamplerPlan, update
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
        self.timesteps: dict[SampleSettings, list[int]] = {}  # each plan's t_i on the host
        ab = alpha_bar(diffusion)
        self.sigmas = ((1 - ab) / ab).sqrt().tolist()  # sigma_t of every t, on the host: guidance intervals
        self.used = 0

    def plan_key(self, settings: SampleSettings) -> SampleSettings:
        """What a plan depends on: the settings without guidance and x0_hat's bounds, steps resolved."""
        return replace(settings, guidance=0.0, clip_x0=False, threshold=0.0, guidance_interval=None,
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
            self.timesteps[key] = plan.timesteps.tolist()
            self.used += plan.num_steps
        return self.offsets[key]

    def guided(self, row: _Row) -> bool:
        """Whether `row` is guided at its next step (its w != 0, and that step's sigma_t in its interval)."""
        return row.request.settings.guided_at(self.sigmas[self.timesteps[row.plan][row.remaining - 1]])

    def keep_only(self, keys: set[SampleSettings]) -> None:
        """Drop every plan but `keys`, rewriting the table in place (offsets change)."""
        self.offsets, self.timesteps, self.used = {}, {}, 0
        for key in keys:
            self.offset(key)


@dataclass
class _Row:
    request: Request
    image: int            # its index in the request
    plan: SampleSettings  # its plan's key in the table (PlanTable.plan_key)
    remaining: int        # steps left; the next step is i = remaining - 1


@dataclass
class Batch:
    """The rows' tensors, one entry per row in the engine's row order (guided rows first): what a step
    reads (`inputs`), and what it carries to the next (x, x0, pos)."""

    x: torch.Tensor          # x_t, float32 (n, C, H, W)
    x0: torch.Tensor         # the previous step's x0_hat (DPM-Solver++(2M)); zeros for a new row
    pos: torch.Tensor        # int64 (n,): the row's entry in the plan table, its plan's offset + its step i
    labels: torch.Tensor     # int64 (n,)
    keys: torch.Tensor       # int64 (n,): the row's noise key (engine.noise)
    w: torch.Tensor          # float32 (n, 1, 1, 1): guidance scale
    clip: torch.Tensor       # bool (n, 1, 1, 1): clip x0_hat
    threshold: torch.Tensor  # float32 (n, 1, 1, 1): dynamic thresholding's percentile, 0 off
    guided: int              # rows [0, guided) have w != 0
    bounded: bool            # some row clips or thresholds x0_hat

    def inputs(self) -> tuple[torch.Tensor, ...]:
        return self.x, self.x0, self.pos, self.labels, self.keys, self.w, self.clip, self.threshold


def batch_of(rows: list[_Row], x: torch.Tensor, x0: torch.Tensor, table: PlanTable, device: torch.device) -> Batch:
    """The Batch of `rows` (in that order, guided rows first) whose x_t and previous x0_hat are x and x0:
    the per-row values the host knows are built from the rows, with no device read. A row guided at
    this step has its w; one not guided (w = 0, or this step outside its guidance interval) has w = 0."""
    settings = [row.request.settings for row in rows]
    guided = [table.guided(row) for row in rows]

    def column(values: list, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.tensor(values, dtype=dtype, device=device).view(-1, 1, 1, 1)

    return Batch(
        x, x0, pos=torch.tensor([table.offsets[row.plan] + row.remaining - 1 for row in rows], device=device),
        labels=torch.stack([row.request.labels[row.image] for row in rows]).to(device, torch.int64),
        keys=torch.stack([row.request.keys[row.image] for row in rows]).to(device, torch.int64),
        w=column([float(s.guidance) if g else 0.0 for s, g in zip(settings, guided)]),
        clip=column([s.clip_x0 for s in settings], torch.bool),
        threshold=column([float(s.threshold) for s in settings]), guided=sum(guided),
        bounded=any(s.clip_x0 or s.threshold > 0 for s in settings))


def fair_shares(needs: list[int], free: int) -> list[int]:
    """A max-min fair split of `free` slots over requests that need `needs` more rows, in arrival order:
    each gets an equal share, one that needs less takes only what it needs and the rest is shared among
    the others, and slots that do not divide evenly go to the oldest. So a small request beside a big
    one takes what it needs at once, and a request is never passed over for a younger one: when it gets
    nothing, every slot went to requests that arrived before it."""
    shares = [0] * len(needs)
    unmet = [k for k, need in enumerate(needs) if need > 0]
    while free > 0 and unmet:
        share = free // len(unmet)
        if share == 0:
            for k in unmet[:free]:
                shares[k] += 1
            break
        for k in unmet:
            take = min(share, needs[k] - shares[k])
            shares[k] += take
            free -= take
        unmet = [k for k in unmet if shares[k] < needs[k]]
    return shares


class Engine:
    """The step-level batcher over one eps model; built by engine.backends.build_engine.

    max_batch: the most rows (images) in a step; the U-Net sees up to twice as many under
    guidance. admission: "step" (rows join at any step, a fair share each: fair_shares) or "request"
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
        self._waiting: list[Request] = []   # in arrival order
        self._rows: list[_Row] = []
        self._batch: Batch | None = None     # the rows' tensors; None when there are no rows
        self._guided: list[bool] = []        # which rows the Batch guides, in row order
        self._closed = False
        self._abort: BaseException | None = None  # set from another thread: fail everything at the next step
        self._arrivals = itertools.count()
        self.steps_run = 0
        self.on_step: Callable[[int, float], object] | None = None  # (rows, the step's host seconds): metrics

    # -- the client side (any thread) --------------------------------------------------------------------

    def submit(self, request: Request) -> Request:
        """Queue a request; it joins the batch at a coming step. Everything a step could trip on is
        checked here: its settings (engine.settings.FIELDS, steps <= T), labels, keys and x_T."""
        request.settings.check(self.diffusion.num_timesteps)
        request.num_steps = request.settings.plan(self.diffusion).num_steps
        labels, keys = request.labels, request.keys
        if not (isinstance(labels, torch.Tensor) and labels.dim() == 1 and not labels.is_floating_point()
                and not labels.is_complex() and labels.dtype != torch.bool):
            raise ConfigError("labels must be a 1-D integer tensor")
        if len(labels) and not (0 <= int(labels.min()) and int(labels.max()) <= self.null_class):
            raise ConfigError(f"labels must be in [0, {self.null_class}] (the null class is {self.null_class})")
        if not (isinstance(keys, torch.Tensor) and keys.shape == labels.shape and keys.dtype == torch.int64):
            raise ConfigError("keys must be an int64 tensor, one key per label (engine.noise.image_keys)")
        if request.x_T is not None and tuple(request.x_T.shape) != (request.n, *self.shape):
            raise ConfigError(f"x_T must have shape {(request.n, *self.shape)}")
        if request.x_T is not None and not torch.isfinite(request.x_T).all():
            raise ConfigError("x_T must be finite")
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

    def abort(self, error: BaseException) -> None:
        """End every request submitted so far with `error` at the engine's next step (from any thread):
        a server's drain past its grace period."""
        self._abort = error

    # -- the engine thread -------------------------------------------------------------------------------

    @torch.no_grad()
    def run(self) -> None:
        """Step until every submitted request is done (offline sampling)."""
        while self.step():
            pass

    @torch.no_grad()
    def serve_forever(self, stop: threading.Event, poll_s: float = 0.05) -> None:
        """Step while there is work; wait for requests when idle; return when `stop` is set and the
        submitted work is done. A step that fails fails only the requests that make it fail (`step`)."""
        while not (stop.is_set() and self.idle()):
            try:
                if self.step():
                    continue
            except Exception as error:  # past _isolate (a bug in the bookkeeping): fail what is in the batch
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
        """One engine step (admit, one U-Net call, update, retire); False when there was nothing to run.
        If the model call raises, the requests whose rows alone make it raise fail and leave, and the
        others take this step at the next call (`_isolate`)."""
        self._receive()
        if self._abort is not None:
            for request in self._waiting:
                self._finish(request, error=self._abort)
            self._waiting = []
            self.fail_active(self._abort)
        self._admit()
        if not self._rows:
            return False
        started = time.perf_counter()
        batch = self._batch
        try:
            x, x0 = self._denoise(batch)
        except Exception as error:
            self._isolate(error)
            return True
        batch.x, batch.x0, batch.pos = x, x0, batch.pos - 1
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
        if [self.table.guided(row) for row in self._rows] != self._guided:  # a row crossed its guidance interval
            self._rebuild(list(range(len(self._rows))), [])
        return True

    def _denoise(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        if self.graphs is not None:
            return self.graphs(*batch.inputs())
        return self.denoise(*batch.inputs(), guided=batch.guided, bounded=batch.bounded)

    def denoise(self, x: torch.Tensor, x0_prev: torch.Tensor, pos: torch.Tensor, labels: torch.Tensor,
                keys: torch.Tensor, w: torch.Tensor, clip: torch.Tensor, threshold: torch.Tensor,
                guided: int | None = None, bounded: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """The step of every row: x_{t_i} -> x_{t_{i-1}} and this step's x0_hat, row r at table entry
        pos[r] (the fields of a Batch). guided: rows [0, guided) have w != 0 (None: every row computes
        its unconditional half, as under CUDA graphs); bounded: whether any row clips or thresholds
        x0_hat (clip and threshold say which and how; False skips that work)."""
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
            return update(self.table.coefs, pos, x, eps, z, x0_prev)
        return update(self.table.coefs, pos, x, eps, z, x0_prev, clip, threshold)

    def fixed_step(self, settings: SampleSettings, labels: torch.Tensor, keys: torch.Tensor) -> Callable[[], object]:
        """A no-argument function running the step of these rows at the middle of `settings`' plan, again
        and again without advancing (what the benchmarks time): the denoise, or graph replay, `step` runs."""
        request = Request(settings, labels, keys)
        plan = self.table.plan_key(settings)
        self.table.offset(plan)
        rows = [_Row(request, j, plan, plan.steps // 2 + 1) for j in range(len(labels))]
        x = gaussian_noise(keys.to(self.device), 0, self.shape)
        batch = batch_of(rows, x, x, self.table, self.device)
        return torch.no_grad()(lambda: self._denoise(batch))

    def fail_active(self, error: BaseException) -> None:
        """End every request with rows in the batch with `error`."""
        for request in {row.request for row in self._rows}:
            self._finish(request, error=error)
        self._rebuild([], [])

    def check(self) -> None:
        """The invariants of the rows and their Batch, asserted (the tests call this after steps): at
        most max_batch rows, guided rows first, one tensor entry a row, each row at table entry
        offset + remaining - 1 of its own plan, every row's request unfinished."""
        rows, batch = self._rows, self._batch
        assert len(rows) <= self.max_batch, (len(rows), self.max_batch)
        guided = [self.table.guided(row) for row in rows]
        assert guided == sorted(guided, reverse=True) and guided == self._guided, "guided rows come first"
        if not rows:
            assert batch is None
            return
        assert all(len(t) == len(rows) for t in batch.inputs()) and batch.guided == sum(guided)
        assert batch.pos.tolist() == [self.table.offsets[row.plan] + row.remaining - 1 for row in rows]
        assert batch.labels.tolist() == [int(row.request.labels[row.image]) for row in rows]
        assert all(0 < row.remaining <= row.request.num_steps for row in rows)
        for request in {row.request for row in rows}:
            assert not request.done and request.finished <= request.admitted <= request.n

    # -- membership --------------------------------------------------------------------------------------

    def _receive(self) -> None:
        """Move what was submitted into the waiting list, in arrival order."""
        arrived = []
        while True:
            try:
                arrived.append(self._incoming.get_nowait())
            except queue.Empty:
                break
        if arrived:
            self._waiting = sorted(self._waiting + arrived, key=lambda r: r.sequence)

    def _admit(self) -> None:
        """Drop cancelled requests' rows, decide who takes the free slots (fair_shares; with request
        admission, whole requests into an empty batch by arrival), then place their rows."""
        keep = self._drop_cancelled()
        free = self.max_batch - len(keep)
        if self.admission == "request" and keep:
            free = 0
        needs = [request.n - request.admitted for request in self._waiting]
        if self.admission == "request":
            shares = [min(need, max(free - sum(needs[:k]), 0)) for k, need in enumerate(needs)]
        else:
            shares = fair_shares(needs, free)
        new, compacted = self._place(zip(self._waiting, shares), keep)
        self._waiting = [r for r in self._waiting if r.admitted < r.n and not r.done]
        if new or compacted or len(keep) != len(self._rows):
            self._rebuild(keep, new)

    def _drop_cancelled(self) -> list[int]:
        """End cancelled requests (waiting or running) and requests of no images; the rows to keep."""
        for request in self._waiting:
            if request.cancelled or request.n == 0:
                self._finish(request, error=None)
        self._waiting = [r for r in self._waiting if not r.done]
        for request in {row.request for row in self._rows if row.request.cancelled}:
            self._finish(request, error=None)
        return [k for k, row in enumerate(self._rows) if not row.request.cancelled]

    def _place(self, grants, keep: list[int]) -> tuple[list[_Row], bool]:
        """The new rows of each (request, share) granted, each request's plan in the table (compacted when
        full; a plan that still does not fit waits for rows to leave); and whether the table was compacted."""
        new: list[_Row] = []
        compacted = False
        for request, take in grants:
            if take == 0:
                continue
            plan = self.table.plan_key(request.settings)
            if not self.table.fits(plan):
                self.table.keep_only({self._rows[k].plan for k in keep} | {row.plan for row in new})
                compacted = True
                if not self.table.fits(plan):  # every entry is in use
                    break
            self.table.offset(plan)
            new += [_Row(request, request.admitted + j, plan, request.num_steps) for j in range(take)]
            request.admitted += take
        return new, compacted

    def _isolate(self, error: Exception) -> None:
        """The step raised `error`: run each request's rows alone (results discarded) and fail the requests
        whose rows raise by themselves; the others keep their rows and take the step at the next call. If
        no request's rows fail alone (the failure is not one request's: e.g. the device), all fail."""
        requests = list(dict.fromkeys(row.request for row in self._rows))
        failed = {}
        for request in requests if len(requests) > 1 else []:
            rows = [k for k, row in enumerate(self._rows) if row.request is request]
            index = torch.tensor(rows, device=self.device)
            alone = batch_of(self._rows_at(rows), self._batch.x[index], self._batch.x0[index], self.table, self.device)
            try:
                self.denoise(*alone.inputs(), guided=alone.guided, bounded=alone.bounded)
            except Exception as own:
                failed[request] = own
        if not failed:
            self.fail_active(error)
            return
        for request, own in failed.items():
            self._finish(request, error=own)
        self._rebuild([k for k, row in enumerate(self._rows) if row.request not in failed], [])

    def _retire(self) -> None:
        done = [k for k, row in enumerate(self._rows) if row.remaining == 0]
        if not done:
            return
        index = torch.tensor(done, device=self.device)
        x = self._batch.x[index]
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
        """The rows `keep` (indices of the current rows) then `new`, guided rows first, and their Batch:
        the kept rows' x_t and x0_hat carried over, the new rows' x_T drawn from their keys (or given)."""
        rows = self._rows_at(keep) + new
        guided = [self.table.guided(row) for row in rows]
        order = sorted(range(len(rows)), key=lambda k: not guided[k])
        self._rows = [rows[k] for k in order]
        self._guided = [guided[k] for k in order]
        if not self._rows:
            self._batch = None
            return
        x, x0 = [], []
        if keep:
            index = torch.tensor(keep, device=self.device)
            x.append(self._batch.x[index])
            x0.append(self._batch.x0[index])
        if new:
            keys = torch.stack([row.request.keys[row.image] for row in new]).to(self.device)
            x_T = gaussian_noise(keys, INITIAL_STREAM, self.shape)
            for k, row in enumerate(new):
                if row.request.x_T is not None:
                    x_T[k] = row.request.x_T[row.image].to(self.device, torch.float32)
            x.append(x_T)
            x0.append(torch.zeros_like(x_T))
        permutation = torch.tensor(order, device=self.device)
        self._batch = batch_of(self._rows, torch.cat(x)[permutation], torch.cat(x0)[permutation], self.table,
                               self.device)
