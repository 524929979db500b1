"""The one progress display: a tqdm bar on a terminal, a few plain lines in logs (CI, nohup, files)."""

import io
import sys
from pathlib import Path

import pytest

from gptforge import progress as progress_module
from gptforge.progress import Progress


class Terminal(io.StringIO):
    def isatty(self):
        return True


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


@pytest.fixture
def clock(monkeypatch):
    fake = FakeClock()
    monkeypatch.setattr(progress_module.time, "perf_counter", fake)
    monkeypatch.delenv("GPTFORGE_NO_PROGRESS", raising=False)
    return fake


def test_a_log_gets_a_line_every_tenth_not_every_update(clock):
    out = io.StringIO()
    with Progress(1000, desc="work", unit="item", file=out) as bar:
        for _ in range(1000):
            clock.now += 0.01
            bar.update(1)
    lines = out.getvalue().splitlines()
    assert len(lines) == 10, lines  # 10%, 20%, ... 100%; no closing repeat of the last one
    assert "\r" not in out.getvalue()
    assert lines[0] == "work:  10% (100/1,000 item), 100 item/s, ETA 00:09"
    assert lines[-1].startswith("work: 100% (1,000/1,000 item)") and "ETA" not in lines[-1]


def test_a_slow_job_gets_a_line_every_thirty_seconds_with_its_figures(clock):
    out = io.StringIO()
    bar = Progress(100, desc="train", unit="step", file=out)
    for _ in range(6):
        clock.now += 16.0  # two updates per 30 s, each far below 10% of the total
        bar.set_postfix({"loss": "2.5000"})
        bar.update(1)
    lines = out.getvalue().splitlines()
    assert lines == [f"train:   {n}% ({n}/100 step), 0.06 step/s, ETA {eta}, loss 2.5000"
                     for n, eta in ((2, "26:08"), (4, "25:36"), (6, "25:04"))]  # at 32, 64 and 96 s
    clock.now += 1.0
    bar.update(1)
    bar.close()  # closing line: the position moved since the last one
    bar.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 4 and lines[-1].startswith("train:   7% (7/100 step)")


def test_sizes_and_unknown_totals(clock):
    out = io.StringIO()
    bar = Progress(4_000_000, desc="tokenize", unit="B", unit_scale=True, file=out)
    clock.now += 2.0
    bar.update(2_000_000)
    assert out.getvalue().splitlines() == ["tokenize:  50% (2.00MB/4.00MB), 1.00MB/s, ETA 00:02"]
    out = io.StringIO()
    bar = Progress(None, desc="scan", unit="file", file=out)
    for _ in range(3):
        clock.now += 31.0
        bar.update(5)
    assert len(out.getvalue().splitlines()) == 3 and "scan: 15 file" in out.getvalue()


def test_a_terminal_gets_a_tqdm_bar_and_the_switch_turns_it_all_off(clock, monkeypatch):
    out = Terminal()
    bar = Progress(10, desc="work", file=out)
    bar.update(10)
    bar.close()
    assert "\r" in out.getvalue() and "10/10" in out.getvalue()
    budget = Terminal()  # a bar over the seconds of a time budget: position, ETA and figures, no "s/s" rate
    bar = Progress(60, desc="train", unit="s", initial=3, file=budget, show_rate=False)
    bar.set_postfix({"step": "12"})
    bar.set_position(59)
    bar.close()
    assert "59/60 s [" in budget.getvalue() and "step=12" in budget.getvalue() and "s/s" not in budget.getvalue()
    monkeypatch.setenv("GPTFORGE_NO_PROGRESS", "1")
    quiet = io.StringIO()
    with Progress(10, desc="work", file=quiet) as bar:
        bar.update(10)
    assert quiet.getvalue() == "" and not bar.enabled
    disabled = io.StringIO()
    with Progress(10, desc="work", file=disabled, enabled=False) as bar:
        bar.update(10)
    assert disabled.getvalue() == ""


@pytest.mark.slow
def test_pretraining_in_a_log_prints_a_few_lines(tmp_path, capsys, monkeypatch):
    """End to end: corpus preparation and 30 training steps print ~10 lines each to a non-terminal."""
    monkeypatch.delenv("GPTFORGE_NO_PROGRESS", raising=False)
    sys.path.insert(0, str(Path(__file__).parent / "train"))
    from test_pretrain import tiny_recipe

    from gptforge.train.pretrain import pretrain

    pretrain(tiny_recipe(tmp_path, max_steps=30, eval_every=10, progress=True))
    err = capsys.readouterr().err
    train_lines = [line for line in err.splitlines() if line.startswith("train:")]
    tokenize_lines = [line for line in err.splitlines() if line.startswith("tokenize:")]
    assert 2 <= len(train_lines) <= 12, err[-2000:]
    assert train_lines[-1].startswith("train: 100% (30/30 step)") and "loss" in train_lines[-1]
    assert 1 <= len(tokenize_lines) <= 11
    assert "\r" not in err
