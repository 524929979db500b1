"""Sampling primitives shared by `gptforge.generate` and the serving engine.

`SamplingParams` carries the decoding parameters under their Hugging Face / OpenAI names;
`process_logits` applies penalties, biases and filters row by row in the order `transformers`
applies its logits processors; `sample_next_token` draws (or argmaxes) the next token;
`StopStringMatcher` and `IncrementalDetokenizer` turn token ids into safe-to-show text deltas.
"""

from __future__ import annotations

import codecs
import math
from dataclasses import dataclass, fields, replace
from typing import Any, Optional, Sequence, Union

import torch

from .errors import ParameterError

FILTERED = float("-inf")  # value of a logit that may not be chosen
# Temperatures below this are greedy: dividing logits by ~0 overflows to inf/NaN (vLLM uses the same bound).
GREEDY_TEMPERATURE = 1e-5


@dataclass
class SamplingParams:
    """Decoding parameters of one request (HF/OpenAI names; 0 / 1.0 / None mean "off")."""

    max_new_tokens: int = 64
    min_new_tokens: int = 0
    do_sample: bool = False  # greedy unless True (temperature 0 also means greedy)
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    typical_p: float = 1.0
    repetition_penalty: float = 1.0  # HF/CTRL: divides positive, multiplies negative logits of seen tokens
    presence_penalty: float = 0.0  # OpenAI: subtracted once from each token already generated
    frequency_penalty: float = 0.0  # OpenAI: subtracted per occurrence in the generated text
    no_repeat_ngram_size: int = 0
    logit_bias: Optional[dict[int, float]] = None
    stop: Optional[Union[str, list[str]]] = None
    eos_token_id: Optional[Union[int, list[int]]] = None
    seed: Optional[int] = None
    num_return_sequences: int = 1
    num_beams: int = 1
    length_penalty: float = 1.0
    early_stopping: Union[bool, str] = False  # True, False or "never" as in HF beam search
    logprobs: bool = False
    top_logprobs: int = 0
    prompt_lookup_num_tokens: int = 0  # speculative decoding: draft up to this many tokens from the context
    max_matching_ngram_size: int = 2  # the longest n-gram matched when drafting (transformers' default)

    def __post_init__(self) -> None:
        self.validate()

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> "SamplingParams":
        """Build from keyword arguments; an unknown name raises ValueError naming it."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise ParameterError(unknown[0], f"unknown generation parameter(s): {', '.join(unknown)} "
                             f"(known: {', '.join(sorted(known))})")
        return cls(**{k: v for k, v in kwargs.items() if v is not None})

    @property
    def greedy(self) -> bool:
        """True when the next token is the argmax (no sampling)."""
        return not self.do_sample or self.temperature < GREEDY_TEMPERATURE

    @property
    def stop_strings(self) -> list[str]:
        """`stop` as a list of strings."""
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    @property
    def eos_token_ids(self) -> list[int]:
        """`eos_token_id` as a list of ids."""
        if self.eos_token_id is None:
            return []
        return [self.eos_token_id] if isinstance(self.eos_token_id, int) else list(self.eos_token_id)

    @property
    def needs_processing(self) -> bool:
        """True when `process_logits` would change this row's logits."""
        return (self.min_new_tokens > 0 or self.repetition_penalty != 1.0 or self.presence_penalty != 0.0
                or self.frequency_penalty != 0.0 or self.no_repeat_ngram_size > 0 or bool(self.logit_bias)
                or (not self.greedy and (self.temperature != 1.0 or self.top_k > 0 or self.top_p < 1.0
                                         or self.min_p > 0.0 or self.typical_p < 1.0)))

    def replace(self, **changes: Any) -> "SamplingParams":
        """A validated copy with some fields changed."""
        return replace(self, **changes)

    def validate(self) -> "SamplingParams":
        """Raise ValueError naming the first invalid parameter; return self."""
        def need(ok: bool, name: str, expected: str) -> None:
            if not ok:
                raise ParameterError(name, f"invalid generation parameter {name}={getattr(self, name)!r}: "
                                     f"expected {expected}")

        def is_int(value: Any) -> bool:
            return isinstance(value, int) and not isinstance(value, bool)

        def is_num(value: Any) -> bool:
            return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

        need(is_int(self.max_new_tokens) and self.max_new_tokens >= 1, "max_new_tokens", "an integer >= 1")
        need(is_int(self.min_new_tokens) and 0 <= self.min_new_tokens <= self.max_new_tokens, "min_new_tokens",
             "an integer between 0 and max_new_tokens")
        need(isinstance(self.do_sample, bool), "do_sample", "true or false")
        need(is_num(self.temperature) and self.temperature >= 0, "temperature", "a number >= 0")
        need(is_int(self.top_k) and self.top_k >= 0, "top_k", "an integer >= 0 (0 disables it)")
        need(is_num(self.top_p) and 0 < self.top_p <= 1, "top_p", "a number in (0, 1]")
        need(is_num(self.min_p) and 0 <= self.min_p <= 1, "min_p", "a number in [0, 1]")
        need(is_num(self.typical_p) and 0 < self.typical_p <= 1, "typical_p", "a number in (0, 1]")
        need(is_num(self.repetition_penalty) and self.repetition_penalty > 0, "repetition_penalty", "a number > 0")
        need(is_num(self.presence_penalty) and -2 <= self.presence_penalty <= 2, "presence_penalty",
             "a number in [-2, 2]")
        need(is_num(self.frequency_penalty) and -2 <= self.frequency_penalty <= 2, "frequency_penalty",
             "a number in [-2, 2]")
        need(is_int(self.no_repeat_ngram_size) and self.no_repeat_ngram_size >= 0, "no_repeat_ngram_size",
             "an integer >= 0")
        if self.logit_bias is not None:
            need(isinstance(self.logit_bias, dict), "logit_bias", "a mapping of token id to bias")
            clean: dict[int, float] = {}
            for key, value in self.logit_bias.items():
                try:
                    token = int(key)
                except (TypeError, ValueError):
                    raise ParameterError("logit_bias", f"invalid generation parameter logit_bias: key {key!r} is "
                                         "not a token id") from None
                need(token >= 0, "logit_bias", "token ids >= 0")
                need(is_num(value) and -100 <= value <= 100, "logit_bias", "biases in [-100, 100]")
                clean[token] = float(value)
            self.logit_bias = clean
        if self.stop is not None:
            need(isinstance(self.stop, str) or (isinstance(self.stop, (list, tuple))
                                                and all(isinstance(s, str) for s in self.stop)),
                 "stop", "a string or a list of strings")
            need(all(s for s in self.stop_strings), "stop", "non-empty strings")
            self.stop = self.stop_strings
        if self.eos_token_id is not None:
            ids = self.eos_token_id if isinstance(self.eos_token_id, (list, tuple)) else [self.eos_token_id]
            need(all(is_int(i) and i >= 0 for i in ids), "eos_token_id", "a token id or a list of token ids")
            self.eos_token_id = list(ids) if isinstance(self.eos_token_id, (list, tuple)) else self.eos_token_id
        need(self.seed is None or is_int(self.seed), "seed", "an integer or None")
        need(is_int(self.num_return_sequences) and self.num_return_sequences >= 1, "num_return_sequences",
             "an integer >= 1")
        need(is_int(self.num_beams) and self.num_beams >= 1, "num_beams", "an integer >= 1")
        need(is_num(self.length_penalty), "length_penalty", "a finite number")
        need(self.early_stopping in (True, False, "never"), "early_stopping", "true, false or \"never\"")
        if self.num_beams > 1:
            need(self.num_return_sequences <= self.num_beams, "num_return_sequences",
                 f"at most num_beams ({self.num_beams}) with beam search")
            need(not self.do_sample, "do_sample", "false with num_beams > 1 (beam search is deterministic)")
        need(isinstance(self.logprobs, bool) or (is_int(self.logprobs) and self.logprobs >= 0), "logprobs",
             "true/false or a number of top log-probabilities")
        if is_int(self.logprobs) and not isinstance(self.logprobs, bool):
            # OpenAI completions: logprobs=N means "return the N most likely alternatives".
            self.top_logprobs = max(self.top_logprobs, self.logprobs) if is_int(self.top_logprobs) else self.logprobs
            self.logprobs = True
        need(is_int(self.top_logprobs) and 0 <= self.top_logprobs <= 20, "top_logprobs", "an integer in [0, 20]")
        need(is_int(self.prompt_lookup_num_tokens) and self.prompt_lookup_num_tokens >= 0, "prompt_lookup_num_tokens",
             "an integer >= 0 (0 disables prompt-lookup decoding)")
        need(is_int(self.max_matching_ngram_size) and self.max_matching_ngram_size >= 1, "max_matching_ngram_size",
             "an integer >= 1")
        if self.prompt_lookup_num_tokens:
            need(self.num_beams == 1, "prompt_lookup_num_tokens", "0 with beam search (num_beams > 1): prompt-lookup "
                 "decoding verifies drafts for greedy decoding and sampling only")
        return self


