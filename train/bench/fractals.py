"""FDSL pretraining throughput on one device: fractal images rendered per second, and rendered + trained per second.

The step is ``task=pretrain``'s own (:class:`~train.tasks.pretrain.FractalPretrainModule`, built from the composed
config: ``model=vit_tiny`` and ``conf/pretrain/default.yaml``, ``--override`` to change them) and an AdamW update,
timed in windows synchronised at their edges (:mod:`train.bench.timing`).
"""
from __future__ import annotations

import argparse
import warnings

import torch
from hydra import compose, initialize_config_dir

from train.bench.timing import time_steps
from train.configs import config_dir
from train.optim import build_optimizer
from train.tasks.pretrain import build_method


def run(argv: list[str] | None = None) -> dict:
    """img/s rendered and rendered + trained at each ``--batch`` on ``--device``."""
    parser = argparse.ArgumentParser(prog="python -m train.bench fractals")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=30, help="timed steps per figure")
    parser.add_argument("--window", type=int, default=5)
    parser.add_argument("--override", nargs="*", default=[], help="Hydra overrides of the composed config")
    args = parser.parse_args(argv)
    overrides = ["model=vit_tiny", "pretrain.method=fdsl", f"pretrain.fdsl.classes={args.classes}", *args.override]
    with initialize_config_dir(str(config_dir()), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    device = torch.device(args.device)
    module, _ = build_method(cfg, run=None)  # FDSL reads no run
    module.to(device).train()
    optimizer = build_optimizer(module.optimizer_factory, module.net, fuse=device.type == "cuda")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    figures = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               "classes": args.classes, "batches": {}}
    for batch in args.batch:
        slots = {"slot": range(batch)}

        def render():
            module.images(batch, 0, 0, 0)

        def train():
            with autocast:
                loss = module.training_step(slots, 0)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*self.log.*")  # no trainer here: the step's log is a no-op
            timed = {name: time_steps(step, device, warmup=3, steps=args.steps, window=args.window, batch=batch)["img_s"]
                     for name, step in (("rendered", render), ("trained", train))}
        figures["batches"][batch] = timed
        print(f"fractals on {figures['device']}, batch {batch}: {timed['rendered']:,.0f} img/s rendered, "
              f"{timed['trained']:,.0f} img/s rendered + trained ({cfg.model.backbone.name}, {cfg.model.img_size} px, "
              "bf16 on CUDA)")
    return figures
