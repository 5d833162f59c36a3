"""Stage-1 end to end against the raw timm step on one device: img/s, their ratio, MFU, peak memory, the loader alone.

    python -m train.bench stage1                       # ViT-B/16, batch 256: raw step, full loop (shards, JPEG)
    python -m train.bench stage1 --levers              # + the shards loop with each speed lever undone in turn
    python -m train.bench stage1 --model vit_tiny_patch16_224 --img-size 32 --batch 8 --warmup 1 --steps 2 \\
        --window 1 --workers 0 --shard-workers 0      # a CPU smoke run
    python -m train.bench stage1 --data shards --profile 6 --trace   # + each row's profile (train/bench/profile.py)

In one process: (1) the raw step: the same timm model in a plain loop (bf16 autocast, fused AdamW on CUDA,
torch.compile, one random batch already on the device), eager and compiled; (2) the framework's full loop: the real
config composed with Hydra (``model=vit_b16`` with ``--model`` / ``--img-size``), Stage1Module and RoadworkDataModule
over a run's data on disk (``--run-dir``, or a run built here from the embedded synthetic data by ``task=data``;
``task=prepare`` writes the shards), ``trainer.fit`` for one epoch of warm-up + timed batches with the configured
checkpoints, logger, progress bar and metrics; (3) the train loader alone, and with its copy to the device and the
device augmentation; (4) MFU = img/s x FLOPs of one training step per image (``count_flops``, forward + backward)
/ the bf16 matmul peak measured here (or ``--peak-tflops``); (5) peak device memory. img/s: the median over windows
of ``--window`` steps, synchronised at window edges only (``train/bench/timing.py``). ``--profile N``: each row
then runs N more steps under torch.profiler (:mod:`train.bench.profile`; the raw step and the full loop alike), its
summary in the row, its tables in ``profile-<row>.txt`` under ``$OUT`` (or the working directory).
"""
from __future__ import annotations

import argparse
import datetime as dt
import gc
import math
import os
import platform
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch._dynamo.utils import counters

from train.bench.profile import StepProfiler, profile_steps
from train.bench.timing import StepTimer, matmul_peak, synchronize, time_steps
from train.configs import config_dir
from train.export.flops import count_flops
from train.models.backbones import create_backbone
from train.runs import Run
from train.tasks.registry import ensure_shards, get_task
from train.tiers.training import build_datamodule, build_trainer
from train.utils.console import console, setup_logging
from train.utils.files import atomic_write_json

CONF_DIR = config_dir()
TRAIN_FRACTION = 0.95  # of a bench-built run's scenes (the rest: val)
# name: (the lever it undoes, or what it adds, in the shards loop; Hydra overrides)
LEVERS = {
    "eager": ("undoes torch.compile (model and device augmentation)", ["model.compile=false"]),
    "aug_eager": ("undoes torch.compile of the device augmentation only", ["data.gpu_augment.compile=false"]),
    "foreach_adamw": ("undoes fused AdamW (the foreach loop)", ["model.optimizer.fused=false"]),
    "sync_pbar": ("undoes our progress bar (Lightning's redraws every step; it shows no train/loss, which the module "
                  "logs without prog_bar)",
                  ["callbacks.progress_bar._target_=pytorch_lightning.callbacks.RichProgressBar",
                   "~callbacks.progress_bar.batch_size_fn"]),
    "no_pin": ("undoes pinned memory (pageable batches: the copy waits for the device)", ["data.pin_memory=false"]),
    "same_stream": ("undoes the batch copy on a side stream (the compute stream waits for it)",
                    ["data.copy_stream=false"]),
    "fp32": ("undoes bf16 autocast (32-true)", ["trainer.precision=32-true"]),
    "batch_128": ("halves the batch (128)", ["data.batch_size=128"]),
    "no_clip": ("adds: no gradient clipping (the config clips at norm 1.0)", ["trainer.gradient_clip_val=null"]),
    "channels_last": ("adds channels_last input", ["model.channels_last=true"]),
    "no_nan_guard": ("undoes the non-finite-loss guard (it reads one flag from the device per step)",
                     ["callbacks.nonfinite_loss=null"]),
    "step_sync": ("adds: a host read of train/loss after every step (what logging it with prog_bar=True costs: "
                  "Lightning reads prog_bar metrics at every batch end)",
                  ["+callbacks.step_sync._target_=train.bench.stage1.StepSync"]),
    "no_gc": ("adds: Python's garbage collector off during fit (a diagnostic: do its pauses stall the host?)",
              ["+callbacks.no_gc._target_=train.bench.stage1.NoGC"]),
    "no_layer_decay": ("adds: one parameter group (layer-wise LR decay makes ~28, one fused AdamW call each)",
                       ["model.layer_decay=null"]),
    "minimal": ("adds: no callbacks, logger, progress bar, clipping, layer decay, LR schedule or label smoothing",
                ["callbacks=none", "logger=none", "+trainer.enable_progress_bar=false",
                 "trainer.gradient_clip_val=null", "model.layer_decay=null", "model.scheduler=null",
                 "model.label_smoothing=0"]),
}
DEFAULT_LEVERS = ["sync_pbar", "no_pin", "foreach_adamw", "aug_eager", "eager", "no_clip",
                  "channels_last"]  # recompiles last


