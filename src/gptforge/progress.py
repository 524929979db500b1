"""The one progress display: a tqdm bar on a terminal, a periodic single line anywhere else.

In CI logs, `nohup` output and files a tqdm bar prints every refresh as text (a wall of `\\r`-joined
updates). `Progress` draws tqdm only when its stream is a terminal (or a notebook); otherwise it prints
one plain line every `every_fraction` of the total or `every_seconds`, whichever comes first, with the
rate and ETA, plus a closing line:

    tokenize:  40% (1.6MB/4.0MB), 812kB/s, ETA 0:03
    train:  50% (90/180 s), step 412, loss 3.2100, 13,000 tok/s

    with Progress(total, desc="tokenize", unit="B", unit_scale=True, enabled=show) as bar:
        bar.update(n)

`GPTFORGE_NO_PROGRESS=1` turns every display off. This module imports nothing of the package.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any, Optional, TextIO

NO_PROGRESS_ENV = "GPTFORGE_NO_PROGRESS"


def interactive(stream: Any) -> bool:
    """Whether `stream` is a terminal or a notebook, where a redrawn bar reads well."""
    if "ipykernel" in sys.modules:
        return True
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # a closed stream
        return False


class Progress:
    """A progress display over `total` units: tqdm on a terminal, periodic single lines otherwise."""

    def __init__(self, total: Optional[float], *, desc: str, unit: str = "it", initial: float = 0,
                 enabled: bool = True, unit_scale: bool = False, file: Optional[TextIO] = None,
                 every_fraction: float = 0.1, every_seconds: float = 30.0, show_rate: bool = True) -> None:
        self.total, self.desc, self.unit, self.unit_scale = total, desc, unit, unit_scale
        self.show_rate = show_rate  # False where the rate says nothing (a bar over seconds of a budget)
        self.n = initial
        self.file = file if file is not None else sys.stderr
        self.enabled = enabled and os.environ.get(NO_PROGRESS_ENV) != "1"
        self.every_fraction, self.every_seconds = every_fraction, every_seconds
        self.postfix: dict[str, str] = {}
        self._bar: Any = None
        self._start = self._last_time = time.perf_counter()
        self._initial = initial
        self._last_printed: Optional[float] = None  # position of the last printed line
        self._closed = False
        if self.enabled and interactive(self.file):
            from tqdm.auto import tqdm

            # Without a rate (a bar over seconds): "train:  50%|####  | 90/180 s [01:30<01:30, step=412, ...]".
            fmt = None if show_rate else "{l_bar}{bar}| {n_fmt}/{total_fmt} " + unit + " [{elapsed}<{remaining}{postfix}]"
            self._bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, unit_scale=unit_scale,
                             dynamic_ncols=True, file=self.file, bar_format=fmt)

    @property
    def lines(self) -> bool:
        """True when this display prints periodic lines (enabled, not on a terminal)."""
        return self.enabled and self._bar is None

    def update(self, n: float = 1) -> None:
        """Advance by `n` units."""
        self.set_position(self.n + n)

    def set_position(self, value: float) -> None:
        """Move to an absolute position (e.g. seconds spent of a time budget)."""
        if self._bar is not None:
            self._bar.update(value - self._bar.n)
        self.n = value
        if self.lines and self._line_due():
            self._print_line()

    def set_postfix(self, items: dict[str, str]) -> None:
        """Figures shown after the bar (loss, tokens/s, ...), replaced on each call."""
        self.postfix = dict(items)
        if self._bar is not None:
            self._bar.set_postfix(self.postfix, refresh=False)

    def write(self, text: str) -> None:
        """Print a message line (stdout) without breaking the bar."""
        if self._bar is not None:
            self._bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        """Finish the display (non-terminal: a closing line unless the last one already showed the end)."""
        if self._closed:
            return
        self._closed = True
        if self._bar is not None:
            self._bar.close()
        elif self.lines and self._last_printed != self.n:
            self._print_line()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ---- periodic lines ------------------------------------------------------------------------

    def _line_due(self) -> bool:
        now = time.perf_counter()
        if now - self._last_time >= self.every_seconds:
            return True
        if not self.total:
            return False
        last = self._initial if self._last_printed is None else self._last_printed
        step = self.every_fraction * self.total
        # A line each time the position crosses the next multiple of every_fraction.
        return int(self.n / step) > int(last / step) or (self.n >= self.total and last < self.total)

    def _print_line(self) -> None:
        self._last_printed, self._last_time = self.n, time.perf_counter()
        print(self.line(), file=self.file, flush=True)

    def line(self) -> str:
        """The current state as one line: percent, position, rate, ETA and the postfix figures."""
        from tqdm import tqdm

        elapsed = max(time.perf_counter() - self._start, 1e-9)
        rate = (self.n - self._initial) / elapsed

        def size(value: float) -> str:
            if self.unit_scale:
                return tqdm.format_sizeof(value, self.unit)
            if value == int(value) or abs(value) >= 100:
                return f"{value:,.0f}"
            return f"{value:,.1f}" if abs(value) >= 10 else f"{value:.2f}"

        suffix = "" if self.unit_scale else f" {self.unit}"
        parts = []
        if self.total:
            pct = 100.0 * min(self.n / self.total, 1.0)
            parts.append(f"{self.desc}: {pct:3.0f}% ({size(self.n)}/{size(self.total)}{suffix})")
        else:
            parts.append(f"{self.desc}: {size(self.n)}{suffix}")
        if rate > 0 and self.show_rate:
            parts.append(f"{size(rate)}{'' if self.unit_scale else ' ' + self.unit}/s")
        if rate > 0 and self.total and self.n < self.total:
            parts.append(f"ETA {tqdm.format_interval(round((self.total - self.n) / rate))}")
        parts += [f"{k} {v}" for k, v in self.postfix.items()]
        return ", ".join(parts)


__all__ = ["Progress", "interactive", "NO_PROGRESS_ENV"]
