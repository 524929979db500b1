"""Pretraining batches: random windows from memory-mapped token shards, with exact-resume state.

Batch k of rank r is global batch g = k * world_size + r, and its windows come from a generator
seeded with (seed, g). So the state is one counter, resume is exact, and N ranks with accumulation A
see the same windows as one process with accumulation N * A.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import torch

from .corpus import CorpusError
from .shards import PreparedCorpus, load_prepared


class TokenWindowLoader:
    """`next_batch()` -> (input_ids, labels), each (batch_size, seq_len) int64; labels are inputs shifted by one."""

    def __init__(self, corpus: PreparedCorpus | str | Path, split: str = "train", batch_size: int = 8,
                 seq_len: int = 256, seed: int = 0, rank: int = 0, world_size: int = 1) -> None:
        self.corpus = corpus if isinstance(corpus, PreparedCorpus) else load_prepared(corpus)
        if batch_size <= 0 or seq_len <= 0:
            raise ValueError(f"batch_size and seq_len must be positive, got {batch_size} and {seq_len}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        self.split, self.batch_size, self.seq_len = split, batch_size, seq_len
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.batches = 0
        dtype = self.corpus.dtype
        # Windows never cross segment ends, so each segment offers len - seq_len start positions.
        self.arrays, counts = [], []
        for path, start, end in self.corpus.segments(split):
            if end - start > seq_len:
                self.arrays.append(np.memmap(path, dtype=dtype, mode="r")[start:end])
                counts.append(end - start - seq_len)
        if not self.arrays:
            raise CorpusError(f"{self.corpus.directory}: split {split!r} has {self.corpus.num_tokens(split)} tokens, "
                              f"not enough for one window of seq_len={seq_len} (+1); use a shorter data.seq_len, "
                              "more data or a larger val_fraction")
        self.cumulative = np.cumsum(counts)

    @property
    def num_windows(self) -> int:
        return int(self.cumulative[-1])

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        g = self.batches * self.world_size + self.rank
        self.batches += 1
        rng = np.random.default_rng([self.seed, g])
        starts = rng.integers(0, self.num_windows, size=self.batch_size)
        which = np.searchsorted(self.cumulative, starts, side="right")
        offsets = starts - np.concatenate(([0], self.cumulative[:-1]))[which]
        rows = np.stack([self.arrays[w][o:o + self.seq_len + 1] for w, o in zip(which, offsets)]).astype(np.int64)
        rows = torch.from_numpy(rows)
        return rows[:, :-1], rows[:, 1:]

    def state_dict(self) -> dict[str, Any]:
        return {"batches": self.batches, "seed": self.seed, "split": self.split, "batch_size": self.batch_size,
                "seq_len": self.seq_len, "world_size": self.world_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("seed", "batch_size", "seq_len"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(f"data position was saved with {key}={state[key]}, but the loader has "
                                 f"{key}={getattr(self, key)}; resume with the same data settings")
        self.batches = int(state["batches"])


def eval_windows(corpus: PreparedCorpus, split: str, seq_len: int, batch_size: int,
                 max_tokens: Optional[int] = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Fixed, non-overlapping windows over `split` (evenly thinned to about `max_tokens`), in batches."""
    windows: list[np.ndarray] = []
    for path, start, end in corpus.segments(split):
        arr = np.memmap(path, dtype=corpus.dtype, mode="r")[start:end]
        for offset in range(0, len(arr) - seq_len, seq_len):
            windows.append(arr[offset:offset + seq_len + 1])
    if not windows:
        raise CorpusError(f"{corpus.directory}: split {split!r} has {corpus.num_tokens(split)} tokens, not enough for "
                          f"one evaluation window of seq_len={seq_len} (+1)")
    if max_tokens and len(windows) * seq_len > max_tokens:
        keep = max(1, max_tokens // seq_len)
        picks = np.linspace(0, len(windows) - 1, keep).round().astype(int)
        windows = [windows[i] for i in picks]
    for i in range(0, len(windows), batch_size):
        rows = torch.from_numpy(np.stack(windows[i:i + batch_size]).astype(np.int64))
        yield rows[:, :-1], rows[:, 1:]


def evaluate_split(model: torch.nn.Module, corpus: PreparedCorpus, split: str = "val", seq_len: int = 256,
                   batch_size: int = 8, max_tokens: Optional[int] = None, prefix: str = "val") -> dict[str, float]:
    """Mean next-token loss and perplexity of `model` over fixed windows of `split`."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    with torch.no_grad():
        for x, y in eval_windows(corpus, split, seq_len, batch_size, max_tokens):
            logits = model(x.to(device))
            loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.size(-1)),
                                                     y.to(device).reshape(-1), reduction="sum")
            total += float(loss)
            count += y.numel()
    mean = total / count
    return {f"{prefix}_loss": mean, f"{prefix}_ppl": float(np.exp(min(mean, 50.0)))}


__all__ = ["TokenWindowLoader", "eval_windows", "evaluate_split"]
