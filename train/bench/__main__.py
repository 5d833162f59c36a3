"""``python -m train.bench NAME [--json PATH] [benchmark options]``: run one benchmark and print its figures."""
from __future__ import annotations

import argparse
import importlib
import json

BENCHMARKS = {"synthetic": "train.bench.synthetic", "apt": "train.bench.apt", "stage1": "train.bench.stage1",
              "fp8": "train.bench.fp8", "compare": "train.bench.compare", "fractals": "train.bench.fractals",
              "validator": "train.bench.validator_parity"}


def main() -> None:
    """Run benchmark ``NAME`` with the remaining options; ``--json PATH`` also writes its figures there."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("name", choices=sorted(BENCHMARKS))
    parser.add_argument("--json", help="also write the figures to this file")
    args, rest = parser.parse_known_args()
    figures = importlib.import_module(BENCHMARKS[args.name]).run(rest)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=2)


if __name__ == "__main__":
    main()
