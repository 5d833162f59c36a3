"""torch.profiler over a few training steps: :class:`StepProfiler` in a Lightning fit, :func:`profile_steps` around
any step function (the bench's raw step); both write the same report.

    python -m train task=stage1 ... +callbacks.profile={_target_:train.bench.profile.StepProfiler,name:zero2}

The report (``<out_dir>/profile-<name>.txt``, and the dict :func:`report` returns): wall ms per step, the GPU's
busy ms per step (its kernels' and copies' durations summed; ``gpu_union_ms``: the time at least one of them ran),
kernel launches, host-device copies and host waits (stream, device and event synchronisations) per step, then the op
tables by device and by CPU time. A step whose wall time is well above its GPU time is host-bound (how ZeRO-2's
per-gradient work was found, docs/performance.md). ``trace`` also writes the Chrome trace, gzipped.
"""
from __future__ import annotations

import gzip
import os
import shutil
import time
from collections.abc import Callable

import pytorch_lightning as pl
import torch
from torch.profiler import ProfilerActivity, profile

SYNCS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")
TOP_OPS = 40  # per table, in the returned dict


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def start_profile() -> profile:
    """A running profiler (CPU, and CUDA when there is a GPU), the device idle first."""
    _sync()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    prof = profile(activities=activities)
    prof.__enter__()
    return prof


def _union_ms(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of ``(start, end)`` intervals (microseconds in, milliseconds out)."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b > end:
            total += b - max(a, end)
            end = b
    return total / 1e3


def report(prof: profile, name: str, steps: int, wall_s: float, out_dir: str | None = None,
           trace: bool = False) -> dict:
    """Stops ``prof`` (started by :func:`start_profile`, ``steps`` steps and ``wall_s`` seconds ago), writes
    ``<out_dir>/profile-<name>.txt`` (``out_dir``: ``$OUT`` when set, else the working directory) and returns the
    per-step summary with the top ops."""
    _sync()
    prof.__exit__(None, None, None)
    out_dir = out_dir or os.environ.get("OUT", ".")
    averages = prof.key_averages()
    device = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
              and not getattr(e, "is_user_annotation", False)]  # kernels and copies, not record_function ranges
    calls = {e.key: e.count for e in averages}
    summary = {"wall_ms": 1e3 * wall_s / steps,
               "gpu_ms": sum(e.time_range.elapsed_us() for e in device) / 1e3 / steps,
               "gpu_union_ms": _union_ms([(e.time_range.start, e.time_range.end) for e in device]) / steps,
               "kernels": sum(1 for e in device if "memcpy" not in e.name.lower() and "memset" not in
                              e.name.lower()) / steps,
               "copies": sum(1 for e in device if "memcpy" in e.name.lower()) / steps,
               "syncs": sum(calls.get(s, 0) for s in SYNCS) / steps}
    line = (f"{name}: wall {summary['wall_ms']:.1f} ms/step; GPU busy {summary['gpu_ms']:.1f} ms/step "
            f"({summary['gpu_union_ms']:.1f} ms any stream); {summary['kernels']:.0f} kernels/step; "
            f"{summary['copies']:.1f} copies/step; {summary['syncs']:.1f} host syncs/step")
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"profile-{name}.txt")
    with open(path, "w") as f:
        f.write(line + "\n\n")
        for key in ("self_device_time_total", "self_cpu_time_total"):
            f.write(averages.table(sort_by=key, row_limit=35, max_name_column_width=70) + "\n\n")
    if trace:
        plain = os.path.join(out_dir, f"trace-{name}.json")
        prof.export_chrome_trace(plain)
        with open(plain, "rb") as src, gzip.open(plain + ".gz", "wb") as dst:
            shutil.copyfileobj(src, dst)
        os.remove(plain)
    for key, field in (("top_gpu", "self_device_time_total"), ("top_cpu", "self_cpu_time_total")):
        ranked = sorted(averages, key=lambda e: getattr(e, field), reverse=True)[:TOP_OPS]
        summary[key] = {e.key: {"calls": e.count / steps, "gpu_ms": e.self_device_time_total / 1e3 / steps,
                                "cpu_ms": e.self_cpu_time_total / 1e3 / steps} for e in ranked}
    print(f"PROFILE {line} ({path})", flush=True)
    return summary


def profile_steps(step: Callable[[], None], steps: int, name: str, out_dir: str | None = None,
                  trace: bool = False) -> dict:
    """``step()`` ``steps`` times under the profiler; :func:`report`'s summary."""
    prof = start_profile()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    _sync()
    return report(prof, name, steps, time.perf_counter() - t0, out_dir, trace)


class StepProfiler(pl.Callback):
    """Profiles training steps ``[start, start + steps)`` on rank 0 and writes :func:`report`'s file; the summary
    stays in ``self.summary``."""

    def __init__(self, name: str, start: int = 30, steps: int = 6, out_dir: str | None = None, trace: bool = False):
        self.name, self.start, self.steps, self.out_dir, self.trace = name, start, steps, out_dir, trace
        self.profiler, self.t0, self.summary = None, 0.0, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == self.start and trainer.global_rank == 0:
            self.profiler = start_profile()
            self.t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.profiler is None or batch_idx != self.start + self.steps - 1:
            return
        _sync()
        wall = time.perf_counter() - self.t0
        self.summary = report(self.profiler, self.name, self.steps, wall, self.out_dir, self.trace)
        self.profiler = None
