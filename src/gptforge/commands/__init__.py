"""CLI subcommands: each module has `add_arguments(parser)` and `run(args) -> int` (see gptforge.cli)."""

from __future__ import annotations

import os
import sys


def passive_openmp() -> None:
    """Let idle OpenMP workers sleep instead of spin: call before torch is imported (a user's setting wins).

    For decoding (`generate`, `chat`, `serve`): it runs many small ops, and spinning workers burn the cores
    that the other thread, the event loop or another process on a shared machine needs. Measured on a
    2-core host (llama-small, fp32, 2 threads, loaded): 5 tok/s spinning against 13-18 passive.
    libgomp reads the setting once, at load.
    """
    if "torch" not in sys.modules:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def short_spin_openmp() -> None:
    """Let idle OpenMP workers spin briefly, then sleep: call before torch is imported (a user's setting wins).

    For training (`demo`, `pretrain`, `finetune`): large kernels, where sleeping at once costs wake-ups and
    spinning long costs a shared machine. A training step of the demo model, 2 threads on 2 cores, tokens/s:
    libgomp's default 13,650 quiet / 3,110 with a busy loop on each core; passive 10,400 / 4,436;
    GOMP_SPINCOUNT=20000 13,440 / 5,330.
    """
    if "torch" not in sys.modules and "OMP_WAIT_POLICY" not in os.environ:
        os.environ.setdefault("GOMP_SPINCOUNT", "20000")