# ---- logits processing -----------------------------------------------------------------------

def _apply_top_k(row: torch.Tensor, top_k: int, keep: int) -> torch.Tensor:
    k = min(max(top_k, keep), row.shape[-1])
    threshold = torch.topk(row, k).values[-1]
    return row.masked_fill(row < threshold, FILTERED)


def _apply_top_p(row: torch.Tensor, top_p: float, keep: int) -> torch.Tensor:
    sorted_logits, sorted_idx = torch.sort(row, descending=False)
    cumulative = sorted_logits.softmax(-1).cumsum(-1)
    remove = cumulative <= (1 - top_p)  # the low-probability tail holding at most 1 - top_p of the mass
    remove[-keep:] = False
    return row.masked_fill(remove.scatter(0, sorted_idx, remove), FILTERED)


def _apply_min_p(row: torch.Tensor, min_p: float, keep: int) -> torch.Tensor:
    probs = row.softmax(-1)
    remove = probs < min_p * probs.max()
    order = torch.argsort(row, descending=True)
    remove_sorted = remove[order]
    remove_sorted[:keep] = False
    return row.masked_fill(remove_sorted.scatter(0, order, remove_sorted), FILTERED)


def _apply_typical_p(row: torch.Tensor, mass: float, keep: int) -> torch.Tensor:
    logp = row.log_softmax(-1)
    entropy = -(logp * logp.exp()).nansum()
    surprise_gap = (-logp - entropy).abs()  # distance of each token's surprisal from the expected one
    sorted_gap, order = torch.sort(surprise_gap, descending=False)
    cumulative = row[order].softmax(-1).cumsum(-1)
    last = min(int((cumulative < mass).sum()), sorted_gap.shape[-1] - 1)
    remove_sorted = sorted_gap > sorted_gap[last]
    remove_sorted[:keep] = False
    return row.masked_fill(remove_sorted.scatter(0, order, remove_sorted), FILTERED)


