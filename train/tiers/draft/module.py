"""The draft's LightningModule: a small student distilled from the frozen, calibrated teacher (EAGLE / SpecVLM loss),
and the train split with the teacher's outputs written once (``draft.teacher_outputs=cache``)."""
from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file
from torch.utils.data import ConcatDataset, Dataset
from torchmetrics import MetricCollection
from torchmetrics.classification import BinaryAccuracy, BinaryMatthewsCorrCoef

from train.metrics import roadwork_prob
from train.models.backbones import feature_dim, pooled_features
from train.models.distill import DistillationLoss, FeatureProjection, TeacherMemo
from train.models.draft import StudentOutput, build_student, draft_classifier, fold_teacher_head
from train.models.draft import init_from_teacher as init_student
from train.models.saving import load_classifier
from train.optim import with_schedule
from train.predictions import predict_split
from train.utils.precision import precision_autocast, resolve_precision

log = logging.getLogger(__name__)
HEADS = ("teacher", "own")  # teacher: logits = the frozen teacher's head on the projected features (EAGLE)


def agreement_metrics() -> MetricCollection:
    """The student's answers against the teacher's (``agree_*``)."""
    return MetricCollection({"agree_mcc": BinaryMatthewsCorrCoef(), "agree_acc": BinaryAccuracy()})


