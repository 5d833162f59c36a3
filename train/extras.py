"""The optional extras (``pip install 'roadwork-cascade[<extra>]'``), what needs each, and the stop when one is missing.

Two places check: :func:`check_args` runs on the command line before Hydra composes (a missing launcher or sweeper
plugin breaks composition itself), and :func:`train.config_checks.check_extras` on the composed config (choices made
inside experiment files); the Optuna sweeper checks its own. Each stops with one line naming the ``pip install`` to
run. No heavy imports here: the sweeper plugin, which Hydra imports on every start, uses this module too.
"""
from __future__ import annotations

import fnmatch
import importlib.util

# extra -> the modules it installs that the code imports
EXTRAS = {
    "deepspeed": ("deepspeed",),
    "wandb": ("wandb",),
    "sweep": ("optuna",),
    "slurm": ("hydra_plugins.hydra_submitit_launcher", "submitit"),
}
# (config group as typed on the command line, choice pattern, extra)
CHOICES = (
    ("trainer", "deepspeed*", "deepspeed"),
    ("logger", "*wandb*", "wandb"),
    ("hparams_search", "*", "sweep"),
    ("hydra/sweeper", "optuna", "sweep"),
    ("hydra/launcher", "slurm", "slurm"),
    ("hydra/launcher", "submitit_*", "slurm"),
)


def installed(module: str) -> bool:
    """Whether ``module`` can be imported (found without importing it)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a missing parent package; a module set to None in sys.modules
        return False


def missing(extra: str) -> str | None:
    """The first module of ``extra`` that is not installed, or None."""
    return next((m for m in EXTRAS[extra] if not installed(m)), None)


def message(what: str, extra: str, module: str) -> str:
    """The one-line stop: what needs the extra, the missing module, the command that installs it."""
    return (f"{what} needs the '{extra}' extra ({module} is not installed): pip install 'roadwork-cascade[{extra}]' "
            f"(in a checkout: pip install -e '.[{extra}]')")


def check_args(args: list[str]) -> str | None:
    """The stop message for the first command-line group choice whose extra is missing (``trainer=deepspeed_stage2``,
    ``hparams_search=...``, ``hydra/launcher=slurm``, ...), or None."""
    for arg in args:
        if arg.startswith("-") or "=" not in arg:
            continue
        key, value = arg.split("=", 1)
        key = key.lstrip("+~")
        for group, pattern, extra in CHOICES:
            chosen = [v for v in value.split(",") if v and v != "null"]  # a sweep over choices: a,b
            if key == group and any(fnmatch.fnmatchcase(v, pattern) for v in chosen):
                module = missing(extra)
                if module:
                    return message(arg, extra, module)
    return None
