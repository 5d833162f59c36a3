"""The speculative draft's distillation objective (EAGLE / SpecVLM): match the frozen teacher's features and answers.

``loss = feature_weight * SmoothL1(projected student features, teacher's pooled features)
       + soft_weight * T**2 * CE(teacher's tempered distribution, student's tempered distribution)
       + hard_weight * CE(labels)``

The soft term is the cross-entropy (``soft="ce"``, as EAGLE writes it) or the KL divergence (``soft="kl"``: the
same gradient, minus the teacher's entropy, so it is 0 when the student matches). The ``T**2`` factor (Hinton et
al. 2015) keeps the soft term's gradient on the same scale whatever the temperature. Losses are computed in float32.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

SOFT_LOSSES = ("ce", "kl")


def _check_logits(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> None:
    if student_logits.shape != teacher_logits.shape or student_logits.dim() != 2:
        raise ValueError(f"distillation needs student and teacher logits of one (batch, classes) shape; got "
                         f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}")
    if not temperature > 0:
        raise ValueError(f"distillation temperature must be > 0, got {temperature}")


def soft_cross_entropy(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                       temperature: float = 1.0) -> torch.Tensor:
    """``T**2 * mean_batch( -sum_c p_teacher(c; T) * log p_student(c; T) )``, ``p(.; T) = softmax(logits / T)``."""
    _check_logits(student_logits, teacher_logits, temperature)
    target = (teacher_logits.float() / temperature).softmax(-1)
    log_student = (student_logits.float() / temperature).log_softmax(-1)
    return -(target * log_student).sum(-1).mean() * temperature ** 2


def kl_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``T**2 * mean_batch KL(p_teacher(T) || p_student(T))``: the soft cross-entropy minus the teacher's entropy."""
    _check_logits(student_logits, teacher_logits, temperature)
    log_target = (teacher_logits.float() / temperature).log_softmax(-1)
    log_student = (student_logits.float() / temperature).log_softmax(-1)
    return (log_target.exp() * (log_target - log_student)).sum(-1).mean() * temperature ** 2


SOFT_FUNCTIONS = {"ce": soft_cross_entropy, "kl": kl_divergence}


