"""``StepProfiler``: torch.profiler over a few training steps, its tables written to a text file.

    python -m train task=stage1 ... +callbacks.profile={_target_:train.bench.profile.StepProfiler,name:zero2}

Prints wall ms per step, the GPU's busy ms per step (kernel self time) and kernel launches per step: a step whose wall
time is well above its GPU time is host-bound (how ZeRO-2's per-gradient work was found, README "Performance").
"""
from __future__ import annotations

import os
import time

import pytorch_lightning as pl
import torch
from torch.profiler import ProfilerActivity, profile


class StepProfiler(pl.Callback):
    """Profiles training steps ``[start, start + steps)`` on rank 0; writes ``<out_dir>/profile-<name>.txt``
    (``out_dir``: ``$OUT`` when set, else the working directory)."""

    def __init__(self, name: str, start: int = 30, steps: int = 6, out_dir: str | None = None):
        self.name, self.start, self.steps = name, start, steps
        self.out_dir = out_dir or os.environ.get("OUT", ".")
        self.profiler, self.t0 = None, 0.0

    def _sync(self) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == self.start and trainer.global_rank == 0:
            self._sync()
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
            self.profiler = profile(activities=activities)
            self.profiler.__enter__()
            self.t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.profiler is None or batch_idx != self.start + self.steps - 1:
            return
        self._sync()
        wall_ms = 1e3 * (time.perf_counter() - self.t0) / self.steps
        self.profiler.__exit__(None, None, None)
        averages = self.profiler.key_averages()
        kernels = [e for e in self.profiler.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        gpu_ms = sum(e.self_device_time_total for e in averages) / 1e3 / self.steps
        line = (f"{self.name}: wall {wall_ms:.1f} ms/step; GPU busy {gpu_ms:.1f} ms/step; "
                f"{len(kernels) / self.steps:.0f} kernels/step")
        path = os.path.join(self.out_dir, f"profile-{self.name}.txt")
        with open(path, "w") as f:
            f.write(line + "\n\n")
            for key in ("self_device_time_total", "self_cpu_time_total"):
                f.write(averages.table(sort_by=key, row_limit=35, max_name_column_width=70) + "\n\n")
        print(f"PROFILE {line} ({path})", flush=True)
        self.profiler = None
