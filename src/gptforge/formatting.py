"""Numbers for people: figures rounded to what they can tell apart, sizes in KiB/MiB/GiB, metric names in words.

Machine output (`--json`, metrics.jsonl) keeps full precision; these are for the lines a person reads.
This module imports nothing, so every layer can use it.
"""

from __future__ import annotations

import math


def round_figure(value: float) -> str:
    """3 significant digits, no exponent for everyday sizes: 5.4741 -> '5.47', 238.44 -> '238', 4174.2 -> '4,174'."""
    if not math.isfinite(value):
        return str(value)
    if value == 0:
        return "0"
    magnitude = abs(value)
    if magnitude >= 100:
        return f"{value:,.0f}"
    if magnitude >= 1e-3:
        return f"{value:#.3g}".rstrip(".")  # '#' keeps trailing zeros: 5.40 next to 5.47, not 5.4
    return f"{value:.2e}"


def metric_phrase(name: str, value: float) -> str:
    """'val_loss 5.47', 'perplexity 238' (val_ppl reads as perplexity), 'accuracy 0.875'."""
    if name == "val_ppl":
        name = "perplexity"
    elif name.endswith("_ppl"):
        name = f"{name[:-4]} perplexity"
    return f"{name} {round_figure(value)}"


def human_bytes(size: int) -> str:
    """A byte count in the largest binary unit that keeps it >= 1: 560408 -> '547 KiB', 1536 -> '1.5 KiB'."""
    value = float(size)
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            if unit == "bytes":
                return f"{size:,} bytes"
            return f"{value:.3g} {unit}" if value < 100 else f"{value:,.0f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


__all__ = ["round_figure", "metric_phrase", "human_bytes"]