class FeatureProjection(nn.Module):
    """The student's pooled features in the teacher's feature space: one ``Linear(student_dim, teacher_dim)``.

    Always a learned layer (no identity shortcut, even for equal widths: the two spaces are unrelated); its
    bias starts at zero.
    """

    def __init__(self, student_dim: int, teacher_dim: int):
        super().__init__()
        self.proj = nn.Linear(student_dim, teacher_dim)
        nn.init.zeros_(self.proj.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.proj(features)


class DistillationLoss(nn.Module):
    """The weighted sum of the soft (teacher's distribution), feature and hard (labels) terms.

    ``forward`` returns ``{"loss": total, "soft": ..., "feature": ..., "hard": ...}``: the total carries the
    gradient, each term (detached, for logging) appears when its weight is > 0. A weighted term whose inputs are
    missing is an error. Teacher logits and features are targets: they are detached here.
    """

    def __init__(self, temperature: float = 1.0, soft_weight: float = 0.1, feature_weight: float = 1.0,
                 hard_weight: float = 0.0, soft: str = "ce", label_smoothing: float = 0.0):
        super().__init__()
        if soft not in SOFT_FUNCTIONS:
            raise ValueError(f"distillation soft={soft!r}; expected one of {SOFT_LOSSES}")
        if not temperature > 0:
            raise ValueError(f"distillation temperature must be > 0, got {temperature}")
        weights = {"soft_weight": soft_weight, "feature_weight": feature_weight, "hard_weight": hard_weight}
        if any(w < 0 for w in weights.values()) or not any(w > 0 for w in weights.values()):
            raise ValueError(f"distillation weights must be >= 0 with at least one > 0; got {weights}")
        self.temperature, self.soft = float(temperature), soft
        self.soft_weight, self.feature_weight = float(soft_weight), float(feature_weight)
        self.hard_weight = float(hard_weight)
        self.label_smoothing = float(label_smoothing)

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor | None = None,
                student_features: torch.Tensor | None = None, teacher_features: torch.Tensor | None = None,
                labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        terms: dict[str, tuple[float, torch.Tensor]] = {}
        if self.soft_weight > 0:
            _require(teacher_logits, "teacher_logits", "soft_weight", self.soft_weight)
            soft = SOFT_FUNCTIONS[self.soft](student_logits, teacher_logits.detach(), self.temperature)
            terms["soft"] = self.soft_weight, soft
        if self.feature_weight > 0:
            terms["feature"] = self.feature_weight, self.feature_loss(student_features, teacher_features)
        if self.hard_weight > 0:
            _require(labels, "labels", "hard_weight", self.hard_weight)
            hard = F.cross_entropy(student_logits.float(), labels, label_smoothing=self.label_smoothing)
            terms["hard"] = self.hard_weight, hard
        total = sum(weight * value for weight, value in terms.values())
        return {"loss": total, **{name: value.detach() for name, (_, value) in terms.items()}}

    def feature_loss(self, student_features: torch.Tensor | None,
                     teacher_features: torch.Tensor | None) -> torch.Tensor:
        """SmoothL1 (beta 1, mean over all elements) from the projected student features to the teacher's."""
        _require(student_features, "student_features", "feature_weight", self.feature_weight)
        _require(teacher_features, "teacher_features", "feature_weight", self.feature_weight)
        if student_features.shape != teacher_features.shape:
            raise ValueError(f"feature distillation: student features {tuple(student_features.shape)} vs teacher "
                             f"{tuple(teacher_features.shape)}; project the student's with FeatureProjection"
                             f"(student_dim, {teacher_features.shape[-1]}) first")
        return F.smooth_l1_loss(student_features.float(), teacher_features.detach().float(), beta=1.0)


class TeacherMemo:
    """A frozen teacher's outputs per input, kept as they are computed, so that an input which comes back is read
    instead of run again: a training sample's augmentation draw that the sampler repeats (``EpochSampler(draws=)``),
    a validation query every epoch. An input is named by its sample index and a fingerprint of its pixels (a fixed
    random projection, in float64), so another augmentation, level or split of a sample is another input; at worst a
    fingerprint that differs in its last bit makes the teacher run again. Rows live on the outputs' device."""

    def __init__(self):
        self.rows: dict[tuple, int] = {}
        self.outputs: list[torch.Tensor] = []  # one [capacity, ...] tensor per output; the first len(rows) are set
        self._projection: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.rows)

    def keys(self, index: torch.Tensor, images: torch.Tensor) -> list[tuple[int, float]]:
        """(sample index, pixel fingerprint) per image of the batch."""
        flat = images.detach().flatten(1).double()
        p = self._projection
        if p is None or p.shape[0] != flat.shape[1] or p.device != flat.device:
            g = torch.Generator().manual_seed(0)
            p = self._projection = (torch.rand(flat.shape[1], generator=g, dtype=torch.float64) + 0.5).to(flat.device)
        prints = flat @ p
        return list(zip(index.tolist(), prints.tolist()))

    def __call__(self, index: torch.Tensor, images: torch.Tensor, compute) -> tuple[torch.Tensor, ...]:
        """``compute(images) -> tuple of [B, ...] outputs`` for the batch, run only on the inputs not remembered yet
        (a sampler drawing with replacement brings back some inputs of a batch and not others)."""
        keys = self.keys(index, images)
        first: dict[tuple, int] = {}  # each input not remembered yet: its first row in the batch
        for j, key in enumerate(keys):
            if key not in self.rows:
                first.setdefault(key, j)
        if first:
            rows = list(first.values())
            todo = images if len(rows) == len(keys) else images[torch.tensor(rows, device=images.device)]
            self._put(list(first), compute(todo))
        at = torch.tensor([self.rows[key] for key in keys], device=self.outputs[0].device)
        return tuple(o[at] for o in self.outputs)

    def _put(self, keys: list[tuple], outputs: tuple[torch.Tensor, ...]) -> None:
        if self.outputs and len(outputs) != len(self.outputs):
            raise ValueError(f"TeacherMemo holds {len(self.outputs)} outputs per input, got {len(outputs)}")
        start, count = len(self.rows), len(keys)
        if not self.outputs or start + count > len(self.outputs[0]):
            capacity = max(2 * (start + count), 256)
            grown = [o.new_zeros((capacity, *o.shape[1:])) for o in outputs]
            for g, o in zip(grown, self.outputs):
                g[:start] = o[:start]
            self.outputs = grown
        for stored, o in zip(self.outputs, outputs):
            stored[start:start + count] = o.detach().to(stored.dtype)
        self.rows.update({key: start + n for n, key in enumerate(keys)})


def _require(value: torch.Tensor | None, name: str, weight_name: str, weight: float) -> None:
    if value is None:
        raise ValueError(f"DistillationLoss: {weight_name}={weight} needs {name}; pass it or set {weight_name}=0")