def _banned_ngram_tokens(context: Sequence[int], n: int) -> list[int]:
    """Tokens that would repeat an n-gram already present in `context` (HF NoRepeatNGram semantics)."""
    if len(context) + 1 < n:
        return []
    prefix = tuple(context[len(context) - n + 1:]) if n > 1 else ()
    banned = []
    for start in range(len(context) - n + 1):
        if tuple(context[start:start + n - 1]) == prefix:
            banned.append(context[start + n - 1])
    return banned


def process_logits(logits: torch.Tensor, params: Sequence[SamplingParams], generated: Sequence[Sequence[int]],
                   prompts: Optional[Sequence[Sequence[int]]] = None, min_tokens_to_keep: int = 1) -> torch.Tensor:
    """Apply penalties, logit bias and filters to next-token logits (B, V), one row per request.

    `generated[i]` are the tokens generated so far for row i; `prompts[i]` (optional) its prompt.
    Repetition penalty and no-repeat n-grams look at prompt + generated (as `transformers` does);
    presence/frequency penalties and `min_new_tokens` look at the generated tokens only (as OpenAI does).
    Order: repetition, no-repeat n-gram, min_new_tokens, logit bias, presence/frequency, temperature,
    top-k, top-p, min-p, typical-p. Rows whose parameters are all neutral are returned unchanged.
    """
    if logits.dim() != 2 or logits.shape[0] != len(params) or len(generated) != len(params):
        raise ValueError(f"process_logits: logits {tuple(logits.shape)} must be (B, V) with B = len(params) "
                         f"= len(generated) ({len(params)}, {len(generated)})")
    if not any(p.needs_processing for p in params):
        return logits
    out = logits.float().clone()
    vocab = out.shape[-1]
    for i, p in enumerate(params):
        if not p.needs_processing:
            continue
        row = out[i]
        gen = list(generated[i])
        context = (list(prompts[i]) + gen) if prompts is not None else gen
        if p.repetition_penalty != 1.0 and context:
            seen = torch.tensor(sorted(set(context)), dtype=torch.long, device=row.device)
            scores = row[seen]
            row[seen] = torch.where(scores < 0, scores * p.repetition_penalty, scores / p.repetition_penalty)
        if p.no_repeat_ngram_size > 0:
            banned = _banned_ngram_tokens(context, p.no_repeat_ngram_size)
            if banned:
                row[torch.tensor(banned, dtype=torch.long, device=row.device)] = FILTERED
        if len(gen) < p.min_new_tokens:
            for eos in p.eos_token_ids:
                if eos < vocab:
                    row[eos] = FILTERED
        if p.logit_bias:
            for token, bias in p.logit_bias.items():
                if token < vocab:
                    row[token] += bias
        if (p.presence_penalty != 0.0 or p.frequency_penalty != 0.0) and gen:
            counts = torch.bincount(torch.tensor(gen, dtype=torch.long, device=row.device), minlength=vocab)[:vocab]
            counts = counts.to(row.dtype)
            row -= counts * p.frequency_penalty + (counts > 0).to(row.dtype) * p.presence_penalty
        if not p.greedy:
            if p.temperature != 1.0:
                row /= p.temperature
            if p.top_k > 0:
                row = _apply_top_k(row, p.top_k, min_tokens_to_keep)
            if p.top_p < 1.0:
                row = _apply_top_p(row, p.top_p, min_tokens_to_keep)
            if p.min_p > 0.0:
                row = _apply_min_p(row, p.min_p, min_tokens_to_keep)
            if p.typical_p < 1.0:
                row = _apply_typical_p(row, p.typical_p, min_tokens_to_keep)
        out[i] = row
    return out


