"""``task=apt``: the APT retrofit epoch for a trained Stage-1 ViT.

Wraps the run's Stage-1 classifier in :class:`~train.tiers.apt.module.APTModule`, fine-tunes it for ``apt.epochs``
(one by default), and reports, per validator level, MCC before (the original model), at the chosen thresholds before
the retrofit epoch, and after it, with a paired bootstrap interval of the test MCC change, plus the token reduction
on val, test and scikit-image's natural photographs. Writes ``apt.safetensors`` + ``.json``,
``test_predictions.parquet``, ``report.json``, ``patch_grid.png`` (the chosen patches) and the test figures
(``confusion.png``, ``levels.png``, ``reliability.png``) into ``<run>/apt/``.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import numpy as np
import torch
import torch.nn as nn
from hydra.utils import instantiate
from omegaconf import DictConfig
from pydantic import Field

from train.config_schema import Built, Group, Positive, Probability, Split
from train.data.photos import natural_photos
from train.data.transforms import EvalTransform
from train.metrics import paired_bootstrap_mcc, roadwork_prob
from train.models.apt import patch_entropy, token_counts
from train.models.apt.model import base_patch_size
from train.models.apt.plots import patch_grid
from train.models.apt.selection import grayscale_255
from train.models.saving import load_classifier, save_classifier
from train.predictions import read_predictions, write_predictions
from train.runs import Run
from train.tiers.apt.module import APTModule
from train.tiers.base import Fit, Outcome, register_tier
from train.tiers.classifier import ClassifierTier, fit_and_test, test_figures
from train.tiers.training import build_datamodule, resolve_ckpt_path
from train.utils.console import print_level_table

log = logging.getLogger(__name__)


@torch.no_grad()
def thresholds_from_quantiles(loader, patch: int, mean, std, quantiles: Sequence[float]) -> list[float]:
    """Entropy thresholds such that ``quantiles[k-1]`` of the ``patch * 2**k`` candidate patches fall below them."""
    entropies: list[list[torch.Tensor]] = [[] for _ in quantiles]
    for batch in loader:
        gray = grayscale_255(batch["image"], mean, std)
        for k in range(1, len(quantiles) + 1):
            entropies[k - 1].append(patch_entropy(gray, patch << k).flatten())
    out = []
    for q, values in zip(quantiles, entropies):
        values = torch.cat(values)
        if not len(values):
            raise ValueError(f"the images are too small for {patch}-pixel APT scales (no whole patch)")
        out.append(round(float(torch.quantile(values, float(q))), 4))
    return out


def token_summary(counts: torch.Tensor, base: int, bins: int = 10) -> dict:
    """Mean patch tokens, reduction versus ``base`` and a histogram of tokens per image."""
    counts = counts.float().cpu()
    hist, edges = np.histogram(counts.numpy(), bins=bins, range=(0, base))
    return {"n": len(counts), "mean_tokens": float(counts.mean()), "base_tokens": base,
            "reduction": float(1 - counts.mean() / base), "min": int(counts.min()), "max": int(counts.max()),
            "histogram": {"counts": hist.tolist(), "edges": [round(float(e), 1) for e in edges]}}


def _photo_inputs(spec: dict) -> tuple[list[str], torch.Tensor]:
    """scikit-image's photographs as level-0 validator queries at the model input."""
    photos = natural_photos()
    transform = EvalTransform(0, spec["img_size"], spec["mean"], spec["std"])
    names = list(photos)
    images = torch.stack([transform(photos[n], i) for i, n in enumerate(names)]) if names else torch.empty(0)
    return names, images


