"""Timing for benchmarks on one device: windows of steps synchronised at their edges only, and the matmul peak.

A window's steps run as in training, the host free to run ahead of the device; the device is waited for only at a
window's edge, so a window's wall time is its steps' time. Throughput is the median over windows.
"""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import pytorch_lightning as pl
import torch


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on ``device`` (CUDA only; elsewhere nothing to wait for)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rates(marks: list[float], window: int, batch: int) -> dict:
    """img/s of each window between consecutive ``marks`` (seconds), their median and the overall mean."""
    per_window = [window * batch / (b - a) for a, b in zip(marks, marks[1:])]
    if not per_window:
        return {"img_s": None, "windows": []}
    mean = (len(marks) - 1) * window * batch / (marks[-1] - marks[0])
    return {"img_s": statistics.median(per_window), "img_s_mean": mean, "windows": per_window}


def time_steps(step: Callable[[], None], device: torch.device, warmup: int, steps: int, window: int,
               batch: int) -> dict:
    """``step()`` ``warmup`` times (the first timed alone: compilation), then ``steps`` timed in windows."""
    start = time.perf_counter()
    step()
    synchronize(device)
    first = time.perf_counter() - start
    for _ in range(warmup - 1):
        step()
    synchronize(device)
    marks = [time.perf_counter()]
    for i in range(steps):
        step()
        if (i + 1) % window == 0:
            synchronize(device)
            marks.append(time.perf_counter())
    return {**rates(marks, window, batch), "first_step_s": first}


class StepTimer(pl.Callback):
    """Marks the wall clock (synchronised) after step ``warmup`` and every ``window`` steps after it (up to ``steps``
    timed steps, when given), and times the first step (compilation included): the full loop's windows, measured
    inside ``trainer.fit``."""

    def __init__(self, device: torch.device, warmup: int, window: int, batch: int, steps: int | None = None):
        self.device, self.warmup, self.window, self.batch = device, max(int(warmup), 1), int(window), int(batch)
        self.steps = steps
        self.marks: list[float] = []
        self.start = self.first_step = None

    def on_train_start(self, trainer, pl_module) -> None:
        self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        done = batch_idx + 1
        if done == 1:
            synchronize(self.device)
            self.first_step = time.perf_counter() - self.start
        timed = done - self.warmup
        if timed >= 0 and timed % self.window == 0 and (self.steps is None or timed <= self.steps):
            synchronize(self.device)
            self.marks.append(time.perf_counter())

    def result(self) -> dict:
        """The timed windows' img/s (as :func:`rates` gives them) and the first step's seconds."""
        return {**rates(self.marks, self.window, self.batch), "first_step_s": self.first_step}


def matmul_peak(device: torch.device, n: int = 8192, repeats: int = 20) -> float:
    """FLOP/s of an ``n`` x ``n`` bf16 matrix product on ``device`` (median of ``repeats``, device events)."""
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    return 2 * n ** 3 / statistics.median(times)
