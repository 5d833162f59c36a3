"""APT vs the unmodified ViT on one device: tokens per image, inference and training throughput.

    python -m train.bench apt                                   # ViT-B/16 at 224 and 384, random weights
    python -m train.bench apt --sizes 224 --batch 256 --attention jagged flex padded --compile

The images are scikit-image's natural photographs and synthetic test scenes (both as level-0
validator queries at the model size), cycled to fill each batch, so a batch mixes token counts.
Inference and training (forward, backward, AdamW step) run under bf16 autocast. ``--select workers``
(the default, what ``task=apt`` does) makes each batch's patch selection and packing plan on the CPU,
as the data-loader workers do, so a timed APT step is the plan's copy to the device and the model;
the CPU cost of that selection per image is reported alongside. ``--select device`` times the
selection on the device inside the step instead. Medians over timed steps after warm-up, synchronised.
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from train.data.photos import natural_photos
from train.data.synthetic import SceneKnobs, render_scene
from train.data.transforms import EvalTransform
from train.models.apt import APTViT, token_counts
from train.models.backbones import create_backbone

MEAN = STD = (0.5, 0.5, 0.5)


def load_photos(path: str | None) -> dict[str, np.ndarray]:
    """scikit-image's photographs, or the same saved with ``numpy.savez`` (for machines without scikit-image)."""
    if path is None:
        return natural_photos()
    with np.load(path) as saved:
        return {name: saved[name] for name in saved.files}


def bench_images(size: int, photos: dict[str, np.ndarray], n_synthetic: int = 16) -> tuple[torch.Tensor, list[str]]:
    """Natural photos + synthetic scenes as model inputs at ``size`` (level-0 validator queries)."""
    transform = EvalTransform(0, size, MEAN, STD)
    sources = [(f"photo/{n}", im) for n, im in photos.items()]
    knobs = SceneKnobs(size=max(256, size))
    sources += [(f"synthetic/{s}", render_scene(1000 + s, int(s % 5 != 0), 1, knobs)[0].image)
                for s in range(n_synthetic)]
    return torch.stack([transform(im, i) for i, (_, im) in enumerate(sources)]), [n for n, _ in sources]


def _time(step, steps: int, warmup: int) -> float:
    """Median seconds per call of ``step`` (synchronised)."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for _ in range(warmup):
        step()
    sync()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def throughput(model: torch.nn.Module, images: torch.Tensor, train: bool, steps: int, warmup: int,
               forward=None) -> float:
    """Images per second of inference, or of training steps (forward + backward + AdamW); ``forward(images)``
    calls the model (default ``model(images)``)."""
    labels = torch.randint(0, 2, (len(images),), device=images.device)
    forward = forward or model
    model.train(train)
    if not train:
        def step():
            with torch.no_grad(), torch.autocast(images.device.type, torch.bfloat16):
                forward(images)
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=images.is_cuda)

        def step():
            with torch.autocast(images.device.type, torch.bfloat16):
                loss = torch.nn.functional.cross_entropy(forward(images).float(), labels)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    return len(images) / _time(step, steps, warmup)


@torch.no_grad()
def packing_error(apt: APTViT, images: torch.Tensor, n: int = 32) -> float:
    """fp32 max |logit difference| of the packed batch vs each image alone, over the first ``n`` images."""
    images = images[:n]
    masks = apt.select(images)
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.autocast(images.device.type, torch.bfloat16, enabled=apt.attention == "varlen"):  # bf16-only kernel
            packed = apt(images, masks).float()
            alone = torch.cat([apt(images[i:i + 1], [m[i:i + 1] for m in masks]) for i in range(len(images))]).float()
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    return float((packed - alone).abs().max())


def selection_cost(apt: APTViT, images: torch.Tensor, repeats: int = 3) -> dict:
    """CPU milliseconds, on one thread, of one image's selection (a loader worker's share) and of a batch's plan."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        selector, cpu = apt.selector(), images.cpu()
        per_image = min(_time(lambda: [selector(im) for im in cpu], 1, 1) for _ in range(repeats)) / len(cpu)
        keep = torch.stack([selector(im)["apt_keep"] for im in cpu])
        plan = min(_time(lambda: apt.plan(keep=keep), 1, 1) for _ in range(repeats))
    finally:
        torch.set_num_threads(threads)
    return {"select_ms_per_image": 1000 * per_image, "plan_ms_per_batch": 1000 * plan}


