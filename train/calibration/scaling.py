"""Post-hoc calibrators of the 2-class classifier (temperature, Platt, isotonic), picked by name.

Every calibrator maps logits ``[N, 2]`` to a calibrated P(roadwork) ``[N]`` (class 1 of ``train.LABELS``), keeps
what it learned as plain floats (``params`` / ``from_params``, for the export manifest) and says whether it can be
folded into the classifier head (``foldable``), so that the exported model needs no extra step.
"""
from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from train.metrics import roadwork_prob
from train.models.finetune import head_name

log = logging.getLogger(__name__)
TEMPERATURE_RANGE = (0.05, 20.0)  # a fitted T outside this says the model is broken, not over-confident


class Calibrator:
    """The shared interface; subclasses implement ``_fit``, ``_probs`` and ``params`` on float64 logits."""

    method: str = ""
    foldable: bool = False

    def fit(self, logits: torch.Tensor, labels: torch.Tensor) -> Calibrator:
        """Fit on held-out ``logits [N, 2]`` and 0/1 ``labels [N]``; returns ``self``."""
        check_fit_inputs(logits, labels)
        self._fit(logits.detach().cpu().double(), labels.detach().cpu().long())
        return self

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        """Calibrated P(roadwork) ``[N]`` in float64, on the CPU."""
        check_logits(logits)
        return self._probs(logits.detach().cpu().double())

    def params(self) -> dict:
        """What it learned as plain floats (the manifest's ``calibration.params``); :meth:`from_params` rebuilds it."""
        raise NotImplementedError

    @classmethod
    def from_params(cls, params: dict) -> Calibrator:
        """Rebuild a fitted calibrator from :meth:`params`."""
        return cls(**params)

    def _fit(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        raise NotImplementedError

    def _probs(self, logits: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class TemperatureScaling(Calibrator):
    """softmax(logits / T), T > 0 fitted by NLL over log T (Guo et al. 2017); ranking is unchanged."""

    method = "temperature"
    foldable = True

    def __init__(self, temperature: float = 1.0):
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)

    def _fit(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
        minimise(lambda: F.cross_entropy(logits / log_t.exp(), labels), [log_t])
        fitted = log_t.exp().item()
        low, high = TEMPERATURE_RANGE
        self.temperature = min(max(fitted, low), high)
        if self.temperature != fitted:  # T -> inf flattens every P to 0.5, which then reads as "None"
            log.warning("fitted temperature %.3g is outside [%g, %g]: the logits carry almost no signal on the "
                        "calibration split; using T = %g", fitted, low, high, self.temperature)

    def _probs(self, logits: torch.Tensor) -> torch.Tensor:
        return roadwork_prob(logits / self.temperature)

    def params(self) -> dict:
        """``{"temperature": T}``."""
        return {"temperature": self.temperature}

    def folded(self, weight: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Head weight and bias whose logits are the old ones divided by T."""
        return weight / self.temperature, bias / self.temperature


class PlattScaling(Calibrator):
    """sigmoid(a * z + b) on the margin z = logit[Roadwork] - logit[None], (a, b) fitted by BCE (Platt 1999)."""

    method = "platt"
    foldable = True

    def __init__(self, a: float = 1.0, b: float = 0.0):
        self.a, self.b = float(a), float(b)

    def _fit(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        a = torch.ones(1, dtype=torch.float64, requires_grad=True)
        b = torch.zeros(1, dtype=torch.float64, requires_grad=True)
        margin, target = logit_margin(logits), labels.double()
        minimise(lambda: F.binary_cross_entropy_with_logits(a * margin + b, target), [a, b])
        self.a, self.b = a.item(), b.item()

    def _probs(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.a * logit_margin(logits) + self.b)

    def params(self) -> dict:
        """``{"a": a, "b": b}``."""
        return {"a": self.a, "b": self.b}

    def folded(self, weight: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Head weight and bias whose margin is ``a * z + b`` (the Platt bias split evenly over the two rows)."""
        shift = torch.tensor([-self.b / 2, self.b / 2], dtype=bias.dtype, device=bias.device)
        return self.a * weight, self.a * bias + shift


class IsotonicCalibration(Calibrator):
    """A monotone step-wise-linear map of the raw P(roadwork) = softmax(logits)[:, 1] (sklearn's isotonic fit).

    It cannot be folded into the head: ``params()`` is a lookup table ``{"x": [...], "y": [...]}`` that the
    consumer applies to the exported model's P(roadwork) with :func:`apply_isotonic_table`.
    """

    method = "isotonic"
    foldable = False

    def __init__(self, x: list[float] | None = None, y: list[float] | None = None):
        self.x, self.y = x, y

    def _fit(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        from sklearn.isotonic import IsotonicRegression

        isotonic = IsotonicRegression(out_of_bounds="clip", y_min=0, y_max=1)
        isotonic.fit(roadwork_prob(logits).numpy(), labels.numpy())
        self.x, self.y = isotonic.X_thresholds_.tolist(), isotonic.y_thresholds_.tolist()

    def _probs(self, logits: torch.Tensor) -> torch.Tensor:
        if self.x is None:
            raise RuntimeError("IsotonicCalibration is not fitted; call fit() or from_params() first")
        return torch.from_numpy(apply_isotonic_table(roadwork_prob(logits).numpy(), self.params()))

    def params(self) -> dict:
        """The table ``{"x": [...], "y": [...]}`` that :func:`apply_isotonic_table` applies (None before fitting)."""
        return {"x": self.x, "y": self.y}


def apply_isotonic_table(p: np.ndarray, table: dict) -> np.ndarray:
    """The isotonic map: linear interpolation in ``table`` (``IsotonicCalibration.params()``), clipped at its ends.

    ``p`` is the exported model's P(roadwork) = softmax(logits)[:, 1]. Pure numpy, so a consumer without torch or
    sklearn computes exactly what ``IsotonicCalibration.probs`` does.
    """
    return np.interp(p, table["x"], table["y"])


CALIBRATORS: dict[str, type[Calibrator]] = {cls.method: cls for cls in
                                            (TemperatureScaling, PlattScaling, IsotonicCalibration)}


def fit_calibrator(method: str, logits: torch.Tensor, labels: torch.Tensor) -> Calibrator:
    """Fit the calibrator named ``method`` (a key of ``CALIBRATORS``) on held-out logits and labels."""
    if method not in CALIBRATORS:
        raise ValueError(f"calibration method={method!r}; expected one of {list(CALIBRATORS)}")
    return CALIBRATORS[method]().fit(logits, labels)


@torch.no_grad()
def fold_into_head(model: nn.Module, calibrator: Calibrator) -> nn.Module:
    """Rewrite the classifier head in place so that softmax(model(x))[:, 1] is ``calibrator.probs``; returns it."""
    if not calibrator.foldable:
        raise ValueError(f"{calibrator.method} cannot be folded; the table travels in the manifest")
    name = head_name(model)
    head = model.get_submodule(name)
    if not isinstance(head, nn.Linear) or head.out_features != 2 or head.bias is None:
        raise ValueError(f"cannot fold calibration into head {name!r}: expected an nn.Linear with 2 outputs and a "
                         f"bias, got {head}")
    weight, bias = calibrator.folded(head.weight.double(), head.bias.double())
    head.weight.copy_(weight)
    head.bias.copy_(bias)
    return model


def folded_logits(calibrator: Calibrator, logits: torch.Tensor) -> torch.Tensor:
    """The logits of the classifier once ``calibrator`` is folded into its head (:func:`fold_into_head`), from its
    logits before: the fold is affine in the logits, so this equals running the folded model up to float32 rounding.
    A calibrator that cannot be folded leaves the model, and so its logits, as they were."""
    if not calibrator.foldable:
        return logits
    weight, bias = calibrator.folded(torch.eye(2, dtype=torch.float64), torch.zeros(2, dtype=torch.float64))
    return (logits.double() @ weight.T + bias).float()


def minimise(loss: Callable[[], torch.Tensor], params: list[torch.Tensor]) -> None:
    """Minimise ``loss()`` over ``params`` with full-batch L-BFGS (strong-Wolfe line search)."""
    optimizer = torch.optim.LBFGS(params, lr=1.0, max_iter=200, tolerance_grad=1e-10, tolerance_change=1e-14,
                                  line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        value = loss()
        value.backward()
        return value

    with torch.enable_grad():  # callers may sit in a no_grad block (a validation loop)
        optimizer.step(closure)


def logit_margin(logits: torch.Tensor) -> torch.Tensor:
    """z = logit[Roadwork] - logit[None]; P(roadwork) = sigmoid(z)."""
    return logits[:, 1] - logits[:, 0]


def check_logits(logits: torch.Tensor) -> None:
    """Raise ``ValueError`` unless ``logits`` is a float tensor [N, 2] (None, Roadwork)."""
    if logits.ndim != 2 or logits.shape[1] != 2 or not logits.is_floating_point():
        raise ValueError(f"logits must be a float tensor [N, 2] (None, Roadwork); got {logits.dtype} "
                         f"{list(logits.shape)}")


def check_fit_inputs(logits: torch.Tensor, labels: torch.Tensor) -> None:
    """Raise ``ValueError`` unless logits are [N, 2], labels [N] and both classes are present."""
    check_logits(logits)
    if labels.shape != (logits.shape[0],):
        raise ValueError(f"labels must be [N] with N = {logits.shape[0]} (the logits rows); got {list(labels.shape)}")
    classes = set(labels.unique().tolist())
    if not classes <= {0, 1}:
        raise ValueError(f"labels must be 0 (None) or 1 (Roadwork); got values {sorted(classes)}")
    if classes != {0, 1}:
        raise ValueError(f"labels hold only class {classes.pop()}; calibration needs both None (0) and Roadwork (1)")