class StepSync(pl.Callback):
    """Reads ``train/loss`` on the host after every training step (the ``step_sync`` lever)."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if "train/loss" in trainer.callback_metrics:
            float(trainer.callback_metrics["train/loss"])


class NoGC(pl.Callback):
    """Python's garbage collector off from the start of training to its end (the ``no_gc`` lever)."""

    def on_train_start(self, trainer, pl_module) -> None:
        gc.disable()

    def on_train_end(self, trainer, pl_module) -> None:
        gc.enable()


def parse(argv: list[str] | None) -> argparse.Namespace:
    """The ``stage1`` benchmark's command line; a bare ``--levers`` means :data:`DEFAULT_LEVERS`."""
    p = argparse.ArgumentParser(prog="python -m train.bench stage1")
    p.add_argument("--model", default="vit_base_patch16_224", help="timm name (model=vit_b16 with this backbone)")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--warmup", type=int, default=30, help="steps before timing (the first compiles)")
    p.add_argument("--steps", type=int, default=60, help="timed steps")
    p.add_argument("--window", type=int, default=10, help="steps per timed window")
    p.add_argument("--profile", type=int, default=0, help="steps profiled after the timed ones, in every row")
    p.add_argument("--trace", action="store_true", help="with --profile: also each row's Chrome trace (gzipped)")
    p.add_argument("--workers", type=int, default=min(15, max((os.cpu_count() or 2) - 1, 0)),
                   help="loader workers of the JPEG path")
    p.add_argument("--shard-workers", type=int, default=4, help="loader workers of the shards path")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None, help="default: on CUDA")
    p.add_argument("--data", choices=["shards", "jpeg", "both"], default="both", help="data paths of the full loop")
    p.add_argument("--levers", nargs="*", choices=sorted(LEVERS), default=None,
                   help=f"shards loops with one lever changed (bare: {' '.join(DEFAULT_LEVERS)})")
    p.add_argument("--run-dir", help="an existing run with a data stage (shards are prepared if missing)")
    p.add_argument("--root", default=".", help="paths.root_dir: checkpoints/ and data/ of a run built here")
    p.add_argument("--scenes", type=int, help="synthetic scenes of a run built here (default: one epoch's worth)")
    p.add_argument("--val-batches", type=int, default=0, help="validation batches per level after the epoch")
    p.add_argument("--peak-tflops", type=float, help="peak bf16 TFLOP/s for MFU (default: measured on CUDA)")
    p.add_argument("--override", nargs="*", default=[], help="more Hydra overrides for every full loop")
    p.add_argument("--save", action="store_true", help="also write checkpoints/benchmarks/stage1-<time>.json")
    p.add_argument("--time-limit", type=float, default=420,
                   help="seconds: levers not started by then are skipped (and listed), so one call fits its lease")
    args = p.parse_args(argv)
    if args.levers is not None and not args.levers:
        args.levers = list(DEFAULT_LEVERS)
    args.levers = args.levers or []
    return args


