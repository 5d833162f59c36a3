"""Where the files the project ships are: the Hydra configs and the pretrained backbones."""
from __future__ import annotations

from pathlib import Path

PACKAGE = Path(__file__).resolve().parent


def checkout_root() -> Path | None:
    """The repository this package runs from (a source checkout or an editable install); None in a wheel."""
    root = PACKAGE.parent
    return root if (root / "pyproject.toml").is_file() and (root / "conf" / "config.yaml").is_file() else None


def config_dir() -> Path:
    """The folder holding ``config.yaml``: the repository's top-level ``conf/`` in a checkout or an editable
    install, else the copy an installed wheel ships as ``train/conf/`` (pyproject.toml maps one onto the other)."""
    root = checkout_root()
    return root / "conf" if root else PACKAGE / "conf"


def pretrained_dir() -> Path:
    """The folder of the backbones this project pretrained and ships: ``checkpoints/pretrained/`` in a checkout or an
    editable install, else the copy an installed wheel ships as ``train/pretrained/``."""
    root = checkout_root()
    return root / "checkpoints" / "pretrained" if root else PACKAGE / "pretrained"
