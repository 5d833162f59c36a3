"""The project's Hydra plugins: the Optuna sweeper (``hydra/sweeper: optuna``, :mod:`.optuna_sweeper`).

Hydra instantiates only plugin classes of the ``hydra_plugins`` namespace package, which it scans at start.
pyproject.toml's package finder also searches ``train/``, so this folder installs as ``hydra_plugins.roadwork_sweeper``:
a wheel holds it at ``hydra_plugins/roadwork_sweeper/``, and an editable install adds this folder's parent to the
namespace's path; Hydra's scan finds it either way. It is not imported as part of ``train``.
"""
