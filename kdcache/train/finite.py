"""A run never ends "successfully" on NaN: the loop's checks that losses, gradients and weights stay finite.

In fp32/bf16 a non-finite loss term or gradient norm stops the run before the optimizer applies that step. Under fp16
on CUDA the GradScaler skips non-finite steps by design while it searches for its scale, so a step is skipped (never
applied) and the run stops only after more than `max_skipped` consecutive skips. Weights are checked before every
checkpoint and before the final weights are written, and every validation pass's metrics before the checkpoint that
follows it, so nothing is ever saved from a NaN state: the run's latest checkpoint stays the last good one, and nothing
claims the run done.

One device sync per optimizer step: the terms of its micro-batches are stacked on the device and read once. Under
DDP the terms are summed over the ranks first (`reduce`, one small all-reduce per step) and the gradient norm is the
same on every rank (gradients are all-reduced), so every rank sees the same non-finite terms and stops at the same
step with the same message, whichever rank's rows gave the NaN (a rank that stopped alone would leave the others
waiting in their next collective).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import torch

from kdcache.train.config import TrainError

log = logging.getLogger(__name__)

_WHAT_NOW = ("no weights were updated from it and the latest checkpoint, if any, is kept; lower --lr or find the bad "
             "input, then rerun (--resume continues from that checkpoint; a changed --lr needs a new --out)")


class NonFiniteError(TrainError):
    """Training stopped on a non-finite loss, gradient norm or weight; nothing was saved from that state."""


def _fmt(values: dict[str, float]) -> str:
    return ", ".join(f"{k}={v}" for k, v in values.items())


class StepGuard:
    """Told each micro-batch's loss terms and each step's gradient norm; says whether the optimizer may apply the
    step, and raises NonFiniteError when the run must stop (see the module docstring)."""

    def __init__(self, *, scaler_enabled: bool, max_skipped: int,
                 reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        self.scaler_enabled = scaler_enabled
        self.reduce = reduce      # DDP: sums a [micro-batches, terms] tensor over the ranks
        self.max_skipped = max_skipped
        self.skipped = 0          # consecutive skipped steps (fp16 scaler)
        self.total_skipped = 0
        self._names: list[str] = []
        self._values: list[torch.Tensor] = []

    def micro(self, terms: dict[str, torch.Tensor]) -> None:
        """Record a micro-batch's terms ({"<name>_loss": scalar, ..., "loss": total}); no device sync here."""
        self._names = list(terms)
        self._values.append(torch.stack([v.detach().float().reshape(()) for v in terms.values()]))

    def _bad_terms(self) -> dict[str, float]:
        """The step's non-finite terms by name; the total "loss" only when no named term is non-finite."""
        if not self._values:
            return {}
        values = torch.stack(self._values)  # [micro-batches, terms]
        if self.reduce is not None:
            values = self.reduce(values)
        values = values.cpu()  # the one sync
        self._values = []
        bad: dict[str, float] = {}
        for row in values.tolist():
            for name, v in zip(self._names, row, strict=True):
                if not math.isfinite(v) and name not in bad:
                    bad[name] = v
        if len(bad) > 1:
            bad.pop("loss", None)
        return bad

    def step_ok(self, *, step: int, grad_norm: float) -> bool:
        """After backward, unscale and clipping of `step` (1-based): True to apply it, False to skip it (fp16 scaler
        only); raises NonFiniteError when the run must stop."""
        bad = self._bad_terms()
        if not bad and math.isfinite(grad_norm):
            self.skipped = 0
            return True
        what = (f"non-finite loss term(s) {_fmt(bad)}" if bad else
                f"non-finite gradient norm {grad_norm} (every loss term finite)")
        if not self.scaler_enabled:
            raise NonFiniteError(f"training stopped at step {step}: {what}; {_WHAT_NOW}")
        self.skipped += 1
        self.total_skipped += 1
        if self.skipped > self.max_skipped:
            raise NonFiniteError(f"training stopped at step {step}: {self.skipped} consecutive steps skipped by the "
                                 f"fp16 gradient scaler, more than --max-skipped-steps {self.max_skipped} (last: "
                                 f"{what}); {_WHAT_NOW}")
        log.warning("step %d skipped by the fp16 gradient scaler (%s); %d consecutive, at most %d", step, what,
                    self.skipped, self.max_skipped)
        return False


def check_finite_val(values: dict, *, step: int) -> None:
    """Refuse to go on (checkpoint, write done.json) after a validation pass whose metrics are NaN or inf: the weights
    were finite, so a validation row or the forward pass (an fp16 overflow) gave it."""
    bad = {k: v for k, v in values.items() if isinstance(v, float) and not math.isfinite(v)}
    if bad:
        raise NonFiniteError(f"training stopped at step {step}: validation gave non-finite {_fmt(bad)} (the weights "
                             "are finite); the latest checkpoint, if any, is kept; check the validation rows "
                             "(kdcache verify) or train in fp32/bf16, then rerun")


def check_finite_weights(module: torch.nn.Module, *, step: int, what: str) -> None:
    """Refuse to save `what` (a checkpoint, the final weights) when any floating-point weight is NaN or inf."""
    tensors = [(k, v) for k, v in module.state_dict().items() if v.is_floating_point()]
    if not tensors:
        return
    ok = torch.stack([torch.isfinite(v).all() for _, v in tensors]).cpu()
    if bool(ok.all()):
        return
    names = [k for (k, _), good in zip(tensors, ok.tolist(), strict=True) if not good]
    more = f" (and {len(names) - 1} more)" if len(names) > 1 else ""
    raise NonFiniteError(f"training stopped at step {step}: weight {names[0]!r}{more} is non-finite, so {what} was "
                         f"not written; the latest checkpoint, if any, is kept; lower --lr or find the bad input, "
                         "then rerun")
