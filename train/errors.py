"""Errors raised across layers for problems a user can fix (a config value, a run folder); the entry point prints their
one-line message instead of a traceback."""
from __future__ import annotations


class ConfigError(ValueError):
    """A config value or combination that cannot work; the message names the key and the allowed values."""


class RunError(RuntimeError):
    """A run folder or its registry is missing something a task needs."""
