"""Lightning's DeepSpeed strategy as the ``trainer=deepspeed_*`` configs build it."""
from __future__ import annotations

import inspect

from pytorch_lightning.strategies import DeepSpeedStrategy


class DeepSpeed(DeepSpeedStrategy):
    """:class:`~pytorch_lightning.strategies.DeepSpeedStrategy` with DeepSpeed's bf16 gradient-overflow check a choice.

    Under bf16, DeepSpeed (0.16 and later) checks every gradient partition for inf/NaN before each step
    (``bf16.check_grad_overflow``, on by default): amax, amin and isfinite per gradient in a Python loop, then a host
    sync. On one H100 with ViT-B/16 at batch 256 that made ZeRO-2 host-bound (docs/performance.md). The framework
    guards non-finite losses on every strategy (``callbacks.nonfinite_loss``), so the check is off here unless
    ``grad_overflow_check=true``; a ``bf16`` block in ``config`` is kept as given.
    """

    def __init__(self, *args, grad_overflow_check: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.grad_overflow_check = grad_overflow_check

    def _format_config(self) -> None:
        user_bf16 = "bf16" in self.config
        super()._format_config()  # adds {"bf16": {"enabled": True}} under a bf16 precision unless given
        if not user_bf16 and self.config.get("bf16", {}).get("enabled"):
            self.config["bf16"]["check_grad_overflow"] = self.grad_overflow_check


# Lightning's parameters plus ours, so the config check (train/config_checks.py) still catches a mistyped key
DeepSpeed.__signature__ = inspect.signature(DeepSpeedStrategy).replace(parameters=[
    *inspect.signature(DeepSpeedStrategy).parameters.values(),
    inspect.Parameter("grad_overflow_check", inspect.Parameter.KEYWORD_ONLY, default=False)])
