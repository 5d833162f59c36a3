"""The tasks, one module each (``task=NAME``); :mod:`train.tasks.registry` finds them by name."""
