"""``python -m train`` with one function of a stage replaced by a failure, for the no-hang test (test_faults.py):
``python tests/failing_stage.py MODULE:NAME [overrides ...]``. The failure prints the wall-clock time it raised at."""
import importlib
import runpy
import sys
import time


def fail_at(target: str) -> None:
    module, name = target.split(":")

    def fail(*args, **kwargs):
        print(f"failing at {time.time():.3f}", file=sys.stderr, flush=True)
        raise RuntimeError(f"injected failure in {target}")
    setattr(importlib.import_module(module), name, fail)


if __name__ == "__main__":
    fail_at(sys.argv.pop(1))
    runpy.run_module("train", run_name="__main__", alter_sys=True)
