"""FDSL pretraining throughput on one device: fractal images rendered per second, and rendered + trained per second.

The training step is ``task=pretrain``'s (render a batch, mixup / cutmix, forward, backward, AdamW) with the model
and FDSL settings of the composed config (``model=vit_tiny`` and ``conf/pretrain/default.yaml``, ``--override`` to
change them), timed in windows synchronised at their edges (:mod:`train.bench.timing`).
"""
from __future__ import annotations

import argparse

import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy

from train.bench.timing import time_steps
from train.configs import config_dir
from train.data.fractals import FractalImages, search_categories
from train.models import create_backbone


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
    with initialize_config_dir(str(config_dir()), version_base="1.3"):
        cfg = compose("config", overrides=["model=vit_tiny", *args.override])
    fdsl, device = cfg.pretrain.fdsl, torch.device(args.device)
    categories = search_categories(args.classes, device=device, **fdsl.search)
    images = FractalImages(categories, size=cfg.model.img_size, **OmegaConf.to_container(fdsl.render))
    backbone = {**OmegaConf.to_container(cfg.model.backbone, resolve=True), "pretrained": False}
    net = create_backbone(**backbone, num_classes=args.classes).to(device)
    optimizer = torch.optim.AdamW(net.parameters(), lr=cfg.pretrain.optimizer.lr)
    mixup = Mixup(**(fdsl.mixup or {"prob": 0.0}), label_smoothing=fdsl.label_smoothing, num_classes=args.classes)
    criterion = SoftTargetCrossEntropy()
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    generator = torch.Generator(device=device).manual_seed(0)
    figures = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               "classes": args.classes, "batches": {}}
    for batch in args.batch:
        def render():
            images(batch, generator)

        def train():
            x, y = mixup(*images(batch, generator))
            with autocast:
                loss = criterion(net(x), y)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        timed = {name: time_steps(step, device, warmup=3, steps=args.steps, window=args.window, batch=batch)["img_s"]
                 for name, step in (("rendered", render), ("trained", train))}
        figures["batches"][batch] = timed
        print(f"fractals on {figures['device']}, batch {batch}: {timed['rendered']:,.0f} img/s rendered, "
              f"{timed['trained']:,.0f} img/s rendered + trained ({backbone['name']}, {cfg.model.img_size} px, "
              "bf16 on CUDA)")
    return figures
