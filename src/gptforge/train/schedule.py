"""Learning-rate schedules: linear warmup, then cosine decay or warmup-stable-decay (WSD).

A step-based schedule is a pure function of the step, so its whole state is the step counter and resume
is exact. A time-budgeted run (`lr_at_progress`) follows the share of its budget spent instead, so
warmup and decay are fractions of the budget and the decay completes however fast the machine runs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

SCHEDULES = ("cosine", "wsd", "linear", "constant")


@dataclass
class LRSchedule:
    """Learning rate at each optimizer step: `lr_at(step)`; `step()` advances and sets the optimizer's groups."""

    base_lr: float
    max_steps: int
    warmup_steps: int = 0
    kind: str = "cosine"
    min_lr_ratio: float = 0.1
    decay_fraction: float = 0.2  # WSD: share of the run spent decaying at the end
    current_step: int = 0

    def __post_init__(self) -> None:
        if self.kind not in SCHEDULES:
            raise ValueError(f"train.schedule must be one of {SCHEDULES}, got {self.kind!r}")
        if self.max_steps <= 0:
            raise ValueError(f"train.max_steps must be positive, got {self.max_steps}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"train.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if not 0.0 <= self.decay_fraction <= 1.0:
            raise ValueError(f"train.decay_fraction must be in [0, 1], got {self.decay_fraction}")
        if self.warmup_steps < 0:
            raise ValueError(f"train.warmup_steps must be >= 0, got {self.warmup_steps}")

    def lr_at(self, step: int, fraction: Optional[float] = None) -> float:
        """Learning rate of optimizer step `step` (0-based); `fraction` overrides how far the run is (0..1)."""
        if step < self.warmup_steps:
            return self.base_lr * (step + 1) / self.warmup_steps
        last = max(self.max_steps - 1, 1)
        # Position in the run as a fraction of the last step (time-based schedules pass it directly).
        done = min(step / last, 1.0) if fraction is None else min(max(fraction, 0.0), 1.0)
        return self._shape(done, self.warmup_steps / last)

    def lr_at_progress(self, progress: float, step: int, warmup_fraction: float = 0.0) -> float:
        """Learning rate `progress` (0..1) of the way through a time-budgeted run, at optimizer step `step`.

        Warmup ends at `warmup_fraction` of the run or after `warmup_steps` steps, whichever comes first
        (a zero leaves that limit out); the stable phase and the decay follow `progress`, so the final
        learning rate is reached exactly at 1.0, however many steps that took.
        """
        done = min(max(progress, 0.0), 1.0)
        limits = []
        if warmup_fraction > 0:
            limits.append(done / warmup_fraction)
        if self.warmup_steps > 0:
            limits.append((step + 1) / self.warmup_steps)
        warm = 1.0 if done >= 1.0 or not limits else min(1.0, max(limits))
        return self._shape(done, warmup_fraction) * warm

    def _shape(self, done: float, warm: float) -> float:
        """The lr after warmup at run position `done` (0..1), when warmup ends at position `warm`."""
        lr, min_lr = self.base_lr, self.base_lr * self.min_lr_ratio
        if self.kind == "constant":
            return lr
        if self.kind == "wsd":
            decay_start = max(warm, 1.0 - self.decay_fraction)
            if done < decay_start:
                return lr
            progress = min((done - decay_start) / max(1.0 - decay_start, 1e-9), 1.0)
            # 1 - sqrt decay (Hägele et al. 2024) ends lower-loss than linear for the same budget.
            return min_lr + (lr - min_lr) * (1.0 - math.sqrt(progress))
        progress = min(max(done - warm, 0.0) / max(1.0 - warm, 1e-9), 1.0)
        if self.kind == "linear":
            return min_lr + (lr - min_lr) * (1.0 - progress)
        return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))

    def apply(self, optimizer: Any, step: int, fraction: Optional[float] = None, lr: Optional[float] = None) -> float:
        """Set every param group's lr for `step` (groups may carry an `lr_scale`); return the base lr.

        `lr` sets a learning rate computed elsewhere (`lr_at_progress` of a time-budgeted run).
        """
        lr = self.lr_at(step, fraction) if lr is None else lr
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        self.current_step = step
        return lr

    def state_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "base_lr": self.base_lr, "max_steps": self.max_steps,
                "warmup_steps": self.warmup_steps, "min_lr_ratio": self.min_lr_ratio,
                "decay_fraction": self.decay_fraction, "current_step": self.current_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # The recipe may legitimately change max_steps on resume (train longer); keep the configured shape.
        self.current_step = int(state.get("current_step", 0))


__all__ = ["LRSchedule", "SCHEDULES"]