def config(args: argparse.Namespace, cuda: bool, compiled: bool, *extra: str) -> DictConfig:
    """The real config for the bench's full loop: ViT settings of ``model=vit_b16``, one epoch of exactly the
    warm-up + timed batches."""
    overrides = [f"paths.root_dir={args.root}", "model=vit_b16", f"model.backbone.name={args.model}",
                 f"model.img_size={args.img_size}", "model.backbone.pretrained=false", "print_config=false",
                 f"trainer={'gpu' if cuda else 'cpu'}", f"data.batch_size={args.batch}",
                 f"data.num_workers={args.shard_workers}", "data.train_source=shards", f"model.compile={compiled}",
                 "trainer.max_epochs=1", f"trainer.limit_train_batches={batches(args)}",
                 f"trainer.limit_val_batches={args.val_batches}", "trainer.num_sanity_val_steps=0",
                 *synthetic_overrides(args), *args.override, *extra]
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=overrides)


def batches(args: argparse.Namespace) -> int:
    """Training steps of a row: warm-up, timed, profiled."""
    return args.warmup + args.steps + args.profile


def synthetic_overrides(args: argparse.Namespace) -> list[str]:
    """A train split of one epoch's worth of scenes (2 views each) and a small val split."""
    need = batches(args) * args.batch
    scenes = args.scenes or max(40, math.ceil(1.1 * need / (2 * TRAIN_FRACTION)))
    return [f"data.source.n_scenes={scenes}", "data.source.views_per_scene=2", f"data.splits.train={TRAIN_FRACTION}",
            f"data.splits.val={1 - TRAIN_FRACTION:.2f}", "data.splits.meta=0", "data.splits.calib=0",
            "data.splits.test=0"]


def open_run(args: argparse.Namespace, cfg: DictConfig) -> Run:
    """``--run-dir``, or a new run with the data stage done (the synthetic images rendered once under data/)."""
    if args.run_dir:
        return Run.open(args.run_dir)
    run = Run.create(cfg.paths.checkpoints_dir, "bench_stage1")
    get_task("data")(cfg, run)
    return run


def raw_step(backbone: dict, args: argparse.Namespace, device: torch.device, compiled: bool) -> dict:
    """The peer baseline: the same timm model, bf16 autocast, fused AdamW, one random batch already on the device."""
    model = create_backbone(**backbone).to(device).train()
    if compiled:
        model.compile()
    cuda = device.type == "cuda"
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05, fused=cuda)
    images = torch.randn(args.batch, 3, args.img_size, args.img_size, device=device)
    labels = torch.randint(0, 2, (args.batch,), device=device)

    def step():
        with torch.autocast(device.type, torch.bfloat16, enabled=cuda):
            loss = F.cross_entropy(model(images), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    reset_memory(device)
    out = {**time_steps(step, device, args.warmup, args.steps, args.window, args.batch),
           "peak_memory_gb": peak_memory(device)}
    if args.profile:
        out["profile"] = profile_steps(step, args.profile, f"raw-{'compiled' if compiled else 'eager'}",
                                       trace=args.trace)
    return out


def full_loop(cfg: DictConfig, run: Run, name: str, args: argparse.Namespace, device: torch.device) -> dict:
    """``trainer.fit`` of the real Stage1Module and RoadworkDataModule for one epoch, timed by :class:`StepTimer`."""
    ensure_shards(cfg, run)
    datamodule = build_datamodule(cfg, run)
    available = math.ceil(len(datamodule.split("train")) / args.batch)
    if available < batches(args):
        raise SystemExit(f"the train split of {run.path} has {available} batches of {args.batch}; the bench needs "
                         f"{batches(args)}: pass fewer --steps / --warmup / --profile or a larger run")
    model = instantiate(cfg.model, class_weights=datamodule.class_weights)
    trainer = build_trainer(cfg, run.task_dir("bench") / name)
    timer = StepTimer(device, args.warmup, args.window, cfg.data.batch_size, args.steps)
    trainer.callbacks.append(timer)
    profiler = StepProfiler(name, args.warmup + args.steps, args.profile, trace=args.trace) if args.profile else None
    if profiler:
        trainer.callbacks.append(profiler)
    graphs, breaks = counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())
    reset_memory(device)
    start = time.perf_counter()
    trainer.fit(model, datamodule=datamodule)
    out = {**timer.result(), "fit_s": time.perf_counter() - start, "peak_memory_gb": peak_memory(device),
           "compiled_graphs": counters["stats"]["unique_graphs"] - graphs,
           "graph_breaks": sum(counters["graph_break"].values()) - breaks}
    if profiler:
        out["profile"] = profiler.summary
    del trainer, model, datamodule
    release(device)
    return out


