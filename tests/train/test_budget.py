"""Time-budgeted runs: the time-fraction schedule, TimeBudget's decisions, the loop and a machine that slows down."""

import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from gptforge.config import Config
from gptforge.model import GPT
from gptforge.train import budget as budget_module
from gptforge.train.budget import FINISH_SECONDS, TimeBudget, eval_token_cap
from gptforge.train.loop import TrainConfig, latest_checkpoint, train
from gptforge.train.metrics import read_metrics
from gptforge.train.schedule import LRSchedule

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from tiny_run import RandomSource  # noqa: E402


# ---- the schedule over fractions of the budget ---------------------------------------------------

def test_warmup_is_a_fraction_of_the_budget_or_its_steps_whichever_ends_first():
    s = LRSchedule(1.0, max_steps=10**9, warmup_steps=0, kind="wsd", min_lr_ratio=0.0, decay_fraction=0.3)
    assert s.lr_at_progress(0.025, step=3, warmup_fraction=0.05) == pytest.approx(0.5)
    assert s.lr_at_progress(0.05, step=4, warmup_fraction=0.05) == 1.0
    # warmup_steps: 50 with a run of 14 steps reached the peak never; now the fraction ends it first.
    s = LRSchedule(1.0, max_steps=10**9, warmup_steps=50, kind="wsd", min_lr_ratio=0.0, decay_fraction=0.3)
    assert s.lr_at_progress(0.06, step=1, warmup_fraction=0.05) == 1.0
    assert s.lr_at_progress(0.01, step=49, warmup_fraction=0.05) == 1.0  # or the steps, when they come first
    assert s.lr_at_progress(0.01, step=9, warmup_fraction=0.05) == pytest.approx(0.2)


