"""``task=apt``: the APT retrofit epoch for a trained Stage-1 ViT.

Wraps the run's Stage-1 classifier in :class:`~train.models.apt.APTViT` (content-adaptive patch
sizes, packed variable-length attention), fine-tunes it for ``apt.epochs`` (one by default), and
reports, per validator level, MCC before (the original model), at the chosen thresholds before the
retrofit epoch, and after it, with a paired bootstrap interval of the test MCC change, plus the
token reduction on val, test and scikit-image's natural photographs. Writes ``apt.safetensors`` +
``.json``, ``test_predictions.parquet``, ``report.json``, ``patch_grid.png`` (the chosen patches) and the test
figures (``confusion.png``, ``levels.png``, ``reliability.png``) into ``<run>/apt/``.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn as nn
from hydra.utils import instantiate
from omegaconf import DictConfig
from torchmetrics.aggregation import CatMetric

from train.data.photos import natural_photos
from train.data.transforms import EvalTransform
from train.metrics import paired_bootstrap_mcc, roadwork_prob
from train.models.apt import APTViT, PatchSelector, TokenPlan, patch_entropy, token_counts
from train.models.apt.model import base_patch_size
from train.models.apt.plots import patch_grid
from train.models.apt.selection import grayscale_255
from train.models.saving import load_classifier, save_classifier
from train.predictions import read_predictions, write_predictions
from train.runs import Run
from train.tasks.registry import register_task
from train.tiers.classifier import ClassifierModule, fit_and_test, test_figures
from train.tiers.training import build_datamodule, build_trainer, resolve_ckpt_path
from train.utils.console import print_level_table
from train.utils.files import atomic_write_json
from train.utils.loggers import publish_figures

log = logging.getLogger(__name__)
TRAIN_MODES = ("all", "new")


class APTModule(ClassifierModule):
    """Stage-1 (a saved classifier at ``stage1``) wrapped by APT; counts the patch tokens of every evaluated image.

    ``train="new"`` trains only the multi-scale embedding's new layers; ``"all"`` everything.
    """

    def __init__(self, stage1: str, thresholds: Sequence[float], optimizer: Callable | None = None,
                 scheduler: Callable | None = None, attention: str = "auto", train: str = "all",
                 label_smoothing: float = 0.0, class_weights: torch.Tensor | None = None, mixup: dict | None = None,
                 layer_decay: float | None = None, grad_checkpointing: bool = False, compile: bool = False,
                 val_levels: Sequence[int] = (0,), test_levels: Sequence[int] = (0, 1, 2, 3), bootstrap: int = 1000):
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer", "scheduler", "class_weights"])
        if train not in TRAIN_MODES:
            raise ValueError(f"apt.module.train={train!r}; allowed: {list(TRAIN_MODES)}")
        vit, config = load_classifier(stage1)
        self.input_spec = config["input"]
        self.net = APTViT(vit.train(), thresholds, self.input_spec["mean"], self.input_spec["std"], attention)
        if grad_checkpointing:
            self.net.set_grad_checkpointing(True)
        if compile:
            self.net.compile_parts()
        if train == "new":
            self.net.requires_grad_(False)
            self.net.embed.requires_grad_(True)
        self.setup_classifier(optimizer, scheduler, label_smoothing, class_weights, mixup, layer_decay,
                              val_levels, test_levels, bootstrap)
        self.tokens = nn.ModuleDict({split: nn.ModuleList([CatMetric() for _ in self.levels[split]])
                                     for split in ("val", "test")})
        self.token_counts: dict[str, dict[int, torch.Tensor]] = {"val": {}, "test": {}}
        self._counts: torch.Tensor | None = None

    def forward(self, images: torch.Tensor, plan: TokenPlan | None = None) -> torch.Tensor:
        if plan is None or self.net.base_only_active:
            plan = self.net.plan(images)
        self._counts = plan.patch_tokens
        return self.net(images, plan=plan)

    def logits(self, batch: dict) -> torch.Tensor:
        return self(batch["image"], batch.get("apt_plan"))

    def on_before_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        """The loader workers' selection (:meth:`APTViT.selector`) -> the batch's packing plan, on the host."""
        keep = batch.pop(PatchSelector.field, None)
        if keep is not None:
            batch["apt_plan"] = self.net.plan(keep=keep)
        return batch

    def transfer_batch_to_device(self, batch: dict, device: torch.device, dataloader_idx: int) -> dict:
        plan = batch.pop("apt_plan", None)
        batch = super().transfer_batch_to_device(batch, device, dataloader_idx)
        if plan is not None:
            batch["apt_plan"] = plan.to(device, non_blocking=True)
        return batch

    def _eval_step(self, split: str, batch: dict, dataloader_idx: int) -> torch.Tensor:
        logits = super()._eval_step(split, batch, dataloader_idx)
        self.tokens[split][dataloader_idx].update(self._counts.float())
        return logits

    def _log_levels(self, split: str) -> None:
        super()._log_levels(split)
        per_level = {}
        for level, store in zip(self.levels[split], self.tokens[split]):
            per_level[level] = store.compute().cpu()
            store.reset()
            self.log(f"{split}/L{level}/tokens", per_level[level].mean())
        self.log(f"{split}/tokens", torch.cat(list(per_level.values())).mean())
        self.token_counts[split] = per_level


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


@register_task("apt", ranks="one", needs=lambda cfg: [cfg.apt.source])
def run_apt(cfg: DictConfig, run: Run) -> dict:
    acfg, task_dir = cfg.apt, run.task_dir("apt")
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
    module = instantiate(acfg.module, stage1=str(stage1), thresholds=thresholds,
                         class_weights=datamodule.class_weights)
    net = module.net
    datamodule.sample_fields = net.selector()  # patch selection in the loader workers, off the training loop
    # no inference mode: metric states made while evaluating before fit() must stay writable during it
    limit = {} if acfg.get("limit_train_batches") is None else {"limit_train_batches": acfg.limit_train_batches}
    trainer = build_trainer(cfg, task_dir, max_epochs=acfg.epochs, inference_mode=False, **limit)

    with net.base_only():  # base patches only: exactly the Stage-1 model
        val_original = _metrics(trainer.validate(module, datamodule=datamodule, verbose=False))
        test_original, predictions_original = recorded_test(run, acfg.source, module.levels["test"])
        if predictions_original is None:
            trainer.test(module, datamodule=datamodule, verbose=False)
            test_original = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("test/")}
            predictions_original = module.test_predictions
        base = {f"test/L{lv}/tokens": float(net.base_tokens) for lv in module.levels["test"]}
        test_original = {**base, "test/tokens": float(net.base_tokens), **test_original}
    val_zero_shot = _metrics(trainer.validate(module, datamodule=datamodule, verbose=False))
    best, last, test_after = fit_and_test(trainer, module, datamodule,
                                          resolve_ckpt_path(cfg.get("ckpt_path"), task_dir))
    val_after = _metrics(trainer.validate(module, datamodule=datamodule, verbose=False))

    tokens = {f"test/L{lv}": token_summary(c, net.base_tokens) for lv, c in module.token_counts["test"].items()}
    tokens.update({f"val/L{lv}": token_summary(c, net.base_tokens) for lv, c in module.token_counts["val"].items()})
    names, photos = _photo_inputs(spec)
    photo_masks = net.select(photos) if names else []
    if names:
        counts = token_counts(photo_masks)
        tokens["natural_photos"] = {**token_summary(counts, net.base_tokens),
                                    "per_photo": dict(zip(names, counts.tolist()))}
    paired = _paired(predictions_original, module.test_predictions, acfg.bootstrap)
    report = {"stage1": str(stage1), "thresholds": thresholds, "patch_sizes": [patch << k for k in range(len(thresholds) + 1)],
              "quantiles": None if acfg.thresholds is not None else list(acfg.quantiles),
              "tokens": tokens, "paired_test_mcc": paired,
              "val": {"original": val_original, "zero_shot": val_zero_shot, "after": val_after},
              "test": {"original": test_original, "after": test_after}}
    atomic_write_json(task_dir / "report.json", report)

    samples = datamodule.dataset(acfg.threshold_split, 0)
    shown = torch.stack([samples[i]["image"] for i in range(min(acfg.grid_samples, len(samples)))])
    grid_images = torch.cat([shown, photos[:acfg.grid_samples]]) if names else shown
    titles = [f"{acfg.threshold_split} {i}" for i in range(len(shown))] + names[:acfg.grid_samples]
    patch_grid(task_dir / "patch_grid.png", _display(grid_images, spec), net.select(grid_images), patch, titles)
    figures = publish_figures(trainer.loggers, task_dir, {
        "patch_grid": task_dir / "patch_grid.png",
        **test_figures(module.test_predictions, test_after, "APT on test (before calibration)")}, trainer.global_step)

    weights, model_config = save_classifier(net.cpu(), task_dir / "apt", spec, source_checkpoint=best,
                                            stage1=str(stage1))
    predictions = write_predictions(task_dir / "test_predictions.parquet", module.test_predictions)
    metrics = {**test_after, **{f"original/{k}": v for k, v in test_original.items()},
               **{f"tokens/{k}/reduction": v["reduction"] for k, v in tokens.items()},
               **{f"paired/{k}/{s}": v[s] for k, v in paired.items() for s in ("delta", "low", "high")}}
    _print_report(report, test_original, test_after)
    artifacts = {"model": weights, "model_config": model_config, "test_predictions": predictions,
                 "report": task_dir / "report.json", **figures}
    artifacts.update({k: v for k, v in (("best", best), ("last", last)) if v})
    run.record("apt", artifacts=artifacts, metrics=metrics, test_precision=str(trainer.precision))
    return metrics


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
