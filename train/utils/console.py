"""What the user sees: logging through rich, the config tree, metric tables, progress of long steps."""
from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.logging import RichHandler
from rich.syntax import Syntax
from rich.table import Table
from rich.tree import Tree

console = Console()
_FILE_HANDLER_ATTR = "_roadwork_file"
_ON_BAR = "_roadwork_on_bar"  # a log record the live bar already shows: the console skips it, train.log keeps it


def setup_logging(level: str = "INFO") -> None:
    """Rich console logging on the root logger (idempotent)."""
    root = logging.getLogger()
    if not any(isinstance(h, RichHandler) for h in root.handlers):
        handler = RichHandler(console=console, show_path=False, rich_tracebacks=False, markup=False)
        handler.addFilter(lambda record: not getattr(record, _ON_BAR, False))
        root.addHandler(handler)
    root.setLevel(level)
    for name, logger in logging.root.manager.loggerDict.items():  # Hydra's logging config disables
        if name.startswith("train") and isinstance(logger, logging.Logger):  # loggers imported before it
            logger.disabled = False
    for noisy in ("PIL", "matplotlib", "urllib3", "fsspec", "DeepSpeed", "onnxscript", "onnx_ir", "torch.onnx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def log_to_file(path: Path) -> None:
    """Also write the log to ``path`` (replacing an earlier file handler of ours)."""
    close_log_file()
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    setattr(handler, _FILE_HANDLER_ATTR, True)
    logging.getLogger().addHandler(handler)


def close_log_file() -> None:
    """Stop writing the log to the file :func:`log_to_file` named (a multirun's next job logs to its own run)."""
    root = logging.getLogger()
    for h in [h for h in root.handlers if getattr(h, _FILE_HANDLER_ATTR, False)]:
        root.removeHandler(h)
        h.close()


def print_config(cfg: DictConfig) -> None:
    """Print the resolved config as a rich tree, one branch per top-level key."""
    tree = Tree("config", guide_style="dim")
    for key, value in cfg.items():
        branch = tree.add(f"[bold]{key}")
        text = OmegaConf.to_yaml(value, resolve=True) if isinstance(value, DictConfig) else str(value)
        branch.add(Syntax(text.rstrip(), "yaml", theme="ansi_dark", background_color="default"))
    console.print(tree)


def save_config(cfg: DictConfig, path: Path) -> None:
    """The resolved config as YAML, so a run folder says exactly what produced it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, path, resolve=True)


def save_overrides(path: Path, task: str, overrides: Sequence[str] | None = None) -> None:
    """Append this command (UTC time, task, command-line overrides) to ``path``, the run's ``overrides.yaml``: a run
    continued with ``run_dir=`` keeps one entry per command. ``overrides`` defaults to Hydra's; without a Hydra
    runtime (a config from ``compose``) nothing is written."""
    import datetime as dt

    import yaml

    from train.utils.files import atomic_write_bytes

    if overrides is None:
        from hydra.core.hydra_config import HydraConfig

        if not HydraConfig.initialized():
            return
        overrides = HydraConfig.get().overrides.task
    path = Path(path)
    entries = (yaml.safe_load(path.read_text()) or []) if path.is_file() else []
    entries.append({"time": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "task": task,
                    "overrides": [str(o) for o in overrides]})
    atomic_write_bytes(path, yaml.safe_dump(entries, sort_keys=False).encode())  # a reader never sees half a file


def print_level_table(metrics: Mapping[str, float], title: str, split: str = "test",
                      columns: Sequence[str] | None = None) -> None:
    """One row per validator level (and their mean); MCC with its ``mcc_low``-``mcc_high`` interval.

    ``columns`` picks and orders the metrics shown (default: all of them).
    """
    from train.metrics import by_level  # torch: imported when a table is printed

    rows = by_level(metrics, split)
    order = ["mcc", "acc", "f1", "auroc", "reward"]
    names = sorted({n for r in rows.values() for n in r} - {"mcc_low", "mcc_high"},
                   key=lambda n: (order.index(n) if n in order else len(order), n))
    if columns is not None:
        names = [n for n in columns if n in names]
    table = Table(title=title)
    table.add_column("level")
    for n in names:
        table.add_column(n, justify="right")
    for level in sorted(rows, key=lambda r: r == "mean"):  # in the order given, the mean last
        row = rows[level]
        cells = [f"{row[n]:.4f}" if n in row else "" for n in names]
        if "mcc_low" in row and "mcc" in names:
            cells[names.index("mcc")] += f" [{row['mcc_low']:.3f}, {row['mcc_high']:.3f}]"
        table.add_row(level, *cells)
    console.print(table)


def cost_ratio(ratio: float) -> str:
    """A reference's cost over a cascade's (``ratio``) in words: ``4.14x fewer`` or, below 1, ``2.15x more``."""
    return f"{ratio:.2f}x fewer" if ratio >= 1 else f"{1 / ratio:.2f}x more"


# Progress of long steps (rendering, prepare, prediction passes, export, evaluate, replay). On a terminal: a rich bar
# styled as the training bar (count, elapsed • remaining, rate); the start and milestone lines go to train.log only.
# Elsewhere (CI, nohup): no redraws, plain lines through the ``train.progress`` logger: start, about every
# MILESTONE of the total (or every LOG_EVERY_S seconds) once QUIET_FOR_S seconds have passed since the last line,
# and done with the elapsed time. Rank 0 alone shows progress.
progress_log = logging.getLogger("train.progress")
MILESTONE = 0.25
LOG_EVERY_S = 60.0
QUIET_FOR_S = 5.0
T = TypeVar("T")
_bar = None  # the live rich Progress shared by nested steps (None when no bar is showing)


def _duration(seconds: float) -> str:
    """``4.2 s``, ``3 min 05 s``, ``1 h 02 min``."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, s = divmod(int(seconds), 60)
    return f"{minutes} min {s:02d} s" if minutes < 60 else f"{minutes // 60} h {minutes % 60:02d} min"


def _bar_columns() -> list:
    """The training bar's columns and theme (Lightning's RichProgressBar), the count and rate in this step's unit;
    a narrow terminal shortens the description and the bar, never wraps a column."""
    from pytorch_lightning.callbacks.progress.rich_progress import CustomTimeColumn, RichProgressBarTheme
    from rich.progress import BarColumn, MofNCompleteColumn, ProgressColumn, TextColumn
    from rich.table import Column
    from rich.text import Text

    theme = RichProgressBarTheme()

    class TimeColumn(CustomTimeColumn):
        """``0:00:05 • 0:00:12``: elapsed • remaining, as training shows them."""

        def get_table_column(self) -> Column:
            return Column(no_wrap=True)

    class RateColumn(ProgressColumn):
        """``12.34 img/s``: rich's measured speed in the step's unit."""

        def get_table_column(self) -> Column:
            return Column(no_wrap=True)

        def render(self, task) -> Text:
            return Text(f"{task.speed or 0:.2f} {task.fields['unit']}/s", style=theme.processing_speed)

    return [TextColumn("{task.description}", style="progress.description", markup=False,
                       table_column=Column(no_wrap=True, overflow="ellipsis", min_width=12)),
            BarColumn(bar_width=None, complete_style=theme.progress_bar, finished_style=theme.progress_bar_finished,
                      pulse_style=theme.progress_bar_pulse, table_column=Column(ratio=1, min_width=10, max_width=40)),
            MofNCompleteColumn(table_column=Column(no_wrap=True)), TimeColumn(style=theme.time), RateColumn()]


def _other_live_display() -> bool:
    """Whether a live display not ours (Lightning's training bar, on rich's global console) is showing."""
    from rich import get_console

    other = get_console()
    return other is not console and bool(getattr(other, "_live_stack", None) or getattr(other, "_live", None))


class Step:
    """One long step's progress: :meth:`advance` by the units done (``progress`` / ``track`` make it)."""

    def __init__(self, description: str, total: int | None, unit: str, shown: bool):
        self.description, self.total, self.unit, self.shown = description, total, unit, shown
        self.done, self.start = 0, time.perf_counter()
        self._last, self._milestone, self._task = self.start, 0, None

    def advance(self, n: int = 1) -> None:
        """``n`` more units done."""
        if not self.shown:
            return
        self.done += n
        if self._task is not None:
            _bar.update(self._task, advance=n)
        now = time.perf_counter()
        milestone = int(self.done / self.total / MILESTONE) if self.total else 0
        due = (milestone > self._milestone and self.done < self.total) or now - self._last >= LOG_EVERY_S
        if due and now - self._last >= QUIET_FOR_S:
            self._milestone, self._last = milestone, now
            self._log(self._progress_line(now - self.start))

    def _progress_line(self, elapsed: float) -> str:
        if not self.total:
            return f"{self.description}: {self.done} {self.unit} in {_duration(elapsed)}"
        eta = elapsed * (self.total - self.done) / max(self.done, 1)
        return (f"{self.description}: {self.done}/{self.total} {self.unit} ({100 * self.done / self.total:.0f}%) in "
                f"{_duration(elapsed)}, about {_duration(eta)} left")

    def _log(self, message: str, on_bar: bool = True) -> None:
        progress_log.info(message, extra={_ON_BAR: on_bar and self._task is not None})

    def _begin(self) -> None:
        global _bar
        if not self.shown:
            return
        if console.is_interactive and not _other_live_display():  # a terminal: a bar (nested steps share one)
            from rich.errors import LiveError
            from rich.progress import Progress

            try:
                if _bar is None:
                    _bar = Progress(*_bar_columns(), console=console, transient=True, refresh_per_second=4)
                    _bar.start()
                self._task = _bar.add_task(self.description, total=self.total, unit=self.unit)
            except LiveError:  # another live display (not ours) holds the console: log lines only
                _bar = None
        self.start = self._last = time.perf_counter()  # after the bar's first import
        self._log(f"{self.description}: starting" + (f" ({self.total} {self.unit})" if self.total is not None else ""))

    def _end(self, failed: bool) -> None:
        global _bar
        if not self.shown:
            return
        if self._task is not None:
            _bar.remove_task(self._task)
            if not _bar.tasks:
                _bar.stop()
                _bar = None
        elapsed = time.perf_counter() - self.start
        counted = f"{self.done}/{self.total}" if self.total is not None else f"{self.done}"
        if failed:
            self._log(f"{self.description}: stopped at {counted} {self.unit} after {_duration(elapsed)}", False)
        else:
            rate = self.done / max(elapsed, 1e-9)
            self._log(f"{self.description}: {counted} {self.unit} in {_duration(elapsed)} "
                      f"({rate:.{1 if rate >= 1 else 2}f} {self.unit}/s)", False)


def _rank_zero() -> bool:
    """Lightning's rank-zero test once it is imported; before, the launcher's variables it reads (no 10 s import for
    a step outside training, e.g. rendering the data from a notebook)."""
    if "pytorch_lightning" in sys.modules:
        from train.utils.distributed import is_rank_zero

        return is_rank_zero()
    keys = ("RANK", "LOCAL_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK")  # Lightning's, in its order
    rank = next((os.environ[k] for k in keys if k in os.environ), 0)
    return int(rank) == 0 and int(os.environ.get("NODE_RANK", 0)) == 0


@contextmanager
def progress(description: str, total: int | None = None, unit: str = "steps") -> Iterator[Step]:
    """Progress of a long step done piece by piece: ``with progress("export", 6, "graphs") as step: ...
    step.advance()``. ``total`` (the units to do) gives the percentage and ETA; None: a count and rate only."""
    step = Step(description, None if total is None else int(total), unit, shown=_rank_zero())
    step._begin()
    try:
        yield step
    except GeneratorExit:  # a loop over ``track`` left early: what was done is reported
        step._end(failed=False)
        raise
    except BaseException:
        step._end(failed=True)
        raise
    step._end(failed=False)


def track(iterable: Iterable[T], description: str, total: int | None = None, unit: str = "batches",
          count: Callable[[T], int] | None = None) -> Iterator[T]:
    """``iterable``'s items with :func:`progress`: ``total`` units (default ``len(iterable)`` when each item counts
    1), an item counting ``count(item)`` of them once the loop body is done with it: ``for batch in track(loader,
    "prepare: train")``, or ``track(loader, "replay: test", n_queries, "queries", count=lambda b: len(b["label"]))``."""
    if total is None and count is None and hasattr(iterable, "__len__"):
        total = len(iterable)
    with progress(description, total, unit) as step:
        for item in iterable:
            yield item
            step.advance(1 if count is None else count(item))