@pytest.mark.parametrize("kind", ["wsd", "cosine", "linear", "constant"])
def test_decay_follows_the_fraction_and_ends_exactly_at_one(kind):
    s = LRSchedule(2.0, max_steps=10**9, warmup_steps=0, kind=kind, min_lr_ratio=0.1, decay_fraction=0.4)
    final = 2.0 if kind == "constant" else 0.2
    assert s.lr_at_progress(1.0, step=5, warmup_fraction=0.05) == pytest.approx(final)
    # Whatever the step count: a run of 5 steps and one of 5,000 are at the same lr at the same fraction.
    assert s.lr_at_progress(0.8, step=5, warmup_fraction=0.05) == s.lr_at_progress(0.8, step=5000,
                                                                                   warmup_fraction=0.05)
    lrs = [s.lr_at_progress(p / 100, step=1000, warmup_fraction=0.05) for p in range(5, 101)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
    if kind == "wsd":
        assert s.lr_at_progress(0.59, step=1000, warmup_fraction=0.05) == 2.0  # stable until 1 - decay_fraction
        assert s.lr_at_progress(0.8, step=1000, warmup_fraction=0.05) == pytest.approx(0.2 + 1.8 * (1 - math.sqrt(0.5)))
    if kind == "cosine":
        midpoint = 0.05 + 0.95 / 2
        assert s.lr_at_progress(midpoint, step=1000, warmup_fraction=0.05) == pytest.approx(1.1)
    # A run that ends during its warmup still takes its last step at the final lr.
    short = LRSchedule(2.0, max_steps=10**9, warmup_steps=100, kind=kind, min_lr_ratio=0.1)
    assert short.lr_at_progress(1.0, step=2, warmup_fraction=0.5) == pytest.approx(final)


# ---- TimeBudget's decisions, on a fake clock -----------------------------------------------------

@pytest.fixture
def clock(monkeypatch):
    class Clock:
        now = 500.0

        def __call__(self):
            return self.now

    fake = Clock()
    monkeypatch.setattr(budget_module.time, "perf_counter", fake)
    return fake


def test_progress_is_the_share_of_the_training_window_and_never_goes_back(clock):
    b = TimeBudget(100.0, eval_share=0.05)
    assert b.reserve() == pytest.approx(FINISH_SECONDS)  # no checkpoint bytes, no evaluation measured yet
    clock.now += 2.0  # set-up and the opening evaluation: before the window opens
    b.begin_training()
    for _ in range(5):
        clock.now += 1.0
        b.record_step(1.0)
    b.record_eval(2.0)
    assert b.horizon() == pytest.approx(100.0 - 2.0 - FINISH_SECONDS)
    assert b.progress() == pytest.approx(5.0 / (b.horizon() - 2.0))
    before = b.progress()
    for _ in range(5):
        b.record_step(0.5)  # faster steps shrink the evaluation estimate: the horizon grows
    assert b.horizon() > 100.0 - 2.0 - FINISH_SECONDS and b.progress() == before  # but progress never decreases
    # A resumed run keeps its window: the origin and the seconds spent come from the checkpoint.
    resumed = TimeBudget(100.0, eval_share=0.05, spent=7.0, origin=2.0, last_eval_s=2.0)
    assert resumed.progress() == pytest.approx(5.0 / (100.0 - 2.0 - FINISH_SECONDS - 2.0))


def test_a_slowdown_raises_the_reserve_and_moves_the_last_step_earlier(clock):
    b = TimeBudget(60.0, eval_share=0.05, checkpoint_bytes=50_000_000)
    assert b.save_seconds() == pytest.approx(0.5)  # 50 MB at the assumed 100 MB/s until one is measured
    for _ in range(5):
        b.record_step(0.2)
    b.record_eval(1.0)
    clock.now += 40.0
    reserve_before = b.reserve()
    for _ in range(5):
        b.record_step(0.8)  # steps are now 4x slower
    # Other work slows down less than steps under contention: estimates scale by the square root.
    assert b.slowdown(None) == pytest.approx(2.0)
    assert b.eval_seconds() == pytest.approx(2.0)
    # eval, checkpoint (guessed from its size), model/ (a third of that), closing: each 2x now
    assert b.reserve() == pytest.approx(2.0 + 0.5 * 2.0 + 0.5 / 3 * 2.0 + FINISH_SECONDS * 2.0)
    assert b.reserve() > 1.9 * reserve_before
    clock.now = 500.0 + b.horizon() - 2 * 0.8 + 0.01
    assert b.last_step_due()  # one more step fits, the one after does not
    clock.now -= 0.1
    assert not b.last_step_due()
    b.finish()
    assert b.progress() == 1.0


def test_evaluations_stay_within_their_share_spaced_by_their_cost(clock):
    b = TimeBudget(1000.0, eval_share=0.05)
    b.record_eval(2.0)  # the opening evaluation measures the cost; it is not part of the training window
    assert b.eval_spent == 0.0 and not b.eval_due()
    b.begin_training()
    for _ in range(5):
        b.record_step(0.1)
    clock.now += 39.0
    assert not b.eval_due()  # 2 s after 39 s of training would be 5.1%
    clock.now += 1.0
    assert b.eval_due()  # 2 s of 40 s
    b.record_eval(1.5)
    b.record_model_write(0.5)  # best/ counts as evaluation time
    assert b.eval_spent == 2.0
    clock.now += 60.0
    assert b.eval_due()  # within the share (4 s of 100 s) and 60 s since the last one
    b.eval_spent = 0.0  # however much share has built up, evaluations stay spaced by their cost:
    clock.now -= 30.0
    assert not b.eval_due()  # 2 s / 5% = 40 s between evaluations
    clock.now = 500.0 + 1000.0 - FINISH_SECONDS - 1.5 - 0.5 - 0.1
    assert not b.eval_due()  # no room left before the final evaluation


def test_eval_token_cap():
    assert eval_token_cap(1e-5, budget_s=60, eval_share=0.05, evaluations=6) == 50_000


# ---- the loop --------------------------------------------------------------------------------------

def tiny_model() -> GPT:
    torch.manual_seed(0)
    return GPT(Config.from_name("nano", vocab_size=32, block_size=16))


class SlowSource(RandomSource):
    """RandomSource whose batches take `delay` seconds (a slow data pipeline stands for a slow machine)."""

    def __init__(self, delay: float, stop_at: int = -1) -> None:
        super().__init__()
        self.delay, self.stop_at = delay, stop_at

    def next_batch(self):
        if self.k == self.stop_at:
            os.kill(os.getpid(), signal.SIGINT)  # a Ctrl-C: the loop stops at the next step boundary
        time.sleep(self.delay)
        return super().next_batch()


@pytest.fixture(autouse=True, scope="module")
def _imports_done():
    """Seconds-long first imports (torch's optimizer machinery, matplotlib) are paid before the timed runs."""
    from gptforge.train.metrics import import_plotting
    from gptforge.train.optim import build_optimizer

    build_optimizer(tiny_model(), lr=1e-3)
    import_plotting()


def budget_cfg(**kw) -> TrainConfig:
    return TrainConfig(**{"max_steps": 10**9, "max_time": 8.0, "lr": 3e-3, "schedule": "wsd", "decay_fraction": 0.3,
                          "min_lr_ratio": 0.0, "warmup_fraction": 0.1, "eval_every": 1, "progress": False, **kw})


def evaluate(m):
    return {"val_loss": float(m(torch.arange(16)[None] % 32).float().mean())}


def test_a_time_budget_ends_the_run_with_its_decay_complete(tmp_path):
    result = train(tiny_model(), budget_cfg(), SlowSource(0.05), tmp_path / "run", evaluate=evaluate)
    assert result.out_of_time and not result.interrupted and result.steps > 5
    records = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    lrs = [r["lr"] for r in records]
    assert max(lrs) == pytest.approx(3e-3)  # the warmup reached the peak
    assert lrs[-1] == 0.0 and records[-1]["progress"] == 1.0  # the decay completed on the last step
    progress = [r["progress"] for r in records]
    assert progress == sorted(progress)
    evals = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "val_loss" in r]
    assert evals[0]["step"] == 0 and evals[-1]["step"] == result.steps  # the start measures the cost; the end
    assert json_ready(result.elapsed_s)