class DraftModule(pl.LightningModule):
    """A student (:func:`~train.models.draft.build_student`) learning the frozen teacher at ``teacher`` (a saved,
    calibrated classifier). Logs agreement with the teacher (``agree_mcc``, the selection metric ``val/mcc``) and
    accuracy against the labels per validator level, and the mean token budget of an elastic student.

    The teacher's outputs on validation and test queries are remembered (:class:`TeacherMemo`): those inputs come
    back every epoch. ``remember_train``: its outputs on training inputs too, for a sampler that repeats each
    sample's augmentation draws (``draft.augment_draws``): the teacher then runs on each draw once."""

    def __init__(self, teacher: str, student: dict, optimizer: Callable, scheduler: Callable | None = None,
                 elastic: dict | None = None, loss: dict | None = None, budget_cost: float = 0.0, head: str = "teacher",
                 init_from_teacher: bool = True, teacher_precision: str = "auto", remember_train: bool = False,
                 val_levels: Sequence[int] = (0,), test_levels: Sequence[int] = (0, 1, 2, 3)):
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        self.teacher, config = load_classifier(teacher)
        self.teacher.requires_grad_(False).eval()
        self.input_spec = config["input"]
        self.net = build_student(student, elastic, self.input_spec["mean"], self.input_spec["std"])
        if init_from_teacher:
            copied = init_student(self.net, self.teacher)
            log.info("draft student initialised from the teacher: %d tensors copied (%s)", len(copied),
                     ", ".join(sorted({n.split(".")[0] for n in copied})) or "none matched")
        self.projection = FeatureProjection(self.net.num_features, feature_dim(self.teacher))
        self.criterion = DistillationLoss(**(loss or {}))
        self.optimizer, self.scheduler, self.budget_cost = optimizer, scheduler, budget_cost
        resolve_precision(teacher_precision, "cpu")  # an unknown name fails here, not in the first step
        self.teacher_precision = teacher_precision
        if head not in HEADS:
            raise ValueError(f"draft.module.head={head!r}; allowed: {list(HEADS)}")
        self.head = head
        self.levels = {"val": list(val_levels), "test": list(test_levels)}
        self.agreement = nn.ModuleDict({s: nn.ModuleList([agreement_metrics() for _ in lv])
                                        for s, lv in self.levels.items()})
        self.label_mcc = nn.ModuleDict({s: nn.ModuleList([BinaryMatthewsCorrCoef() for _ in lv])
                                       for s, lv in self.levels.items()})
        self.budgets: dict[str, list[torch.Tensor]] = {"val": [], "test": []}
        self.memos = {"train": TeacherMemo() if remember_train else None, "val": TeacherMemo(), "test": TeacherMemo()}
        self.strict_loading = False  # checkpoints leave the frozen teacher out (it is reloaded from its file)

    def train(self, mode: bool = True):
        """``nn.Module.train``, the frozen teacher kept in eval mode; returns ``self``."""
        super().train(mode)
        self.teacher.eval()  # frozen: no dropout, no batch-norm updates
        return self

    @torch.no_grad()
    def teach(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The frozen teacher's (logits, pooled features) at ``teacher_precision``: the teacher's forward is most of a
        step's cost, and its targets need no more precision than the student learns to."""
        with precision_autocast(images.device, self.teacher_precision):
            logits, features = pooled_features(self.teacher, images)
        return logits.float(), features.float()

    def targets(self, batch: dict, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The teacher's (logits, pooled features) on ``batch``, from its memo for the inputs seen before."""
        memo = self.memos[split]
        return self.teach(batch["image"]) if memo is None else memo(batch["index"], batch["image"], self.teach)

    def student(self, images: torch.Tensor) -> tuple[StudentOutput, torch.Tensor, torch.Tensor]:
        """(the student's output, its logits, its features projected into the teacher's space)."""
        out = self.net(images)
        projected = self.projection(out.features)
        logits = self.teacher.get_classifier()(projected) if self.head == "teacher" else out.logits
        return out, logits, projected

    def student_classifier(self) -> nn.Module:
        """The trained student as a plain classifier, the teacher's head folded into its own when shared."""
        net = draft_classifier(self.net)
        if self.head == "teacher":
            fold_teacher_head(net.get_classifier(), self.projection.proj, self.teacher.get_classifier())
        return net

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        images = batch["image"]
        if "teacher_logits" in batch:
            t_logits, t_features = batch["teacher_logits"], batch["teacher_features"]
        else:
            t_logits, t_features = self.targets(batch, "train")
        out, logits, projected = self.student(images)
        losses = self.criterion(logits, t_logits.float(), projected, t_features.float(), batch["label"])
        loss = losses["loss"]
        if out.expected_budget is not None and self.budget_cost:
            loss = loss + self.budget_cost * out.expected_budget
            self.log("train/budget", out.expected_budget.detach(), batch_size=len(images))
        self.log_dict({f"train/{k}": v for k, v in losses.items() if k != "loss"}, batch_size=len(images))
        self.log("train/loss", loss, batch_size=len(images))
        return loss

    def _eval_step(self, split: str, batch: dict, idx: int) -> None:
        t_logits, _ = self.targets(batch, split)
        out, logits, _ = self.student(batch["image"])
        student, teacher = roadwork_prob(logits.float()), roadwork_prob(t_logits.float())
        self.agreement[split][idx].update(student, (teacher > 0.5).long())
        self.label_mcc[split][idx].update(student, batch["label"])
        if out.budget_index is not None:
            self.budgets[split].append(self.net.budget_fractions()[out.budget_index.cpu()])

    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step("val", batch, dataloader_idx)

    def test_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step("test", batch, dataloader_idx)

    def _log_levels(self, split: str) -> None:
        per_level = {}
        for level, agree, acc in zip(self.levels[split], self.agreement[split], self.label_mcc[split]):
            values = {k: float(v) for k, v in agree.compute().items()} | {"mcc_label": float(acc.compute())}
            agree.reset()
            acc.reset()
            per_level[level] = values
            self.log_dict({f"{split}/L{level}/{k}": v for k, v in values.items()}, add_dataloader_idx=False)
        for key in ("agree_mcc", "agree_acc", "mcc_label"):
            self.log(f"{split}/{key}", float(np.mean([v[key] for v in per_level.values()])), add_dataloader_idx=False)
        self.log(f"{split}/mcc", float(np.mean([v["agree_mcc"] for v in per_level.values()])), prog_bar=True,
                 add_dataloader_idx=False)  # model selection: agreement with the teacher
        if self.budgets[split]:
            self.log(f"{split}/budget", torch.cat(self.budgets[split]).float().mean(), add_dataloader_idx=False)
            self.budgets[split] = []

    def on_validation_epoch_end(self) -> None:
        self._log_levels("val")

    def on_test_epoch_end(self) -> None:
        self._log_levels("test")

    def configure_optimizers(self):
        params = [p for n, p in self.named_parameters() if p.requires_grad and not n.startswith("teacher.")]
        return with_schedule(self, self.optimizer(params), self.scheduler)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if not k.startswith("teacher.")}


class CachedTeacher(Dataset):
    """The train split as validator-level queries, each sample with the teacher's cached logits and features."""

    def __init__(self, datasets: list[Dataset], cache: dict[str, torch.Tensor]):
        self.data = ConcatDataset(datasets)
        self.logits, self.features = cache["logits"], cache["features"]
        if len(self.logits) != len(self.data):
            raise ValueError(f"the teacher cache has {len(self.logits)} rows for {len(self.data)} samples: "
                             "delete it to have it rewritten")

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> dict:
        return {**self.data[i], "teacher_logits": self.logits[i], "teacher_features": self.features[i]}


def teacher_cache(path, teacher: nn.Module, datamodule, levels: Sequence[int]) -> CachedTeacher:
    """Write (once) and read the teacher's outputs on the train split's validator-level queries."""
    datasets = [datamodule.dataset("train", level) for level in levels]
    if not path.is_file():
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        teacher.to(device)
        outputs = predict_split(lambda images: dict(zip(("logits", "features"), pooled_features(teacher, images))),
                                datamodule, "train", levels, device=device, description="draft: teacher on train")
        teacher.cpu()
        tmp = path.with_suffix(".tmp")
        save_file({k: torch.cat([o[k] for o in outputs.values()]) for k in ("logits", "features")}, str(tmp))
        tmp.replace(path)
        log.info("teacher outputs cached for %d train queries (levels %s) in %s", sum(map(len, datasets)),
                 list(levels), path)
    return CachedTeacher(datasets, load_file(str(path)))
