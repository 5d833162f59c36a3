"""What made a file: the code's version (package, git commit, dirty tree) and when."""
from __future__ import annotations

import datetime as dt
import subprocess
from importlib import metadata

from train.configs import checkout_root


def code_version() -> dict:
    """This package's version and, when it runs from a git checkout, the commit and whether it is dirty."""
    root = checkout_root()

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    # an installed wheel has no checkout: git would name whatever repository the environment sits in
    commit = git("rev-parse", "HEAD") if root else None
    status = git("status", "--porcelain", "--untracked-files=no") if commit else None
    try:
        package = metadata.version("roadwork-cascade")
    except metadata.PackageNotFoundError:  # run from a source tree without installing it
        package = "not installed"
    return {"package": package, "git_commit": commit, "git_dirty": None if status is None else bool(status)}


def now_utc() -> str:
    """The time now, UTC, to the second (ISO 8601)."""
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
