"""Perplexity and bits-per-byte of a token stream, with a sliding window.

Each window feeds the model `max_length` tokens and scores the `stride` newest ones, so every token
is scored exactly once with at least `max_length - stride` tokens of context (a smaller stride gives
more context and costs more forward passes; stride = max_length is lm-eval's rolling window). With `prefix=True` a BOS/EOS token is
put in front so the first real token is scored too and bits-per-byte covers every byte of the text.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Optional, Sequence

from ..progress import Progress

from .scoring import context_length, prefix_token_id, score_continuations

if TYPE_CHECKING:
    from ..model import GPT
    from ..tokenizer import Tokenizer


@dataclass
class PerplexityResult:
    """Totals and derived figures of one perplexity run."""

    source: str
    nll_sum: float  # nats, summed over scored tokens
    num_tokens: int  # tokens scored
    num_bytes: int  # UTF-8 bytes of the text those tokens spell
    max_length: int
    stride: int

    @property
    def loss(self) -> float:
        return self.nll_sum / self.num_tokens if self.num_tokens else float("nan")

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss) if self.num_tokens else float("nan")

    @property
    def bits_per_byte(self) -> float:
        return self.nll_sum / (math.log(2) * self.num_bytes) if self.num_bytes else float("nan")

    def to_dict(self) -> dict:
        """JSON-ready: the totals plus loss, perplexity, bits_per_token and bits_per_byte."""
        out = asdict(self)
        out.update(loss=self.loss, perplexity=self.perplexity, bits_per_byte=self.bits_per_byte,
                   bits_per_token=self.loss / math.log(2) if self.num_tokens else float("nan"))
        return out


def sliding_windows(num_tokens: int, max_length: int, stride: int) -> Iterator[tuple[int, int, int]]:
    """(begin, first_scored, end) windows: tokens first_scored..end-1 are scored given tokens from begin.

    The model input is tokens begin..end-2 (at most `max_length`); the first window scores up to
    `max_length` tokens, each later one `stride` new tokens with at least `max_length - stride` tokens
    of context. Position 0 has nothing to condition on and is never scored.
    """
    if not 1 <= stride <= max_length:
        raise ValueError(f"stride must be between 1 and max_length ({max_length}), got {stride}")
    scored_until = 1
    while scored_until < num_tokens:
        end = min(scored_until + (max_length if scored_until == 1 else stride), num_tokens)
        yield max(0, end - 1 - max_length), scored_until, end
        scored_until = end


def perplexity_of_tokens(model: "GPT", token_ids: Sequence[int], *, max_length: Optional[int] = None,
                         stride: Optional[int] = None, batch_size: int = 8, num_bytes: int = 0,
                         source: str = "<tokens>", progress: bool = True) -> PerplexityResult:
    """Sliding-window negative log-likelihood of `token_ids` (the first one is context only)."""
    length = context_length(model, max_length)
    stride = length if stride is None else stride
    windows = list(sliding_windows(len(token_ids), length, stride))
    pairs = [(token_ids[b:s], token_ids[s:e]) for b, s, e in windows]
    nll_sum = 0.0
    scored = 0
    bar = Progress(sum(e - s for _, s, e in windows), desc=f"perplexity {source}", unit="tok", enabled=progress)
    # Chunks keep the (sorted) request list bounded for long shards while batches stay full.
    chunk = batch_size * 64
    for start in range(0, len(pairs), chunk):
        part = pairs[start:start + chunk]
        scores = score_continuations(model, part, batch_size=batch_size, max_length=length)
        nll_sum -= sum(s.logprob for s in scores)
        n = sum(s.num_tokens for s in scores)
        scored += n
        bar.update(n)
    bar.close()
    return PerplexityResult(source, nll_sum, scored, num_bytes, length, stride)


def perplexity_of_text(model: "GPT", tokenizer: "Tokenizer", text: str, *, max_length: Optional[int] = None,
                       stride: Optional[int] = None, batch_size: int = 8, prefix: bool = True,
                       max_tokens: Optional[int] = None, source: str = "<text>",
                       progress: bool = True) -> PerplexityResult:
    """Perplexity and bits-per-byte of a text (its first `max_tokens` tokens); with `prefix`, every token is scored."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    if max_tokens is not None:
        ids = ids[:max_tokens]
        text = tokenizer.decode(ids)
    if prefix:
        ids = [prefix_token_id(tokenizer)] + ids
        num_bytes = len(text.encode("utf-8"))
    else:
        num_bytes = len(tokenizer.decode(ids[1:]).encode("utf-8"))
    if len(ids) < 2:
        raise ValueError(f"{source}: the text is too short to score (it needs at least one token after the first)")
    return perplexity_of_tokens(model, ids, max_length=max_length, stride=stride, batch_size=batch_size,
                                num_bytes=num_bytes, source=source, progress=progress)


def perplexity_of_file(model: "GPT", tokenizer: "Tokenizer", path: str | Path, **kwargs: Any) -> PerplexityResult:
    """Perplexity of a UTF-8 text file (see `perplexity_of_text` for the options)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--text: no such file: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    if not text.strip():
        raise ValueError(f"{path}: the file is empty")
    return perplexity_of_text(model, tokenizer, text, source=str(path), **kwargs)


def read_shard_tokens(directory: str | Path, split: str = "val", max_tokens: Optional[int] = None,
                      tokenizer: Optional["Tokenizer"] = None) -> list[int]:
    """The first `max_tokens` tokens of a split of a `gptforge prepare` folder.

    With `tokenizer`, checks that the shards were written with the same vocabulary: ids from another
    tokenizer would give a meaningless perplexity.
    """
    import numpy as np

    from ..data.shards import load_prepared

    corpus = load_prepared(directory)
    if tokenizer is not None and corpus.tokenizer.backend.get_vocab() != tokenizer.backend.get_vocab():
        raise ValueError(f"--shards {directory}: the shards were tokenized with a different tokenizer than the "
                         "model's; prepare the corpus with the model's tokenizer (gptforge prepare --tokenizer DIR)")
    parts, remaining = [], max_tokens if max_tokens is not None else float("inf")
    for path, start, end in corpus.segments(split):
        if remaining <= 0:
            break
        end = int(min(end, start + remaining))
        if end > start:
            parts.append(np.memmap(path, dtype=corpus.dtype, mode="r")[start:end].astype(np.int64))
            remaining -= end - start
    return np.concatenate(parts).tolist() if parts else []


def perplexity_of_shards(model: "GPT", tokenizer: "Tokenizer", directory: str | Path, *, split: str = "val",
                         max_tokens: Optional[int] = None, **kwargs: Any) -> PerplexityResult:
    """Perplexity of the token shards of one split (documents are already joined by EOS tokens)."""
    ids = read_shard_tokens(directory, split, max_tokens, tokenizer)
    if len(ids) < 2:
        raise ValueError(f"--shards {directory}: split '{split}' has fewer than two tokens")
    if max(ids) >= model.config.vocab_size:
        raise ValueError(f"--shards {directory}: token id {max(ids)} is outside the model's vocabulary "
                         f"({model.config.vocab_size})")
    # Bits-per-byte counts the bytes of the text the scored tokens spell, without special tokens.
    num_bytes = len(tokenizer.decode(ids[1:], skip_special_tokens=True).encode("utf-8"))
    return perplexity_of_tokens(model, ids, num_bytes=num_bytes, source=f"{directory} [{split}]", **kwargs)
