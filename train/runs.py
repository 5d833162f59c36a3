"""Run folders and their registry: how tasks hand artifacts to each other.

A run is ``checkpoints/<run>/``; each task writes into ``<run>/<task>/`` and records its
artifacts (path, sha256) and metrics in ``<run>/registry.json``.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from train.errors import RunError
from train.utils.distributed import is_rank_zero, launched_processes
from train.utils.files import atomic_write_json, sha256_file

log = logging.getLogger(__name__)
REGISTRY = "registry.json"
RUN_ENV = "ROADWORK_RUN_DIR"  # rank 0's new run folder, inherited by the ranks Lightning's DDP launcher starts
SUMMARY = "summary.json"


def _now() -> str:
    return dt.datetime.now().isoformat(timespec="seconds")


class Run:
    """One run folder and its registry."""

    def __init__(self, path: Path):
        self.path = Path(path).resolve()
        self.registry_path = self.path / REGISTRY
        if not self.registry_path.exists():
            raise RunError(f"{self.path} is not a run folder: it has no {REGISTRY}")

    # --- creation -------------------------------------------------------------------------
    @classmethod
    def create(cls, checkpoints_dir: str | Path, name: str) -> "Run":
        """Make a new run folder ``<checkpoints_dir>/<name>-<timestamp>`` (suffixed if taken)."""
        root = Path(checkpoints_dir)
        root.mkdir(parents=True, exist_ok=True)
        stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        for attempt in range(1000):
            path = root / (f"{name}-{stamp}" + (f"-{attempt}" if attempt else ""))
            try:
                path.mkdir()
            except FileExistsError:
                continue
            atomic_write_json(path / REGISTRY, {"run": path.name, "created": _now(), "tasks": {}})
            return cls(path)
        raise RunError(f"could not create a run folder under {root}")

    @classmethod
    def open(cls, path: str | Path) -> "Run":
        """The existing run folder ``path`` (a ``RunError`` when it does not exist or has no registry)."""
        path = Path(path)
        if not path.is_dir():
            raise RunError(f"run_dir={path} does not exist")
        return cls(path)

    @classmethod
    def for_process(cls, run_dir: str | Path | None, checkpoints_dir: str | Path, name: str) -> "Run":
        """The run this process works in: ``run_dir``, or a new one that rank 0 makes.

        The ranks Lightning's DDP launcher starts re-run the command line: they find rank 0's new folder in
        ``ROADWORK_RUN_DIR``, which rank 0 exports before its first Trainer starts them. Processes started by
        torchrun or srun (or on another node) cannot learn it, so there every rank needs the same ``run_dir``.
        """
        if run_dir:
            return cls.open(run_dir)
        inherited = os.environ.get(RUN_ENV)
        if not is_rank_zero() and inherited:
            return cls.open(inherited)
        if not is_rank_zero() or (launched_processes() > 1 and not inherited):
            raise RunError("several processes started by torchrun / srun (or on several nodes) must share one run: "
                           "pass run_dir=PATH of an existing run to every rank (make one first, e.g. "
                           "`python -m train task=data run_name=NAME`)")
        run = cls.create(checkpoints_dir, name)
        os.environ[RUN_ENV] = str(run.path)
        return run

    # --- registry -------------------------------------------------------------------------
    def read(self) -> dict:
        """The registry (``registry.json``) as a dict."""
        return json.loads(self.registry_path.read_text())

    def task_dir(self, task: str) -> Path:
        """``<run>/<task>/``, created if missing."""
        d = self.path / task
        d.mkdir(parents=True, exist_ok=True)
        return d

    def is_complete(self, task: str) -> bool:
        """Whether the registry marks ``task`` complete."""
        return self.read()["tasks"].get(task, {}).get("status") == "complete"

    def record(self, task: str, artifacts: dict[str, Path] | None = None,
               metrics: dict[str, Any] | None = None, **info: Any) -> None:
        """Mark ``task`` complete with its artifacts (hashed) and metrics (rank 0 alone: one registry)."""
        if not is_rank_zero():
            return
        reg = self.read()
        reg["tasks"][task] = {
            "status": "complete",
            "finished": _now(),
            "artifacts": {k: {"path": str(Path(p).resolve().relative_to(self.path)), "sha256": sha256_file(Path(p))}
                          for k, p in (artifacts or {}).items()},
            "metrics": metrics or {},
            **info,
        }
        atomic_write_json(self.registry_path, reg)
        self.write_summary()

    def artifact(self, task: str, name: str, verify: bool = True) -> Path:
        """Path of a recorded artifact; a clear error if the task or file is missing or altered."""
        entry = self.read()["tasks"].get(task)
        if not entry or entry.get("status") != "complete":
            raise RunError(f"run {self.path.name} has no completed '{task}' stage; "
                           f"run `python -m train task={task} run_dir={self.path}` first")
        if name not in entry["artifacts"]:
            raise RunError(f"stage '{task}' of run {self.path.name} recorded no artifact '{name}' "
                           f"(it has: {sorted(entry['artifacts'])})")
        record = entry["artifacts"][name]
        path = self.path / record["path"]
        if not path.exists():
            raise RunError(f"artifact '{task}/{name}' is missing: {path}")
        if verify and sha256_file(path) != record["sha256"]:
            raise RunError(f"artifact '{task}/{name}' changed since it was recorded (sha256 mismatch): {path}")
        return path

    def metrics(self, task: str) -> dict:
        """The metrics ``task`` recorded (empty when it recorded none)."""
        return self.read()["tasks"].get(task, {}).get("metrics", {})

    def write_summary(self) -> Path:
        """A compact, human-facing view of the registry: each task's metrics."""
        reg = self.read()
        summary = {"run": reg["run"], "tasks": {t: e.get("metrics", {}) for t, e in reg["tasks"].items()}}
        atomic_write_json(self.path / SUMMARY, summary)
        return self.path / SUMMARY