def make_generator(seed: Optional[int], device: torch.device | str = "cpu") -> Optional[torch.Generator]:
    """A seeded torch.Generator, or None (use the global RNG) when `seed` is None."""
    if seed is None:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(int(seed))
    return generator


def sample_next_token(logits: torch.Tensor, params: Sequence[SamplingParams],
                      generators: Optional[Sequence[Optional[torch.Generator]]] = None) -> torch.Tensor:
    """Next token per row (B,): argmax for greedy rows, a draw from softmax(logits) for sampling rows.

    `logits` should already have gone through `process_logits`; `generators[i]` (optional) makes row i
    reproducible independently of the other rows. A row whose distribution is not finite (overflowing
    penalties and biases) falls back to its argmax instead of failing the whole batch.
    """
    logits = torch.nan_to_num(logits.float(), nan=FILTERED)
    tokens = logits.argmax(dim=-1)
    rows = [i for i, p in enumerate(params) if not p.greedy]
    if not rows:
        return tokens
    probs = logits[rows].softmax(-1)
    ok = torch.isfinite(probs).all(-1) & (probs.sum(-1) > 0)
    shared = [j for j, i in enumerate(rows) if bool(ok[j]) and (generators is None or generators[i] is None)]
    if shared:  # rows on the global RNG: one draw for all of them
        drawn = torch.multinomial(probs[shared], 1)[:, 0]
        tokens[[rows[j] for j in shared]] = drawn
    for j, i in enumerate(rows):
        if bool(ok[j]) and generators is not None and generators[i] is not None:
            tokens[i] = torch.multinomial(probs[j], 1, generator=generators[i])[0]
    return tokens


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor,
                   top_k: int = 0) -> tuple[list[float], Optional[list[list[tuple[int, float]]]]]:
    """log p of `tokens` (N,) under `logits` (N, V) and, with `top_k`, the k most likely (id, log p) per row.

    The one log-prob computation behind `generate`'s logprobs, prompt log-probs and the server's.
    """
    logp = logits.float().log_softmax(-1)
    chosen = logp.gather(-1, tokens.to(logp.device).long()[:, None])[:, 0].tolist()
    if not top_k:
        return chosen, None
    values, indices = logp.topk(min(top_k, logp.shape[-1]), dim=-1)
    tops = [list(zip(i, v)) for i, v in zip(indices.tolist(), values.tolist())]
    return chosen, tops


# ---- text --------------------------------------------------------------------------------------