def data_path(cfg: DictConfig, run: Run, args: argparse.Namespace, device: torch.device) -> dict:
    """img/s of the train loader alone (batches arriving on the host) and with each batch's copy to the device and
    the device augmentation (synchronised at the end); the first batches, prefetched while the workers started,
    are left out."""
    datamodule = build_datamodule(cfg, run)
    loader = datamodule.train_dataloader()
    total = min(len(loader), args.warmup + args.steps)
    skip = min(max(2 * cfg.data.num_workers, 1), total // 3)
    arrivals, images = [], 0
    for k, batch in enumerate(loader):
        arrivals.append(time.perf_counter())
        images += len(batch["label"]) if k > skip else 0
        datamodule.on_after_batch_transfer(datamodule.transfer_batch_to_device(batch, device, 0), 0)
        if k + 1 == total:
            break
    synchronize(device)
    end = time.perf_counter()
    del loader, datamodule
    release(device)
    if images == 0:
        return {"loader_img_s": None, "to_device_img_s": None}
    return {"loader_img_s": images / (arrivals[-1] - arrivals[skip]),
            "to_device_img_s": images / (end - arrivals[skip])}


def reset_memory(device: torch.device) -> None:
    """Reset the device's peak-memory counter (CUDA only)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> float | None:
    """GB of device memory allocated at the peak since :func:`reset_memory`; None off CUDA."""
    return torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None


def release(device: torch.device) -> None:
    """Collect garbage and empty the CUDA cache, so the next row starts with the memory free."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def train_flops(backbone: dict, args: argparse.Namespace, device: torch.device) -> float:
    """FLOPs of one training step (forward + backward) per image, counted on two images on ``device``."""
    model = create_backbone(**backbone).to(device).train()
    flops = count_flops(model, torch.randn(2, 3, args.img_size, args.img_size, device=device), backward=True) / 2
    del model
    release(device)
    return flops


def versions() -> dict:
    """Versions of Python, torch, CUDA, timm, pytorch_lightning and torchvision, and of ``lightning`` when installed."""
    import pytorch_lightning
    import timm
    import torchvision

    out = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "timm": timm.__version__, "pytorch_lightning": pytorch_lightning.__version__,
           "torchvision": torchvision.__version__}
    try:
        import lightning
        out["lightning"] = lightning.__version__
    except ImportError:
        pass
    return out


def plans(args: argparse.Namespace) -> list[tuple[str, list[str]]]:
    """(row name, extra overrides) of every full loop: each data path asked for, then each lever."""
    paths = ["shards", "jpeg"] if args.data == "both" else [args.data]
    out = [(f"full/{p}", ["data.train_source=jpeg", f"data.num_workers={args.workers}"] if p == "jpeg" else [])
           for p in paths]
    return out + [(f"lever/{name}", LEVERS[name][1]) for name in args.levers]


def timed(fn, *fn_args) -> dict:
    """``fn(*fn_args)``'s figures plus ``wall_s``, the seconds the call took."""
    start = time.perf_counter()
    out = fn(*fn_args)
    return {**out, "wall_s": time.perf_counter() - start}