def fingerprint(obj: Any, length: int = 16) -> str:
    """A short stable hash of a JSON-able description (what produced a cache file or a feature column)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:length]


def cached_files(folder: Path, pattern: str) -> Iterator[tuple[Path, dict]]:
    """(path, fingerprint) of each file of ``folder`` matching ``pattern`` that :func:`write_cached` wrote: for a
    reader that looks for what it needs among caches made with other settings."""
    from safetensors import safe_open

    for path in sorted(Path(folder).glob(pattern)):
        with safe_open(str(path), "pt") as f:
            found = json.loads((f.metadata() or {}).get("fingerprint", "null"))
        if isinstance(found, dict):
            yield path, found


def read_cached(path: Path, fingerprint: dict) -> dict | None:
    """The tensors :func:`write_cached` saved at ``path`` under the same ``fingerprint``; None if absent or stale."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if path.is_file():
        with safe_open(str(path), "pt") as f:
            if (f.metadata() or {}).get("fingerprint") == json.dumps(fingerprint, sort_keys=True, default=str):
                log.info("reusing %s", path.name)
                return load_file(str(path))
    return None


def write_cached(path: Path, fingerprint: dict, tensors: dict) -> dict:
    """Save ``tensors`` to ``path`` (safetensors, atomically) with what they depend on (``fingerprint``)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp),
              metadata={"fingerprint": json.dumps(fingerprint, sort_keys=True, default=str)})
    tmp.replace(path)
    return tensors


def cached_tensors(path: Path, fingerprint: dict, make) -> dict:
    """``make()``'s tensors, saved to ``path`` once; a rerun whose ``fingerprint`` (what the tensors depend on) is
    the same reads them back instead of recomputing."""
    cached = read_cached(path, fingerprint)
    return cached if cached is not None else write_cached(path, fingerprint, make())
