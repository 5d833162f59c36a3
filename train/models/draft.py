"""The speculative draft's networks: the student (any timm model; a ViT with elastic token budgets) and the
teacher's pooled features it is distilled towards.

Every student answers ``images -> StudentOutput`` (logits, pooled features and, for an elastic ViT,
the token budget each image used); :class:`ElasticDraft` is the trained elastic draft seen as a
plain ``images -> logits`` classifier, the shape calibration, saving and ONNX export expect.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import NamedTuple

import torch
import torch.nn as nn

from train.models.backbones import feature_dim, pooled_features


class StudentOutput(NamedTuple):
    """What a student returns: logits, pooled pre-head features and, for an elastic ViT, each image's budget index
    and the mean fraction of patch tokens used."""
    logits: torch.Tensor
    features: torch.Tensor                 # pooled, pre-head
    budget_index: torch.Tensor | None = None
    expected_budget: torch.Tensor | None = None


class PlainStudent(nn.Module):
    """Any timm classifier as a student: every token, every image."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.num_features = feature_dim(model)

    def forward(self, images: torch.Tensor) -> StudentOutput:
        return StudentOutput(*pooled_features(self.model, images))


class ElasticStudent(nn.Module):
    """An :class:`~train.models.elastic.ElasticViT` as a student."""

    def __init__(self, elastic: nn.Module):
        super().__init__()
        self.model = elastic
        self.num_features = elastic.num_features

    def budget_fractions(self) -> torch.Tensor:
        """The fraction of patch tokens each budget keeps, on the CPU."""
        return self.model.fractions.cpu()

    def forward(self, images: torch.Tensor) -> StudentOutput:
        out = self.model(images)
        return StudentOutput(out.logits, out.features, out.budget_index, out.expected_budget)


def build_student(backbone: dict, elastic: dict | None = None, mean=None, std=None) -> nn.Module:
    """The student of ``create_backbone(**backbone)``; a timm ViT gets ``elastic`` token budgets when given
    (``mean``/``std``: the input normalisation, for the entropy selector)."""
    from timm.models.vision_transformer import VisionTransformer

    from train.models.backbones import create_backbone
    from train.models.elastic import ElasticViT

    model = create_backbone(**backbone)
    if elastic and isinstance(model, VisionTransformer):
        norm = {k: v for k, v in (("mean", mean), ("std", std)) if v is not None}
        return ElasticStudent(ElasticViT(model, **norm, **elastic))
    return PlainStudent(model)


class ElasticDraft(nn.Module):
    """A trained elastic draft as ``images -> logits`` (each image at its selector's budget): what is calibrated,
    saved (``elastic_args`` rebuild it around ``create_backbone(**backbone_args)``) and exported (one image per
    call, :meth:`export_module`)."""

    def __init__(self, elastic: nn.Module):
        super().__init__()
        self.elastic = elastic
        self.backbone_args = elastic.backbone_args

    @property
    def elastic_args(self) -> dict:
        """The wrapped ElasticViT's arguments (what rebuilds it around the backbone)."""
        return self.elastic.elastic_args

    def get_classifier(self) -> nn.Module:
        """The ViT's classification head."""
        return self.elastic.get_classifier()

    def export_module(self) -> nn.Module:
        """The batch-1 ``images -> logits`` module for ONNX (:meth:`~train.models.elastic.ElasticViT.export_module`)."""
        return self.elastic.export_module()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.elastic.classify(images)


@contextmanager
def forced_budget(elastic: nn.Module, index: int):
    """Within the block every image runs at ``elastic.budgets[index]``."""
    saved = elastic.selector, elastic.fixed_index
    elastic.selector, elastic.fixed_index = "fixed", index
    try:
        yield elastic
    finally:
        elastic.selector, elastic.fixed_index = saved


def draft_classifier(student: nn.Module) -> nn.Module:
    """The plain classifier inside a trained student (what the draft stage saves)."""
    return ElasticDraft(student.model) if isinstance(student, ElasticStudent) else student.model


@torch.no_grad()
def init_from_teacher(student: nn.Module, teacher: nn.Module) -> list[str]:
    """Copy every teacher tensor whose name and shape the student's backbone shares (a ViT of the teacher's width:
    its embeddings, first blocks and final norm; DistilBERT-style); returns the names copied."""
    body = student.model.vit if isinstance(student, ElasticStudent) else student.model
    theirs = teacher.state_dict()
    copied = [name for name, value in body.state_dict().items()
              if name in theirs and theirs[name].shape == value.shape]
    body.load_state_dict({name: theirs[name] for name in copied}, strict=False)
    return copied


@torch.no_grad()
def fold_teacher_head(student_head: nn.Linear, projection: nn.Linear, teacher_head: nn.Linear) -> None:
    """Make ``student_head`` compute ``teacher_head(projection(features))`` (two linear maps are one)."""
    if not all(isinstance(m, nn.Linear) for m in (student_head, projection, teacher_head)):
        raise ValueError("folding the teacher's head needs linear student/teacher heads and projection")
    weight = teacher_head.weight.double() @ projection.weight.double()
    bias = teacher_head.weight.double() @ projection.bias.double() + teacher_head.bias.double()
    student_head.weight.copy_(weight.to(student_head.weight.dtype))
    student_head.bias.copy_(bias.to(student_head.bias.dtype))
