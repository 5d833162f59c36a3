"""What the user sees: logging through rich, the config tree, metric tables."""
from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.logging import RichHandler
from rich.syntax import Syntax
from rich.table import Table
from rich.tree import Tree

console = Console()
_FILE_HANDLER_ATTR = "_roadwork_file"


def setup_logging(level: str = "INFO") -> None:
    """Rich console logging on the root logger (idempotent)."""
    root = logging.getLogger()
    if not any(isinstance(h, RichHandler) for h in root.handlers):
        root.addHandler(RichHandler(console=console, show_path=False, rich_tracebacks=False, markup=False))
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