def measure(name: str, size: int, batch: int, thresholds: list[float], attention: list[str], compile: bool,
            steps: int, warmup: int, device: torch.device, photos: dict[str, np.ndarray],
            select: str = "workers") -> list[dict]:
    """The original ViT ``name`` and APT with each ``attention`` backend at ``size``, one row each (img/s of
    inference and training; for APT its ratios to the original and packing error, or the error it failed with),
    printed as a table; every row also carries the token counts and the selection's CPU cost."""
    pool, names = bench_images(size, photos)
    images = pool[torch.arange(batch) % len(pool)].to(device)
    vit = create_backbone(name, img_size=size).to(device)
    apt = APTViT(vit, thresholds, MEAN, STD).to(device)
    apt.eval()
    per_image = token_counts(apt.select(pool.to(device))).cpu()
    base = apt.base_tokens
    photos = torch.tensor([n.startswith("photo/") for n in names])
    tokens = {"base": base, "all": float(per_image.float().mean()),
              "photos": float(per_image[photos].float().mean()) if photos.any() else None,
              "synthetic": float(per_image[~photos].float().mean()),
              "batch_mean": float(token_counts(apt.select(images)).float().mean())}
    cost = selection_cost(apt, images)
    plan = apt.plan(images.cpu()) if select == "workers" else None  # made by the loader, before the step

    def forward(x, model=apt):
        return model(x, plan=plan)

    rows = []
    original = torch.compile(vit) if compile else vit
    ref = {"infer": throughput(original, images, False, steps, warmup),
           "train": throughput(original, images, True, steps, warmup)}
    rows.append({"model": "original", "size": size, "tokens": base, **ref})
    for backend in attention:
        apt.attention = backend
        apt.eval()
        error = packing_error(apt, images)
        if compile:
            apt.compile_parts()
        try:
            got = {"infer": throughput(apt, images, False, steps, warmup, forward),
                   "train": throughput(apt, images, True, steps, warmup, forward)}
        except Exception as e:  # noqa: BLE001 - report a backend that fails here and go on
            rows.append({"model": f"apt/{backend}", "size": size, "error": f"{type(e).__name__}: {e}"[:300]})
            continue
        rows.append({"model": f"apt/{backend}", "size": size, "tokens": tokens["batch_mean"], **got,
                     "packed_vs_alone_max_abs_diff": error,
                     "infer_ratio": got["infer"] / ref["infer"], "train_ratio": got["train"] / ref["train"]})
    print(f"\nViT {name} at {size}px, batch {batch}, thresholds {thresholds}, compile={compile}: patch tokens per "
          f"image {base} -> {tokens['all']:.1f} ({100 * (1 - tokens['all'] / base):.1f}% fewer; natural photos "
          f"{tokens['photos'] if tokens['photos'] is None else round(tokens['photos'], 1)}, synthetic "
          f"{tokens['synthetic']:.1f}; this batch {tokens['batch_mean']:.1f})")
    print(f"patch selection on {select}; on one CPU thread it costs {cost['select_ms_per_image']:.2f} ms per image "
          f"(a loader worker's share) + {cost['plan_ms_per_batch']:.2f} ms per batch for the packing plan")
    print(f"{'model':<14}{'tokens':>8}{'infer img/s':>13}{'ratio':>7}{'train img/s':>13}{'ratio':>7}"
          f"{'packed vs alone':>17}")
    for r in rows:
        if "error" in r:
            print(f"{r['model']:<14} failed: {r['error']}")
            continue
        print(f"{r['model']:<14}{r['tokens']:>8.1f}{r['infer']:>13.0f}{r.get('infer_ratio', 1):>7.2f}"
              f"{r['train']:>13.0f}{r.get('train_ratio', 1):>7.2f}"
              f"{r['packed_vs_alone_max_abs_diff'] if 'packed_vs_alone_max_abs_diff' in r else float('nan'):>17.1e}")
    del vit, apt, original
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return [{**r, "token_summary": tokens, "batch": batch, "compile": compile, "select": select, **cost}
            for r in rows]


def run(argv: list[str] | None = None) -> dict:
    """The ``apt`` benchmark: :func:`measure` at each of ``--sizes``; the device, torch version and all rows."""
    parser = argparse.ArgumentParser(prog="python -m train.bench apt")
    parser.add_argument("--model", default="vit_base_patch16_224")
    parser.add_argument("--sizes", type=int, nargs="+", default=[224, 384])
    parser.add_argument("--batch", type=int, nargs="+", default=[128, 64], help="one per size (or one for all)")
    parser.add_argument("--thresholds", type=float, nargs="+", default=[5.5, 4.5])
    parser.add_argument("--attention", nargs="+", default=["varlen", "jagged", "flex", "padded"])
    parser.add_argument("--compile", action="store_true", help="torch.compile the ViT and APT's blocks")
    parser.add_argument("--select", choices=["workers", "device"], default="workers",
                        help="where APT's patch selection runs: on the CPU before the step (as in task=apt's "
                             "loader workers) or on the device inside it")
    parser.add_argument("--photos", help="an .npz of photos to use instead of scikit-image's")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = True
    photos = load_photos(args.photos)
    rows = []
    for i, size in enumerate(args.sizes):
        batch = args.batch[min(i, len(args.batch) - 1)]
        rows += measure(args.model, size, batch, args.thresholds, args.attention, args.compile, args.steps,
                        args.warmup, device, photos, args.select)
    device_name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    return {"device": device_name, "torch": torch.__version__, "rows": rows}
