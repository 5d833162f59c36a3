"""Several processes (DDP / DeepSpeed, one per device): which one this is, and how the others wait for rank 0.

Lightning's DDP launcher starts the other ranks of one host when the first Trainer runs, by re-running the command
line; torchrun and srun start them all at once. Either way every process runs ``python -m train``; these helpers
let the run folder, the log and the results stay rank 0's.
"""
from __future__ import annotations

import os
import time
from collections.abc import Callable

# torch and Lightning are imported where used: train.runs (and the bundle reader with it) stays light


def is_rank_zero() -> bool:
    """Whether this is the launch's first process: Lightning's rank (read from the launcher's environment until a
    Trainer sets it), on the first node."""
    from pytorch_lightning.utilities import rank_zero_only

    return rank_zero_only.rank == 0 and int(os.environ.get("NODE_RANK", 0)) == 0


def launched_processes() -> int:
    """How many processes an outside launcher started (torchrun: ``WORLD_SIZE``, srun: ``SLURM_NTASKS``); 1 when
    Lightning's own launcher will start the others from this one."""
    return int(os.environ.get("WORLD_SIZE") or os.environ.get("SLURM_NTASKS") or 1)


def _process_group():
    """``torch.distributed`` when a Trainer made a process group, else None."""
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def world_size() -> int:
    """The number of processes: the process group's size once a Trainer made one, else what the launcher says."""
    dist = _process_group()
    return dist.get_world_size() if dist else launched_processes()


def wait_for_rank_zero(done: Callable[[], bool], poll_s: float = 1.0) -> None:
    """Meet rank 0 after it ran a step alone: a barrier once a Trainer made a process group; before that (torchrun,
    srun) the other ranks poll ``done()`` (e.g. "the registry says the stage is complete")."""
    if dist := _process_group():
        dist.barrier()
        return
    while not is_rank_zero() and not done():
        time.sleep(poll_s)


def leave_process_group() -> None:
    """End this process's part in the process group a Trainer left behind, once no step needs the other ranks:
    what rank 0 then runs alone must not wait for them (torchmetrics, e.g., syncs over any live group)."""
    if dist := _process_group():
        dist.destroy_process_group()
