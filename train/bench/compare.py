"""Two arms of Stage-1 runs compared on the same test queries, from each run's ``task=evaluate`` (the bundle's
calibrated Stage-1 at the validator's 0.5):

    python -m train.bench compare --a checkpoints/scratch-s* --b checkpoints/pretrained-s* [--draws 2000]

Per run: MCC, accuracy and NATIX reward per level. Per pair (the i-th run of each arm, e.g. the same seed): MCC(b) -
MCC(a) at level 0 and over the mean of the levels, each with a paired bootstrap 95% interval that resamples whole
scenes (a scene's cameras and levels move together). Runs of a pair must share the data index (same test split).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from train.metrics import paired_bootstrap_mcc
from train.runs import Run


def parse(argv: list[str] | None) -> argparse.Namespace:
    """The ``compare`` benchmark's command line: the run folders of arms ``--a`` and ``--b``, ``--draws``."""
    parser = argparse.ArgumentParser(prog="python -m train.bench compare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--a", nargs="+", required=True, help="run folders of arm a (the reference)")
    parser.add_argument("--b", nargs="+", required=True, help="run folders of arm b, paired with a's in order")
    parser.add_argument("--draws", type=int, default=2000, help="bootstrap resamples")
    return parser.parse_args(argv)


def evaluated(path: str) -> tuple[dict, dict[tuple[int, int], float], np.ndarray, np.ndarray]:
    """A run's evaluate report, its P(roadwork) by (level, test index), and the test split's labels and scenes."""
    run = Run.open(path)
    report_path = run.artifact("evaluate", "report")
    predictions = pq.read_table(run.artifact("evaluate", "predictions")).to_pydict()
    probs = {(lv, i): p for lv, i, p in zip(predictions["level"], predictions["index"], predictions["prob"])}
    index = pq.read_table(run.artifact("data", "index"), columns=["split", "label", "scene_id"]).to_pydict()
    test = [k for k, s in enumerate(index["split"]) if s == "test"]
    labels, scenes = (np.asarray(index[c])[test] for c in ("label", "scene_id"))
    return json.loads(report_path.read_text()), probs, labels, scenes


def per_run(report: dict) -> dict:
    """MCC, accuracy and reward per level of an evaluate report, rounded to 4 places."""
    return {lv: {k: round(m[k], 4) for k in ("mcc", "acc", "reward")} for lv, m in report["metrics"].items()}


def pair(a: tuple, b: tuple, draws: int) -> dict:
    """MCC(b) - MCC(a) at level 0 and over the mean of the levels, scene-grouped paired bootstrap intervals."""
    (_, pa, labels, scenes), (_, pb, labels_b, _) = a, b
    if not np.array_equal(labels, labels_b) or pa.keys() != pb.keys():
        raise ValueError("the runs were evaluated on different test queries: compare runs of the same data")
    keys = sorted(pa)
    level = torch.tensor([lv for lv, _ in keys])
    index = torch.tensor([i for _, i in keys])
    prob_a, prob_b = (torch.tensor([p[k] for k in keys]) for p in (pa, pb))
    target = torch.as_tensor(labels)[index]
    _, scene = np.unique(scenes, return_inverse=True)
    groups = torch.as_tensor(scene)[index]
    l0 = level == 0
    return {"L0": paired_bootstrap_mcc(prob_a[l0], prob_b[l0], target[l0], groups[l0], draws),
            "mean": paired_bootstrap_mcc(prob_a, prob_b, target, groups, draws, strata=level)}


def run(argv: list[str] | None = None) -> dict:
    """The ``compare`` benchmark: each run's metrics and each pair's MCC differences (:func:`pair`), printed and
    returned; ``--a`` and ``--b`` must list as many runs."""
    args = parse(argv)
    if len(args.a) != len(args.b):
        raise SystemExit(f"--a has {len(args.a)} runs, --b {len(args.b)}: pair them one to one")
    arms = {name: [evaluated(p) for p in paths] for name, paths in (("a", args.a), ("b", args.b))}
    figures = {"runs": {p: per_run(e[0]) for name, paths in (("a", args.a), ("b", args.b))
                        for p, e in zip(paths, arms[name])},
               "pairs": [pair(a, b, args.draws) for a, b in zip(arms["a"], arms["b"])], "draws": args.draws}
    for path, levels in figures["runs"].items():
        print(Path(path).name, " ".join(f"{lv}: MCC {m['mcc']:.4f} acc {m['acc']:.4f} reward {m['reward']:.4f}"
                                        for lv, m in levels.items()))
    for (pa, pb), d in zip(zip(args.a, args.b), figures["pairs"]):
        print(f"{Path(pb).name} - {Path(pa).name}: " + "; ".join(
            f"{k} MCC {v['delta']:+.4f} [{v['low']:+.4f}, {v['high']:+.4f}]" for k, v in d.items()))
    return figures
