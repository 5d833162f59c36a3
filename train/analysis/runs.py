"""Which run a notebook reads, and a small table that renders as HTML in a notebook and as text elsewhere."""
from __future__ import annotations

import html
import json
import os
from collections.abc import Sequence
from pathlib import Path

from train.runs import REGISTRY

RUN_ENV = "ROADWORK_RUN"  # a run folder (or, for the bundle notebook, an export bundle) for the notebooks


def checkpoints_dir() -> Path:
    """``$ROADWORK_ROOT/checkpoints`` (as ``paths.root_dir`` reads it), else ``checkpoints/`` in the working
    directory or its parent (a notebook runs in ``notebooks/``)."""
    if os.environ.get("ROADWORK_ROOT"):
        return Path(os.environ["ROADWORK_ROOT"]) / "checkpoints"
    here = Path.cwd()
    return next((d / "checkpoints" for d in (here, here.parent) if (d / "checkpoints").is_dir()), here / "checkpoints")


def latest_run(root: str | Path | None = None, needs: str = "export") -> Path:
    """The most recently created run under ``root`` (default :func:`checkpoints_dir`) whose task ``needs`` is
    complete."""
    root = Path(root) if root else checkpoints_dir()
    found = []
    for registry in root.glob(f"*/{REGISTRY}"):
        reg = json.loads(registry.read_text())
        if reg["tasks"].get(needs, {}).get("status") == "complete":
            found.append((reg["created"], registry.parent.name, registry.parent))
    if not found:
        raise FileNotFoundError(f"no run under {root} has a complete '{needs}' stage: run `python -m train` first, "
                                f"or set {RUN_ENV}=<run folder>")
    return max(found)[2]


def notebook_run(run: str | Path | None = None, needs: str = "export") -> Path:
    """The run a notebook reads: ``run`` if given, else ``$ROADWORK_RUN``, else :func:`latest_run`."""
    chosen = run or os.environ.get(RUN_ENV)
    if chosen:
        if not Path(chosen).is_dir():
            raise FileNotFoundError(f"{chosen} is not a folder")
        return Path(chosen)
    return latest_run(needs=needs)


class Table:
    """Rows of a table (dicts with the same keys); a notebook shows it as HTML, ``print`` as aligned text."""

    def __init__(self, rows: Sequence[dict]):
        self.rows = list(rows)
        self.columns = list(self.rows[0]) if self.rows else []

    @staticmethod
    def _cell(value) -> str:
        return f"{value:.4g}" if isinstance(value, float) else "" if value is None else str(value)

    def _repr_html_(self) -> str:
        head = "".join(f"<th>{html.escape(c)}</th>" for c in self.columns)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(self._cell(r.get(c)))}</td>" for c in self.columns)
                       + "</tr>" for r in self.rows)
        return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"

    def __repr__(self) -> str:
        cells = [[self._cell(r.get(c)) for c in self.columns] for r in self.rows]
        widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(self.columns)]
        lines = [self.columns] + cells
        return "\n".join("  ".join(v.ljust(w) for v, w in zip(line, widths)) for line in lines)