def _display(images: torch.Tensor, spec: dict) -> list[np.ndarray]:
    mean = torch.tensor(spec["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(spec["std"]).view(1, 3, 1, 1)
    pixels = ((images.float() * std + mean) * 255).clamp(0, 255).round().byte()
    return list(pixels.permute(0, 2, 3, 1).numpy())


def _paired(before: dict, after: dict, n_boot: int) -> dict:
    """Paired bootstrap of the test MCC change per level and over all levels (images resampled whole)."""
    out, pooled = {}, {"a": [], "b": [], "y": [], "g": []}
    for level in after:
        a, b = before[level], after[level]
        if not torch.equal(a["index"], b["index"]):
            raise RuntimeError(f"level {level}: before/after test predictions cover different samples")
        pa, pb = roadwork_prob(a["logits"].float()), roadwork_prob(b["logits"].float())
        out[f"L{level}"] = paired_bootstrap_mcc(pa, pb, b["label"], num_bootstraps=n_boot)
        for key, value in zip("abyg", (pa, pb, b["label"], b["index"])):
            pooled[key].append(value)
    cat = {k: torch.cat(v) for k, v in pooled.items()}
    out["all"] = paired_bootstrap_mcc(cat["a"], cat["b"], cat["y"], groups=cat["g"], num_bootstraps=n_boot)
    return out


class Settings(Group):
    """``apt``: the source classifier, the entropy thresholds (given or from quantiles), the retrofit epoch and what the
    report measures."""
    source: str
    thresholds: list[float] | None
    quantiles: list[Probability]
    threshold_split: Split
    epochs: Positive
    limit_train_batches: float | int | None
    bootstrap: Annotated[int, Field(ge=100)]  # the paired test-MCC interval needs >= 100 resamples
    grid_samples: Annotated[int, Field(ge=0)]
    module: Built


@dataclass
class Inputs:
    """What APT reads: the source stage's saved classifier and its input spec, the run's data, the ViT's patch size and
    the entropy thresholds."""
    stage1: Path  # the source stage's saved classifier
    spec: dict
    datamodule: object
    patch: int  # the ViT's patch size: APT's smallest
    thresholds: list[float]


@register_tier
class APTTier(ClassifierTier, name="apt", schema=Settings):
    """The APT retrofit of ``apt.source``'s classifier: content-adaptive patch sizes, one epoch of fine-tuning."""
    def needs(self, cfg: DictConfig) -> list[str]:
        return [cfg.apt.source]

    def trainer_overrides(self, cfg: DictConfig) -> dict:
        acfg = cfg.apt
        limit = {} if acfg.get("limit_train_batches") is None else {"limit_train_batches": acfg.limit_train_batches}
        # no inference mode: metric states made while evaluating before fit() must stay writable during it
        return {"max_epochs": acfg.epochs, "inference_mode": False, **limit}

    def inputs(self, cfg: DictConfig, run: Run, task_dir: Path) -> Inputs:
        acfg = cfg.apt
        stage1 = run.artifact(acfg.source, "model")
        vit, config = load_classifier(stage1)
        spec = config["input"]
        datamodule = build_datamodule(cfg, run, spec)
        patch = base_patch_size(vit)  # (no wrapper built just to read it)
        if acfg.thresholds is not None:
            thresholds = [float(t) for t in acfg.thresholds]
        else:
            loader = datamodule.loader(datamodule.dataset(acfg.threshold_split, 0))
            thresholds = thresholds_from_quantiles(loader, patch, spec["mean"], spec["std"], acfg.quantiles)
            log.info("apt thresholds %s bits: quantiles %s of the %s split's %s-pixel candidate patches",
                     thresholds, list(acfg.quantiles), acfg.threshold_split,
                     [patch << k for k in range(1, len(thresholds) + 1)])
        return Inputs(stage1, spec, datamodule, patch, thresholds)

    def module(self, cfg: DictConfig, run: Run, inputs: Inputs, task_dir: Path) -> APTModule:
        module = instantiate(cfg.apt.module, stage1=str(inputs.stage1), thresholds=inputs.thresholds,
                             class_weights=inputs.datamodule.class_weights)
        inputs.datamodule.sample_fields = module.net.selector()  # patch selection in the loader workers
        return module

    def fit(self, cfg: DictConfig, run: Run, trainer, module: APTModule, inputs: Inputs) -> Fit:
        """Validate and test the original model (base patches only), then the retrofit: validate at the chosen
        thresholds, fit, test the best epoch, validate again."""
        datamodule, net = inputs.datamodule, module.net
        with net.base_only():  # base patches only: exactly the Stage-1 model
            val_original = _metrics(trainer.validate(module, datamodule=datamodule, verbose=False))
            test_original, predictions_original = recorded_test(run, cfg.apt.source, module.levels["test"])
            if predictions_original is None:
                trainer.test(module, datamodule=datamodule, verbose=False)
                test_original = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("test/")}
                predictions_original = module.test_predictions
            base = {f"test/L{lv}/tokens": float(net.base_tokens) for lv in module.levels["test"]}
            test_original = {**base, "test/tokens": float(net.base_tokens), **test_original}
        val_zero_shot = _metrics(trainer.validate(module, datamodule=datamodule, verbose=False))
        best, last, test_after = fit_and_test(trainer, module, datamodule,
                                              resolve_ckpt_path(cfg.get("ckpt_path"), run.task_dir(self.name)))
        val_after = _metrics(trainer.validate(module, datamodule=datamodule, verbose=False))
        return Fit(trainer, module, best, last, test_after, extra={
            "val": {"original": val_original, "zero_shot": val_zero_shot, "after": val_after},
            "test_original": test_original, "predictions_original": predictions_original})

    def finish(self, cfg: DictConfig, run: Run, fit: Fit, inputs: Inputs, task_dir: Path) -> Outcome:
        acfg, module, spec = cfg.apt, fit.module, inputs.spec
        net, patch, thresholds = module.net, inputs.patch, inputs.thresholds
        test_original, test_after = fit.extra["test_original"], fit.metrics
        tokens = {f"test/L{lv}": token_summary(c, net.base_tokens) for lv, c in module.token_counts["test"].items()}
        tokens.update({f"val/L{lv}": token_summary(c, net.base_tokens) for lv, c in module.token_counts["val"].items()})
        names, photos = _photo_inputs(spec)
        if names:
            counts = token_counts(net.select(photos))
            tokens["natural_photos"] = {**token_summary(counts, net.base_tokens),
                                        "per_photo": dict(zip(names, counts.tolist()))}
        paired = _paired(fit.extra["predictions_original"], module.test_predictions, acfg.bootstrap)
        report = {"stage1": str(inputs.stage1), "thresholds": thresholds,
                  "patch_sizes": [patch << k for k in range(len(thresholds) + 1)],
                  "quantiles": None if acfg.thresholds is not None else list(acfg.quantiles),
                  "tokens": tokens, "paired_test_mcc": paired, "val": fit.extra["val"],
                  "test": {"original": test_original, "after": test_after}}

        samples = inputs.datamodule.dataset(acfg.threshold_split, 0)
        shown = torch.stack([samples[i]["image"] for i in range(min(acfg.grid_samples, len(samples)))])
        grid_images = torch.cat([shown, photos[:acfg.grid_samples]]) if names else shown
        titles = [f"{acfg.threshold_split} {i}" for i in range(len(shown))] + names[:acfg.grid_samples]
        patch_grid(task_dir / "patch_grid.png", _display(grid_images, spec), net.select(grid_images), patch, titles)

        weights, model_config = save_classifier(net.cpu(), task_dir / "apt", spec, source_checkpoint=fit.best,
                                                stage1=str(inputs.stage1))
        predictions = write_predictions(task_dir / "test_predictions.parquet", module.test_predictions)
        metrics = {**test_after, **{f"original/{k}": v for k, v in test_original.items()},
                   **{f"tokens/{k}/reduction": v["reduction"] for k, v in tokens.items()},
                   **{f"paired/{k}/{s}": v[s] for k, v in paired.items() for s in ("delta", "low", "high")}}
        _print_report(report, test_original, test_after)
        artifacts = {"model": weights, "model_config": model_config, "test_predictions": predictions}
        artifacts.update({k: v for k, v in (("best", fit.best), ("last", fit.last)) if v})
        figures = {"patch_grid": task_dir / "patch_grid.png",
                   **test_figures(module.test_predictions, test_after, "APT on test (before calibration)")}
        return Outcome(artifacts, metrics, report=report, figures=figures,
                       info={"test_precision": str(fit.trainer.precision)})

    def tokens(self, run: Run, model: nn.Module) -> dict[str, dict[str, float]] | None:
        """The measured tokens per image (from this stage's report), for the manifest."""
        if not hasattr(model, "apt_args") or not run.is_complete(self.name):
            return None
        tokens = json.loads(run.artifact(self.name, "report").read_text())["tokens"]
        return {name: {k: t[k] for k in ("mean_tokens", "reduction", "n")} for name, t in tokens.items()}


def recorded_test(run: Run, source: str, levels) -> tuple[dict | None, dict | None]:
    """The source stage's own test metrics and predictions (APT's base-patch model is exactly its model), when it
    recorded them at these levels: (metrics, ``{level: {"logits", "label", "index"}}``), else (None, None)."""
    if "test_predictions" not in run.read()["tasks"].get(source, {}).get("artifacts", {}):
        return None, None
    predictions = {lv: {k: torch.from_numpy(v) for k, v in cols.items()}
                   for lv, cols in read_predictions(run.artifact(source, "test_predictions")).items()}
    if sorted(predictions) != sorted(levels):
        return None, None
    return {k: float(v) for k, v in run.metrics(source).items() if k.startswith("test/")}, predictions


def _metrics(results: list[dict]) -> dict[str, float]:
    return {k.split("/dataloader_idx")[0]: float(v) for r in results for k, v in r.items()}


def _print_report(report: dict, original: dict, after: dict) -> None:
    rows = {}
    for key in original:  # test/L<level>/<metric> or test/<metric> (the mean over levels)
        parts = key.split("/")
        level = parts[1] if len(parts) == 3 else "mean"
        for tag, metrics in (("original", original), ("apt", after)):
            if key in metrics:
                rows[f"test/{level} {tag}/{parts[-1]}"] = metrics[key]
    print_level_table(rows, "APT retrofit: test metrics per level, original vs APT", "test",
                      ("mcc", "acc", "reward", "tokens"))
    for name, summary in report["tokens"].items():
        log.info("apt tokens %s: %.1f of %d patch tokens per image (%.1f%% fewer)", name, summary["mean_tokens"],
                 summary["base_tokens"], 100 * summary["reduction"])
    for name, p in report["paired_test_mcc"].items():
        log.info("apt test MCC %s: %.4f -> %.4f (change %+.4f, paired 95%% interval %+.4f to %+.4f)", name,
                 p["mcc_a"], p["mcc_b"], p["delta"], p["low"], p["high"])