class StopStringMatcher:
    """Finds stop strings in streamed text, across token boundaries.

    `push(delta)` returns `(text_safe_to_emit, stopped)`. Text that could be the start of a stop string
    is held back until it is resolved; `flush()` releases it when generation ends for another reason.
    After a stop, `stop_string` holds the string that matched and the stop string itself is never emitted.

    The cost of a push depends on the length of the delta and of the longest stop string, not on how
    many stop strings there are: stops are looked up in a set, once per distinct length, at each new
    end position; held-back prefixes are looked up the same way.
    """

    def __init__(self, stop: Optional[Sequence[str]]) -> None:
        self.stops = frozenset(s for s in (stop or []) if s)
        self.lengths = sorted({len(s) for s in self.stops}, reverse=True)  # longest first: ties go to it
        self.prefixes = frozenset(s[:n] for s in self.stops for n in range(1, len(s)))
        self.longest = max(self.lengths, default=0)
        self.pending = ""
        self.stop_string: Optional[str] = None

    @property
    def stopped(self) -> bool:
        return self.stop_string is not None

    def push(self, delta: str) -> tuple[str, bool]:
        """Feed new text; return the part that can be shown and whether a stop string was found."""
        if self.stopped:
            return "", True
        if not self.stops:
            return delta, False
        text = self.pending + delta
        # Only end positions inside the new text can complete a stop: earlier ones were checked before.
        best: Optional[tuple[int, int]] = None  # (start, -length): the earliest start wins, then the longest
        for end in range(len(self.pending) + 1, len(text) + 1):
            for n in self.lengths:
                if n <= end and text[end - n:end] in self.stops and (best is None or (end - n, -n) < best):
                    best = (end - n, -n)
            if best is not None and best[0] + self.longest <= end:
                break  # no later end can start earlier than the match found
        if best is not None:
            start, n = best[0], -best[1]
            self.stop_string = text[start:start + n]
            self.pending = ""
            return text[:start], True
        hold = 0
        for n in range(min(self.longest - 1, len(text)), 0, -1):
            if text[len(text) - n:] in self.prefixes:
                hold = n
                break
        self.pending = text[len(text) - hold:] if hold else ""
        return text[:len(text) - hold], False

    def flush(self) -> str:
        """Release held-back text (generation ended without a stop string)."""
        text, self.pending = ("" if self.stopped else self.pending), ""
        return text


def truncate_at_stop(text: str, stop: Optional[Sequence[str]]) -> tuple[str, Optional[str]]:
    """`text` cut before the earliest stop string, and that string (or None)."""
    matcher = StopStringMatcher(stop)
    shown, stopped = matcher.push(text)
    return (shown, matcher.stop_string) if stopped else (text, None)


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas that never split a multi-byte character.

    Byte-level BPE tokenizers (`tokenizer.token_bytes()` is not None) decode token by token: each token's
    bytes go through an incremental UTF-8 decoder, which holds an incomplete character until the next
    bytes complete it, so a step costs O(1). Other tokenizers (SentencePiece's leading space, character
    level) re-decode a short window of earlier tokens plus the new one and hold text ending in U+FFFD.
    """

    CONTEXT_TOKENS = 6

    def __init__(self, tokenizer: Any, prompt_ids: Optional[Sequence[int]] = None,
                 skip_special_tokens: bool = False) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.text = ""
        table = tokenizer.token_bytes() if hasattr(tokenizer, "token_bytes") else None
        if table is not None:
            self._table = table
            self._skip = tokenizer.special_ids if skip_special_tokens else frozenset()
            self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
            return
        self._table = None
        self.ids: list[int] = list(prompt_ids or [])[-self.CONTEXT_TOKENS:]
        self.prefix_offset = 0
        self.read_offset = len(self.ids)

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=self.skip_special_tokens)

    def push(self, token_id: int) -> str:
        """Add one token; return the newly complete text (possibly empty)."""
        if self._table is not None:
            piece = self._table[token_id] if 0 <= token_id < len(self._table) else None
            if piece is None or token_id in self._skip:
                return ""
            delta = self._utf8.decode(piece)
            self.text += delta
            return delta
        self.ids.append(int(token_id))
        prefix_text = self._decode(self.ids[self.prefix_offset:self.read_offset])
        full_text = self._decode(self.ids[self.prefix_offset:])
        if len(full_text) > len(prefix_text) and not full_text.endswith("\ufffd"):
            delta = full_text[len(prefix_text):]
            self.prefix_offset = max(self.read_offset, len(self.ids) - self.CONTEXT_TOKENS)
            self.read_offset = len(self.ids)
            # Keep the window short so each step decodes O(1) tokens.
            if self.prefix_offset > 4 * self.CONTEXT_TOKENS:
                drop = self.prefix_offset
                self.ids = self.ids[drop:]
                self.prefix_offset -= drop
                self.read_offset -= drop
            self.text += delta
            return delta
        return ""

    def flush(self) -> str:
        """Text still held at the end (e.g. a genuinely incomplete byte sequence, shown as U+FFFD)."""
        if self._table is not None:
            delta = self._utf8.decode(b"", final=True)
            self.text += delta
            return delta
        prefix_text = self._decode(self.ids[self.prefix_offset:self.read_offset])
        full_text = self._decode(self.ids[self.prefix_offset:])
        delta = full_text[len(prefix_text):] if len(full_text) > len(prefix_text) else ""
        self.prefix_offset = self.read_offset = len(self.ids)
        self.text += delta
        return delta


__all__ = ["SamplingParams", "process_logits", "sample_next_token", "make_generator", "token_logprobs", "StopStringMatcher",
           "IncrementalDetokenizer", "truncate_at_stop", "FILTERED", "GREEDY_TEMPERATURE"]
