"""log.csv, the one writer of the run's log, and the progress bar: a row every few steps, with the
means since the row before."""

from __future__ import annotations

import csv
import time
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from engine.distributed import World
from engine.formats.checkpoint import atomic_write

LOG_COLUMNS = ("step", "epoch", "lr", "loss", "grad_norm", "ema_decay", "images_per_s", "fid")


def open_log(path: Path, start_step: int):
    """Open log.csv for appending, first dropping rows past the resumed step (written after
    the last checkpoint by a run that was then killed) and any half-written last line."""
    rows = []
    if start_step > 0 and path.is_file():
        with open(path, newline="") as f:
            for row in csv.reader(f):
                if len(row) == len(LOG_COLUMNS) - 1:
                    row.append("")  # a log written before the fid column
                if len(row) == len(LOG_COLUMNS) and row[0].isdigit() and int(row[0]) <= start_step:
                    rows.append(row)
    text = ",".join(LOG_COLUMNS) + "\n" + "".join(",".join(r) + "\n" for r in rows)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))
    return open(path, "a")


class Progress:
    """The rows of log.csv (written by rank 0) and the progress bar. The loss and gradient norm
    of each step are summed on the device, so a step needs no host sync; a row takes their means
    over the steps since the last row and over the processes."""

    def __init__(self, path: Path, start_step: int, total_steps: int, batch_size: int, procs: World,
                 device: torch.device, bar: bool):
        self.procs, self.batch_size = procs, batch_size
        self.file = open_log(path, start_step) if procs.is_main else None
        self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True,
                        disable=not (bar and procs.is_main))
        self.sums = torch.zeros(2, device=device)
        self.postfix: dict[str, str] = {}
        self.last_step, self.last_time = start_step, time.perf_counter()

    def step_done(self, loss: torch.Tensor, grad_norm: torch.Tensor) -> None:
        self.sums += torch.stack([loss, grad_norm])
        self.bar.update(1)

    def means(self, done: int) -> tuple[float, float, float]:
        """(loss, gradient norm, images/s) since the last row; every rank calls it (an all-reduce)."""
        if self.procs.size > 1:
            dist.all_reduce(self.sums)
            self.sums /= self.procs.size
        loss, grad_norm = (self.sums / (done - self.last_step)).tolist()
        rate = (done - self.last_step) * self.batch_size / (time.perf_counter() - self.last_time)
        return loss, grad_norm, rate

    def write(self, done: int, epoch: float, lr: float, loss: float, grad_norm: float, ema_decay: float,
              images_per_s: float, fid: str) -> None:
        """One row (fid: "" when not evaluated), then the bar; the next row's means start here."""
        row = (done, f"{epoch:.4f}", f"{lr:.6g}", f"{loss:.6f}", f"{grad_norm:.4f}", f"{ema_decay:.6f}",
               f"{images_per_s:.1f}", fid)
        if self.file is not None:
            self.file.write(",".join(map(str, row)) + "\n")
            self.file.flush()
        if fid:
            self.postfix["fid"] = fid
        self.postfix.update(loss=f"{loss:.4f}", lr=f"{lr:.2e}", img_s=f"{images_per_s:.0f}")
        self.bar.set_postfix(self.postfix)
        self.sums.zero_()
        self.last_step, self.last_time = done, time.perf_counter()  # the next rate leaves an FID evaluation out

    def close(self) -> None:
        self.bar.close()
        if self.file is not None:
            self.file.close()
