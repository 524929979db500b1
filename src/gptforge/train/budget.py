"""Time-budgeted runs: the schedule, the evaluations and the last step follow measured speed.

A run with `train.max_time` (and `train.time_schedule`, the default) is planned in seconds rather than
steps. The budget covers everything `train` does: steps, evaluations, checkpoints, the final evaluation,
writing model/ and the loss curve. At each step boundary `TimeBudget` answers from what it measured so
far (recent step times, the last evaluation's cost, the last checkpoint's cost, each scaled by how much
slower or faster steps run now than when it was measured):

- `progress()`: the share of the *training window* spent: from the first step (set-up and the opening
  evaluation come before it) to the horizon, the budget minus what the run still has to do after its
  last step (final evaluation, saving). The lr schedule follows it, so warmup and decay are fractions of
  the budget's training time even when the machine slows down midway;
- `last_step_due()`: whether the step after this one would no longer fit; that step is then the last,
  taken at progress 1.0, so the decay always completes;
- `eval_due()`: whether an evaluation now keeps the evaluations during training within `eval_share` of
  the training time so far, spaced by their measured cost (one costing 1 s with a 5% share: every 20 s
  at most); the opening evaluation (it measures the cost) and the final one come on top.

Nothing here is exact: a step that suddenly takes much longer than the ones before can overrun the
budget by about that step.
"""

from __future__ import annotations

import statistics
import time
from collections import deque
from typing import Optional

# Drawing loss_curve.png and closing the run (matplotlib is imported at the start of a timed run).
FINISH_SECONDS = 1.0
# Disk speed assumed for the final checkpoint until one has been measured (a conservative figure).
WRITE_BYTES_PER_S = 100e6
MAX_SLOWDOWN = 2.0  # most that measured costs are scaled up by when steps slow down (see `slowdown`)
RECENT_STEPS = 5  # step times the estimate is the median of: quick to follow a slowdown, deaf to one spike


