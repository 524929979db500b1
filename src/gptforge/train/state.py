"""`TrainState`: the counters of a run that a checkpoint carries (besides model, optimizer, RNG and data)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Optional


@dataclass
class TrainState:
    """Where a run stands: steps and tokens done, the best evaluation so far, the time budget spent."""

    step: int = 0  # optimizer steps done
    tokens: int = 0  # training tokens seen, all ranks
    grad_accum_steps: int = 0  # micro-batches per step and rank (0 until derived from the first batch)
    best_metric: Optional[float] = None  # best value of the early-stopping metric
    best_step: Optional[int] = None
    bad_evals: int = 0  # evaluations since the best one
    # Time-budgeted runs (train.max_time): carried across resumes, so the budget is shared by all sessions.
    elapsed_s: float = 0.0  # wall-clock seconds of the run up to this state
    eval_s: float = 0.0  # of which evaluations
    last_eval_s: float = 0.0  # what the last evaluation cost (a resumed run plans its final one with it)
    progress: float = 0.0  # schedule position, 0..1 of the budget (1.0: the final step is done)
    start_s: Optional[float] = None  # elapsed_s when the first step began (the schedule's zero)

    def improves(self, value: float, mode: str, min_delta: float) -> bool:
        """Whether `value` beats the best metric by more than `min_delta` (`mode`: min or max)."""
        if self.best_metric is None:
            return True
        sign = 1.0 if mode == "min" else -1.0
        return sign * (self.best_metric - value) > min_delta

    def record_eval(self, value: float, mode: str, min_delta: float) -> bool:
        """Book an evaluation of the early-stopping metric; returns True when it is the new best."""
        if self.improves(value, mode, min_delta):
            self.best_metric, self.best_step, self.bad_evals = value, self.step, 0
            return True
        self.bad_evals += 1
        return False

    def state_dict(self) -> dict[str, Any]:
        """JSON-able counters (the keys of a checkpoint's trainer.json)."""
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore counters; keys missing in older checkpoints keep their defaults."""
        for f in fields(self):
            if f.name in state:
                setattr(self, f.name, state[f.name])
        self.step, self.tokens = int(self.step), int(self.tokens)
        self.grad_accum_steps, self.bad_evals = int(self.grad_accum_steps), int(self.bad_evals)
        for name in ("elapsed_s", "eval_s", "last_eval_s", "progress"):
            setattr(self, name, float(getattr(self, name)))
        self.start_s = None if self.start_s is None else float(self.start_s)


__all__ = ["TrainState"]