def run(argv: list[str] | None = None) -> dict:
    """The ``stage1`` benchmark: the raw step, each full loop (with its loader figures) and lever (those not started
    by ``--time-limit`` skipped), each row's ratio to the raw step and MFU; prints the table and returns the
    figures (``--save``: also under ``checkpoints/benchmarks/``)."""
    args = parse(argv)
    setup_logging()
    started, cuda = time.perf_counter(), torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    compiled = cuda if args.compile is None else args.compile
    main = config(args, cuda, compiled, f"data.num_workers={args.workers}")  # data and prepare: the JPEG workers
    the_run = open_run(args, main)
    ensure_shards(main, the_run)
    backbone = OmegaConf.to_container(main.model.backbone, resolve=True)
    flops = train_flops(backbone, args, device)
    peak = args.peak_tflops * 1e12 if args.peak_tflops else (matmul_peak(device) if cuda else None)
    rows = {"raw/eager": {**timed(raw_step, backbone, args, device, False), "overrides": []}}
    if compiled:
        rows["raw/compiled"] = {**timed(raw_step, backbone, args, device, True), "overrides": []}
    skipped = []
    for name, extra in plans(args):
        if name.startswith("lever/") and time.perf_counter() - started > args.time_limit:
            skipped.append(name)
            continue
        console.rule(f"stage1 bench: {name}")
        cfg = config(args, cuda, compiled, *extra)
        rows[name] = {**timed(full_loop, cfg, the_run, name.replace("/", "-"), args, device), "overrides": extra}
        if name.startswith("full/"):
            rows[name].update(data_path(cfg, the_run, args, device))
    reference = rows["raw/compiled" if compiled else "raw/eager"]["img_s"]
    for row in rows.values():
        row["ratio_vs_raw"] = row["img_s"] / reference if row["img_s"] and reference else None
        row["mfu"] = row["img_s"] * flops / peak if row["img_s"] and peak else None
    figures = {"benchmark": "stage1", "date": dt.datetime.now().isoformat(timespec="seconds"),
               "device": torch.cuda.get_device_name(device) if cuda else platform.processor() or "cpu",
               "cpu_count": os.cpu_count(), "versions": versions(), "settings": {**vars(args), "compile": compiled},
               "run_dir": str(the_run.path), "prepare": the_run.metrics("prepare"), "backbone": backbone,
               "flops_per_image": flops, "peak_flops": peak,
               "peak_source": "--peak-tflops" if args.peak_tflops else ("bf16 matmul 8192^3" if cuda else None),
               "rows": rows, "levers": {name: LEVERS[name][0] for name in args.levers}, "skipped": skipped,
               "wall_s": time.perf_counter() - started}
    print_table(figures)
    if args.save:
        stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        atomic_write_json(Path(main.paths.checkpoints_dir) / "benchmarks" / f"stage1-{stamp}.json", figures)
    return figures


COLUMNS = [("img/s", "img_s", ",.0f"), ("x raw", "ratio_vs_raw", ".3f"), ("MFU", "mfu", ".1%"),
           ("peak GB", "peak_memory_gb", ".1f"), ("loader img/s", "loader_img_s", ",.0f"),
           ("+ device img/s", "to_device_img_s", ",.0f"), ("1st step s", "first_step_s", ".1f"),
           ("wall s", "wall_s", ".0f")]


def cells(row: dict) -> list[str]:
    """A row's table cells in :data:`COLUMNS` order, ``-`` where a figure is missing."""
    return ["-" if row.get(key) is None else format(row[key], fmt) for _, key, fmt in COLUMNS]


def print_table(figures: dict) -> None:
    """The rows as a rich table, then as Markdown (for docs/performance.md)."""
    from rich.table import Table

    s = figures["settings"]
    peak = f"{figures['peak_flops'] / 1e12:.0f} TFLOP/s ({figures['peak_source']})" if figures["peak_flops"] else "n/a"
    console.print(f"Stage-1 {s['model']} at {s['img_size']} px, batch {s['batch']}, compile={s['compile']}, "
                  f"{s['steps']} timed steps (windows of {s['window']}) after {s['warmup']} on {figures['device']}; "
                  f"{figures['flops_per_image'] / 1e9:.2f} GFLOP per training image; peak {peak}")
    table = Table("run", *(header for header, _, _ in COLUMNS))
    for name, row in figures["rows"].items():
        table.add_row(name, *cells(row))
    console.print(table, width=max(console.width, 150), crop=False)  # whole names in a captured log too
    for name, what in figures["levers"].items():
        console.print(f"  lever/{name}: {what}" + (" [skipped: --time-limit]" if f"lever/{name}" in figures["skipped"]
                                                   else ""))
    print("| run | " + " | ".join(header for header, _, _ in COLUMNS) + " |")
    print("|---" * (len(COLUMNS) + 1) + "|")
    for name, row in figures["rows"].items():
        print(f"| {name} | " + " | ".join(cells(row)) + " |")