def json_ready(value: float) -> bool:
    return isinstance(value, float) and value > 0


def test_resuming_a_time_budgeted_run_spends_what_is_left_of_its_budget(tmp_path):
    run = tmp_path / "run"
    first = train(tiny_model(), budget_cfg(checkpoint_every=1000), SlowSource(0.05, stop_at=8), run,
                  evaluate=evaluate)
    assert first.interrupted and latest_checkpoint(run).name == f"step-{first.steps:08d}"
    spent = first.elapsed_s
    second = train(tiny_model(), budget_cfg(checkpoint_every=1000), SlowSource(0.05), run, evaluate=evaluate,
                   resume=True)
    assert second.out_of_time and second.steps > first.steps
    assert second.elapsed_s > spent  # the clock continued from the checkpoint's seconds
    records = [r for r in read_metrics(run / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in records] == list(range(1, second.steps + 1))
    elapsed = [r["elapsed_s"] for r in records]
    assert elapsed == sorted(elapsed), elapsed
    assert records[-1]["lr"] == 0.0
    # Resuming the finished run trains no further: its schedule is complete.
    third = train(tiny_model(), budget_cfg(checkpoint_every=1000), SlowSource(0.05), run, evaluate=evaluate,
                  resume=True)
    assert third.steps == second.steps and third.losses == []


def test_max_time_without_time_schedule_is_a_hard_stop_that_says_so(tmp_path, caplog):
    cfg = budget_cfg(max_steps=10_000, max_time=1.5, time_schedule=False, warmup_steps=0, eval_every=0)
    with caplog.at_level("INFO", logger="gptforge.train.metrics"):
        result = train(tiny_model(), cfg, SlowSource(0.05), tmp_path / "run")
    assert result.out_of_time and result.steps < 10_000
    records = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    assert records[-1]["lr"] > 0.0  # a step-based schedule cut short
    assert "train.max_time cut training short" in caplog.text and "had not finished" in caplog.text


# ---- a machine that slows down midway --------------------------------------------------------------

@pytest.mark.slow
def test_pretraining_fits_its_budget_when_the_machine_slows_down_midway(tmp_path):
    """The demo's plan (time-budgeted pretraining) for 1 minute; after 20 s both cores get a busy loop each."""
    from test_pretrain import tiny_recipe

    from gptforge.demo import training_overrides
    from gptforge.train.pretrain import pretrain

    budget = 60.0
    recipe = tiny_recipe(tmp_path, schedule="wsd", decay_fraction=0.3, min_lr_ratio=0.0, warmup_steps=50)
    busy: list[subprocess.Popen] = []

    def slow_down() -> None:
        for _ in range(2):
            busy.append(subprocess.Popen([sys.executable, "-c", "while True: pass"]))

    timer = threading.Timer(20.0, slow_down)
    started = time.perf_counter()
    timer.start()
    try:
        run_dir = pretrain(recipe, overrides=training_overrides(budget, None, progress=False))
        wall = time.perf_counter() - started
    finally:
        timer.cancel()
        for process in busy:
            process.kill()
            process.wait()
    assert busy, "the slowdown never started"
    records = read_metrics(run_dir / "metrics.jsonl")
    steps = [r for r in records if "loss" in r]
    assert wall <= 1.05 * budget, (wall, steps[-1])
    assert wall >= 0.8 * budget, (wall, steps[-1])  # and it did not stop early either
    assert steps[-1]["lr"] == 0.0 and steps[-1]["progress"] == 1.0  # decay completed
    assert max(r["lr"] for r in steps) == pytest.approx(1e-2)  # the peak was reached (warmup_steps 50 or 5%)
    slow = [r for r in steps if r["elapsed_s"] > 22.0]
    assert slow, "no step ran after the slowdown began"
    evals = [r for r in records if "val_loss" in r]
    assert len(evals) >= 2 and evals[-1]["step"] == steps[-1]["step"]