class TimeBudget:
    """Measures a run against its wall-clock budget and decides its schedule position, evaluations and end."""

    def __init__(self, seconds: float, eval_share: float, *, spent: float = 0.0, eval_spent: float = 0.0,
                 progress: float = 0.0, checkpoint_bytes: int = 0, last_eval_s: float = 0.0,
                 origin: Optional[float] = None, started: Optional[float] = None) -> None:
        self.seconds, self.eval_share = seconds, eval_share
        self.eval_spent = eval_spent  # seconds in evaluations during training (after the first step)
        self._spent_before = spent  # seconds of earlier sessions of a resumed run
        self._start = time.perf_counter() if started is None else started  # perf_counter() of this session's start
        self._progress = progress
        self.origin = origin  # elapsed seconds when the first step began (progress 0)
        self._recent: deque[float] = deque(maxlen=RECENT_STEPS)
        self._last_eval_at: Optional[float] = None  # elapsed seconds at the end of the last evaluation
        self._fastest: Optional[float] = None  # fastest typical step time seen: the reference for a slowdown
        # (seconds, step time when measured); a resumed run starts from its last evaluation's cost.
        self._eval: Optional[tuple[float, Optional[float]]] = (last_eval_s, None) if last_eval_s else None
        self._save: Optional[tuple[float, Optional[float]]] = None  # a checkpoint write
        self._write: Optional[tuple[float, Optional[float]]] = None  # a model folder write (best/)
        self._save_guess = checkpoint_bytes / WRITE_BYTES_PER_S

    # ---- measurements ----------------------------------------------------------------------------

    def elapsed(self) -> float:
        """Seconds of the budget spent, earlier sessions included."""
        return self._spent_before + time.perf_counter() - self._start

    def record_step(self, seconds: float) -> None:
        """One optimizer step (with its logging) took `seconds`."""
        self._recent.append(seconds)
        if len(self._recent) == RECENT_STEPS:
            typical = self.step_seconds()
            self._fastest = typical if self._fastest is None else min(self._fastest, typical)

    def begin_training(self) -> None:
        """The first optimizer step starts now: the schedule's progress counts from here."""
        if self.origin is None:
            self.origin = self.elapsed()

    def record_eval(self, seconds: float) -> None:
        """An evaluation took `seconds`."""
        if self.origin is not None:
            self.eval_spent += seconds
        self._eval = (seconds, self.step_seconds() or None)
        self._last_eval_at = self.elapsed()

    def record_model_write(self, seconds: float) -> None:
        """Writing a model folder (best/ after an evaluation) took `seconds`; it counts as evaluation time."""
        if self.origin is not None:
            self.eval_spent += seconds
        self._write = (seconds, self.step_seconds() or None)
        self._last_eval_at = self.elapsed()

    def record_save(self, seconds: float) -> None:
        """A checkpoint write took `seconds`."""
        self._save = (seconds, self.step_seconds() or None)

    def step_seconds(self) -> float:
        """Estimated duration of the next step (0.0 before the first one)."""
        return statistics.median(self._recent) if self._recent else 0.0

    def slowdown(self, then: Optional[float]) -> float:
        """How much slower than at step time `then` other work is now likely to run (1.0 when unknown).

        The square root of the step slowdown, at most 2: under contention evaluation and saving slow
        down far less than training steps (two busy loops on a loaded 2-core machine made steps 12x to
        40x slower, the final evaluation and saving 1x to 3x), so scaling by the step ratio ended such
        runs a fifth early; later evaluations re-measure their cost anyway.
        """
        now, then = self.step_seconds(), then or self._fastest
        if not now or not then:
            return 1.0
        return min(max(now / then, 0.25) ** 0.5, MAX_SLOWDOWN)

    def eval_seconds(self) -> float:
        """Estimated cost of the next evaluation (0.0 before one was measured)."""
        return self._eval[0] * self.slowdown(self._eval[1]) if self._eval else 0.0

    def model_write_seconds(self) -> float:
        """Estimated cost of writing model/ (a third of a checkpoint until one was measured)."""
        if self._write is None:
            return self._save_guess / 3 * self.slowdown(None)
        return self._write[0] * self.slowdown(self._write[1])

    def save_seconds(self) -> float:
        """Estimated cost of the next checkpoint write."""
        if self._save is None:
            return self._save_guess * self.slowdown(None)
        return self._save[0] * self.slowdown(self._save[1])

    def reserve(self) -> float:
        """Seconds the run needs after its last step: final evaluation, final checkpoint, model/, the plot."""
        return (self.eval_seconds() + self.save_seconds() + self.model_write_seconds()
                + FINISH_SECONDS * self.slowdown(None))

    # ---- decisions ---------------------------------------------------------------------------------

    def horizon(self) -> float:
        """Seconds by which the last optimizer step must end."""
        return max(self.seconds - self.reserve(), 1e-9)

    def progress(self) -> float:
        """Share of the training window spent, 0..1; never decreases (the lr schedule follows it)."""
        origin = self.elapsed() if self.origin is None else self.origin
        window = max(self.horizon() - origin, 1e-9)
        self._progress = max(self._progress, min((self.elapsed() - origin) / window, 1.0))
        return self._progress

    def finish(self) -> None:
        """The final step is being taken: the schedule stands at its end from now on."""
        self._progress = 1.0

    def last_step_due(self) -> bool:
        """True when, after the coming step, another one would not fit the horizon."""
        # The slowest recent step, not the median: on an erratic machine ending a step early costs
        # less than overrunning the budget by one.
        slowest = max(self._recent, default=0.0)
        return self.elapsed() + 2 * slowest > self.horizon()

    def eval_due(self) -> bool:
        """True when an evaluation now keeps evaluations within their share and leaves room to finish."""
        if self.origin is None or not self.eval_share:
            return False
        cost = self.eval_seconds() + (self._write[0] if self._write else 0.0)
        elapsed = self.elapsed()
        within_share = self.eval_spent + cost <= self.eval_share * (elapsed - self.origin)
        since = elapsed - (self.origin if self._last_eval_at is None else max(self._last_eval_at, self.origin))
        spaced = since * self.eval_share >= cost
        # Not when the final evaluation comes sooner than the spacing would allow anyway.
        return within_share and spaced and elapsed + max(cost / self.eval_share, 2 * self.step_seconds()) \
            <= self.horizon()

    def checkpoint_fits(self) -> bool:
        """True when an intermediate checkpoint now still leaves room for the last steps and the finish."""
        return self.elapsed() + self.save_seconds() + 2 * self.step_seconds() <= self.horizon()


def eval_token_cap(seconds_per_token: float, budget_s: float, eval_share: float, evaluations: int = 6) -> int:
    """Validation tokens per evaluation so that `evaluations` of them cost `eval_share` of `budget_s`."""
    return round(eval_share * budget_s / evaluations / max(seconds_per_token, 1e-12))


__all__ = ["TimeBudget", "eval_token_cap", "FINISH_SECONDS"]
