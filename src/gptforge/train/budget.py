"""Time-budgeted runs: the schedule, the evaluations and the last step follow measured speed.

A run with `train.max_time` (and `train.time_schedule`, the default) is planned in seconds rather than
steps. The budget covers everything `train` does: steps, evaluations, checkpoints, the final evaluation,
writing model/ and the loss curve. At each step boundary `TimeBudget` answers from what it measured so
far (recent step times, the last evaluation's cost, the last checkpoint's cost, each scaled by how much
slower or faster steps run now than when it was measured):

- `progress()`: the share of the *training horizon* spent, where the horizon is the budget minus what
  the run still has to do after its last step (final evaluation, saving). The lr schedule follows it, so
  warmup and decay are fractions of the budget even when the machine slows down midway;
- `last_step_due()`: whether the step after this one would no longer fit; that step is then the last,
  taken at progress 1.0, so the decay always completes;
- `eval_due()`: whether an evaluation now keeps all evaluations within `eval_share` of the time spent.

Nothing here is exact: a step that suddenly takes much longer than the ones before can overrun the
budget by about that step.
"""

from __future__ import annotations

import statistics
import time
from collections import deque
from typing import Optional

# Drawing loss_curve.png (matplotlib's import dominates) and closing the run, on a CPU: about a second.
FINISH_SECONDS = 1.5
# Disk speed assumed for the final checkpoint until one has been measured (a conservative figure).
WRITE_BYTES_PER_S = 100e6
RECENT_STEPS = 5  # step times the estimate is the median of: quick to follow a slowdown, deaf to one spike


class TimeBudget:
    """Measures a run against its wall-clock budget and decides its schedule position, evaluations and end."""

    def __init__(self, seconds: float, eval_share: float, *, spent: float = 0.0, eval_spent: float = 0.0,
                 progress: float = 0.0, checkpoint_bytes: int = 0, last_eval_s: float = 0.0,
                 started: Optional[float] = None) -> None:
        self.seconds, self.eval_share = seconds, eval_share
        self.eval_spent = eval_spent  # seconds in evaluations so far
        self._spent_before = spent  # seconds of earlier sessions of a resumed run
        self._start = time.perf_counter() if started is None else started  # perf_counter() of this session's start
        self._progress = progress
        self._recent: deque[float] = deque(maxlen=RECENT_STEPS)
        self._early: Optional[float] = None  # typical step time of the first steps: the slowdown reference
        # (seconds, step time when measured); a resumed run starts from its last evaluation's cost.
        self._eval: Optional[tuple[float, Optional[float]]] = (last_eval_s, None) if last_eval_s else None
        self._save: Optional[tuple[float, Optional[float]]] = None
        self._save_guess = checkpoint_bytes / WRITE_BYTES_PER_S

    # ---- measurements ----------------------------------------------------------------------------

    def elapsed(self) -> float:
        """Seconds of the budget spent, earlier sessions included."""
        return self._spent_before + time.perf_counter() - self._start

    def record_step(self, seconds: float) -> None:
        """One optimizer step (with its logging) took `seconds`."""
        self._recent.append(seconds)
        if self._early is None and len(self._recent) == RECENT_STEPS:
            self._early = self.step_seconds()

    def record_eval(self, seconds: float) -> None:
        """An evaluation (with its best/ write) took `seconds`."""
        self.eval_spent += seconds
        self._eval = (seconds, self.step_seconds() or None)

    def record_save(self, seconds: float) -> None:
        """A checkpoint write took `seconds`."""
        self._save = (seconds, self.step_seconds() or None)

    def step_seconds(self) -> float:
        """Estimated duration of the next step (0.0 before the first one)."""
        return statistics.median(self._recent) if self._recent else 0.0

    def slowdown(self, then: Optional[float]) -> float:
        """How many times slower steps run now than at step time `then` (1.0 when unknown)."""
        now, then = self.step_seconds(), then or self._early
        if not now or not then:
            return 1.0
        return max(now / then, 0.5)

    def eval_seconds(self) -> float:
        """Estimated cost of the next evaluation (0.0 before one was measured)."""
        return self._eval[0] * self.slowdown(self._eval[1]) if self._eval else 0.0

    def save_seconds(self) -> float:
        """Estimated cost of the next checkpoint write."""
        return self._save[0] * self.slowdown(self._save[1]) if self._save else self._save_guess

    def reserve(self) -> float:
        """Seconds the run needs after its last step: final evaluation, final checkpoint, model/, the plot."""
        # model/ (and best/) are written beside the checkpoint: count the write twice.
        return self.eval_seconds() + 2 * self.save_seconds() + FINISH_SECONDS * self.slowdown(None)

    # ---- decisions ---------------------------------------------------------------------------------

    def horizon(self) -> float:
        """Seconds by which the last optimizer step must end."""
        return max(self.seconds - self.reserve(), 1e-9)

    def progress(self) -> float:
        """Share of the training horizon spent, 0..1; never decreases (the lr schedule follows it)."""
        self._progress = max(self._progress, min(self.elapsed() / self.horizon(), 1.0))
        return self._progress

    def finish(self) -> None:
        """The final step is being taken: the schedule stands at its end from now on."""
        self._progress = 1.0

    def last_step_due(self) -> bool:
        """True when, after the coming step, another one would not fit the horizon."""
        return self.elapsed() + 2 * self.step_seconds() > self.horizon()

    def eval_due(self) -> bool:
        """True when an evaluation now keeps evaluations within their share and leaves room to finish."""
        cost = self.eval_seconds()
        elapsed = self.elapsed()
        within_share = self.eval_spent + cost <= self.eval_share * elapsed
        return within_share and elapsed + cost + 2 * self.step_seconds() <= self.horizon()

    def checkpoint_fits(self) -> bool:
        """True when an intermediate checkpoint now still leaves room for the last steps and the finish."""
        return self.elapsed() + self.save_seconds() + 2 * self.step_seconds() <= self.horizon()


def eval_token_cap(seconds_per_token: float, budget_s: float, eval_share: float, evaluations: int = 6) -> int:
    """Validation tokens per evaluation so that `evaluations` of them cost `eval_share` of `budget_s`."""
    return int(eval_share * budget_s / evaluations / max(seconds_per_token, 1e-12))


__all__ = ["TimeBudget", "eval_token_cap", "FINISH_SECONDS"]
