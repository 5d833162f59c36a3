"""The project's validator levels against the subnet's own transform code, on a run's test images:

    git clone https://github.com/natixnetwork/streetvision-subnet /tmp/subnet   # outside the repository
    python -m train.bench validator --subnet /tmp/subnet --run checkpoints/<run> [--pixels 300]

1. Pixel parity, per level: ``--pixels`` test images go through the subnet's per-level pipeline (its RNGs seeded per
   image); its draws (level, angle, crop, distortion levels; GNC's noise from a seed both share) replay through
   :func:`train.data.validator.render_query`. Reported: the largest and mean absolute difference of the float
   tensors, the fraction of identical uint8 pixels and of identical wire JPEGs.
2. The same model under both: every test image at every level, once as the subnet makes the query (its own random
   draws) and once as the project does (``ValidatorQuery``, evaluation seed 0), each sent as the wire JPEG, decoded
   and scored by the run's exported Stage-1 (calibrated P(roadwork) at 0.5): MCC and accuracy per level, and the
   MCC difference with a paired bootstrap interval over images (the draws are independent, so it is sampling noise
   unless the interval excludes 0).

The subnet's code is imported from the checkout given, never from this repository (it is not vendored).
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import random
import sys
import types
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from torchmetrics.functional.classification import binary_accuracy, binary_matthews_corrcoef

from train.data.datamodule import ImageDataset
from train.data.images import decode_rgb
from train.data.transforms import ModelInput, ValidatorQuery
from train.data.validator import LEVELS, QUERY_SIZE, SUBNET_COMMIT, QueryDraw, render_query, wire_jpeg
from train.export import Bundle
from train.metrics import paired_bootstrap_mcc
from train.runs import Run
from train.utils.console import track

BUILDERS = {0: "get_base_transforms", 1: "get_random_augmentations", 2: "get_random_augmentations_medium",
            3: "get_random_augmentations_hard"}


def parse(argv: list[str] | None) -> argparse.Namespace:
    """The ``validator`` benchmark's command line."""
    parser = argparse.ArgumentParser(prog="python -m train.bench validator", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--subnet", required=True, help="a checkout of natixnetwork/streetvision-subnet")
    parser.add_argument("--run", required=True, help="a run folder with data, export (Stage-1) stages")
    parser.add_argument("--pixels", type=int, default=300, help="test images in the pixel comparison")
    parser.add_argument("--model", default="stage1", help="the bundle's classifier scored under both")
    parser.add_argument("--seed", type=int, default=0, help="seeds the subnet's draws in the model comparison")
    parser.add_argument("--draws", type=int, default=2000, help="bootstrap resamples of the MCC difference")
    return parser.parse_args(argv)


def load_subnet(checkout: Path) -> types.ModuleType:
    """``natix/utils/image_transforms.py`` of the checkout, with the one config value it imports."""
    path = checkout / "natix" / "utils" / "image_transforms.py"
    if not path.is_file():
        raise SystemExit(f"{path} not found: --subnet must be a checkout of natixnetwork/streetvision-subnet")
    for name in ("natix", "natix.validator"):
        sys.modules.setdefault(name, types.ModuleType(name))
    config = types.ModuleType("natix.validator.config")
    config.TARGET_IMAGE_SIZE = (QUERY_SIZE, QUERY_SIZE)
    sys.modules["natix.validator.config"] = config
    spec = importlib.util.spec_from_file_location("subnet_image_transforms", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def subnet_query(subnet, image: np.ndarray, level: int, seed: int, noise_seed: int) -> tuple[torch.Tensor, QueryDraw]:
    """The subnet's tensor for ``image`` at ``level`` (its RNGs seeded with ``seed``; GNC's noise drawn from
    ``noise_seed`` as the project draws it) and the draws it made."""
    random.seed(seed), np.random.seed(seed % 2 ** 32), torch.manual_seed(seed)
    randn = np.random.randn
    np.random.randn = lambda *shape: np.random.default_rng(noise_seed).standard_normal(shape)
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # its crop class prints on construction
            pipeline = getattr(subnet, BUILDERS[level])()
            out = pipeline(subnet.Image.fromarray(image))
    finally:
        np.random.randn = randn
    params = pipeline.params
    if level == 0:
        return out, QueryDraw(0)
    distortions = tuple((t.distortion_type, int(t.level)) for t in pipeline.transforms
                        if isinstance(t, subnet.ApplyDeeperForensicsDistortion))
    crop = tuple(int(v) for v in params["RandomResizedCropWithParams"]["crop_params"])
    return out, QueryDraw(level, float(params["RandomRotationWithParams"]["angle"]), crop, distortions, noise_seed)


def pixel_parity(subnet, images: ImageDataset, n: int) -> dict:
    """Per level, the subnet's query of each of the first ``n`` images against
    :func:`~train.data.validator.render_query` replaying its draws: the largest and mean absolute difference and
    the fractions of identical uint8 pixels and of identical wire JPEGs."""
    figures = {}
    for level in LEVELS:
        max_diff, mean_diff, same_pixels, same_jpeg = 0.0, [], [], []
        for i in range(min(n, len(images))):
            image = images.image(i)
            theirs, draw = subnet_query(subnet, image, level, seed=1000 * level + i, noise_seed=i)
            ours = render_query(image, draw)
            diff = (theirs - ours).abs()
            max_diff, mean_diff = max(max_diff, float(diff.max())), mean_diff + [float(diff.mean())]
            same_pixels.append(float(((theirs * 255).byte() == (ours * 255).byte()).float().mean()))
            same_jpeg.append(wire_jpeg(theirs) == wire_jpeg(ours))
        figures[f"L{level}"] = {"images": len(same_jpeg), "max_abs_diff": max_diff,
                                "mean_abs_diff": float(np.mean(mean_diff)),
                                "identical_pixels": float(np.mean(same_pixels)),
                                "identical_jpeg": float(np.mean(same_jpeg))}
    return figures


def model_parity(subnet, images: ImageDataset, labels: np.ndarray, bundle: Bundle, model: str, seed: int,
                 draws: int) -> dict:
    """Per level, ``model`` of ``bundle`` on every image's query as the subnet makes it and as the project does
    (each sent as the wire JPEG): MCC and accuracy of both and their paired bootstrap MCC difference."""
    classifier = bundle.classifier(model)
    spec = bundle.manifest.models[model].input
    model_input = ModelInput(spec.img_size, spec.mean, spec.std)
    target = torch.tensor(np.asarray(labels)).long()
    figures = {}
    for level in LEVELS:
        ours_query, probs = ValidatorQuery(level, seed=0), {"subnet": [], "project": []}
        rng = np.random.default_rng([seed, level])
        for i in track(range(len(images)), f"validator parity: test L{level}", len(images), "images"):
            image = images.image(i)
            seeds = rng.integers(2 ** 62, size=2)
            theirs, _ = subnet_query(subnet, image, level, seed=int(seeds[0]), noise_seed=int(seeds[1]))
            for arm, jpeg in (("subnet", wire_jpeg(theirs)), ("project", ours_query.render(image, i))):
                pixels = model_input(decode_rgb(jpeg, where=f"test {i}"))[None].numpy()
                probs[arm].append(float(classifier.probs(pixels)[0]))
        figures[f"L{level}"] = {arm: {"mcc": float(binary_matthews_corrcoef(torch.tensor(p), target)),
                                      "acc": float(binary_accuracy(torch.tensor(p), target))}
                                for arm, p in probs.items()}
        figures[f"L{level}"]["mcc_difference"] = paired_bootstrap_mcc(  # per image: the same image under both
            torch.tensor(probs["subnet"]), torch.tensor(probs["project"]), target, num_bootstraps=draws)
    return figures


def run(argv: list[str] | None = None) -> dict:
    """The ``validator`` benchmark: pixel and model parity of the ``--subnet`` checkout with the project on the
    test images of ``--run``, printed per level."""
    args = parse(argv)
    subnet = load_subnet(Path(args.subnet))
    run_ = Run.open(args.run)
    index = pq.read_table(run_.artifact("data", "index"))
    test = index.filter(pc.equal(index.column("split"), "test"))
    images = ImageDataset(test, transform=None, decode_side=None)
    figures = {"subnet_commit": SUBNET_COMMIT, "run": str(run_.path),
               "pixels": pixel_parity(subnet, images, args.pixels)}
    for level, f in figures["pixels"].items():
        print(f"{level}: {f['images']} images, max |diff| {f['max_abs_diff']:.2e}, mean |diff| "
              f"{f['mean_abs_diff']:.2e}, identical uint8 pixels {f['identical_pixels']:.4f}, "
              f"identical wire JPEGs {f['identical_jpeg']:.3f}")
    figures["model"] = model_parity(subnet, images, images.labels, Bundle(run_.path / "export"), args.model,
                                    args.seed, args.draws)
    for level, f in figures["model"].items():
        s, p, d = f["subnet"], f["project"], f["mcc_difference"]
        print(f"{level}: subnet's code MCC {s['mcc']:.4f} acc {s['acc']:.4f} | project MCC {p['mcc']:.4f} "
              f"acc {p['acc']:.4f} | difference MCC {d['delta']:+.4f} [{d['low']:+.4f}, {d['high']:+.4f}] "
              f"acc {p['acc'] - s['acc']:+.4f}")
    return figures
