"""Structured outputs through llguidance: JSON schemas, JSON mode, regular expressions, choices and Lark
grammars become per-sequence token masks that the engine applies before sampling.

llguidance (Microsoft's low-level guidance engine, in Rust; also a backend of vLLM, SGLang and
llama.cpp) was chosen over xgrammar and outlines-core by `benchmarks/constrained_decoding.py` on a 50k
byte-level BPE vocabulary: its per-token mask costs tens of microseconds (like xgrammar's), a schema
compiles in milliseconds (outlines-core needs over a second: it builds a DFA over the whole vocabulary, and
cannot express recursive schemas), it installs as one dependency-free wheel (xgrammar pulls in triton and
transformers), and it bounds compilation and each mask step with explicit fuel limits, which hostile
schemas need. Lark grammars with embedded JSON schemas (`%json {...}`) express tool calls directly.

Budget: when the remaining `max_tokens` only just covers a way to finish the value, the constraint forces
that way (a greedy closing path: forced bytes, closing quotes and brackets, the shortest allowed tokens),
so a reply cut by the budget still parses in the usual cases; it ends with `finish_reason: "stop"`.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np
import torch

from .errors import APIError, invalid_param

log = logging.getLogger("gptforge.serve.grammar")

# Hostile-input bounds, checked before llguidance sees a grammar (docs/serve.md, "Structured outputs").
MAX_GRAMMAR_CHARS = 64 * 1024  # serialized schema / regex / Lark text / choices
MAX_SCHEMA_DEPTH = 48  # nesting of JSON containers in a schema (deeper ones are refused, not recursed into)
MAX_CHOICES = 1024
# llguidance's own bounds on compiling and on each mask step (defaults are sized for trusted grammars).
LIMITS = dict(max_items_in_row=2000, initial_lexer_fuel=1_000_000, step_lexer_fuel=200_000, step_max_items=50_000,
              max_lexer_states=50_000, max_grammar_size=200_000, verbose_errors=False)
# Start forcing the closing path this many tokens before the budget strictly requires it: a sampled token
# can lengthen the path by more than one (opening `[{"` at once), and a late start cannot close.
CLOSING_MARGIN = 8
CLOSING_WINDOW = 136  # budgets (tokens left) below which the closing path is looked for
MAX_CLOSING_PATH = 64  # longer ways to finish are not forced (a reply cut there ends with "length")
# Full masks one search may compute (the costly step, when no closer fits): bounds the search's work
# whatever the grammar, without a wall clock that a loaded machine would turn into a missed close.
CLOSING_MASKS = 8
COMPILED_CACHE_SIZE = 64
# Compact JSON (a random or weak model cannot loop on whitespace); any \uXXXX escape, as JSON allows.
# Byte of a bitmask -> the logit biases of its 8 tokens (bit i set: token 8k+i allowed, bias 0; else -inf).
_BYTE_BIAS = np.where((np.arange(256)[:, None] >> np.arange(8)) & 1, 0.0, -np.inf).astype(np.float32)  # (256, 8)
JSON_OPTIONS = {"whitespace_flexible": False, "json_allow_general_unicode_escapes": True}


def _llguidance():
    import llguidance

    return llguidance


def json_depth(value: Any, limit: int) -> int:
    """Nesting depth of a parsed JSON value, counted iteratively (a deep value cannot exhaust the stack)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, (dict, list)):
            deepest = max(deepest, depth)
            if deepest > limit:
                return deepest
            children = node.values() if isinstance(node, dict) else node
            stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return deepest


def check_schema(schema: Any, param: str) -> str:
    """The schema as JSON text, after the size and depth bounds; 400 naming `param` otherwise."""
    if not isinstance(schema, (dict, bool)):
        raise invalid_param(param, "a JSON schema must be an object (or true/false)")
    depth = json_depth(schema, MAX_SCHEMA_DEPTH)
    if depth > MAX_SCHEMA_DEPTH:
        raise invalid_param(param, f"the schema nests deeper than {MAX_SCHEMA_DEPTH} levels")
    try:
        text = json.dumps(schema, allow_nan=False)
    except ValueError as exc:
        raise invalid_param(param, f"the schema is not valid JSON: {exc}") from None
    if len(text) > MAX_GRAMMAR_CHARS:
        raise invalid_param(param, f"the schema is {len(text):,} characters; at most {MAX_GRAMMAR_CHARS:,} are allowed")
    return text


@dataclass(frozen=True)
class GrammarSpec:
    """What to constrain an output to: `kind` is json_schema, json_object, regex, choice or lark."""

    kind: str
    text: str  # the schema as JSON, the regex, the choices as a JSON list, or the Lark grammar
    param: str  # the request field named in errors

    @classmethod
    def json_schema(cls, schema: Any, param: str) -> "GrammarSpec":
        return cls("json_schema", check_schema(schema, param), param)

    @classmethod
    def json_object(cls) -> "GrammarSpec":
        return cls("json_object", '{"type": "object"}', "response_format")

    @classmethod
    def regex(cls, pattern: str, param: str) -> "GrammarSpec":
        if len(pattern) > MAX_GRAMMAR_CHARS:
            raise invalid_param(param, f"the regular expression is longer than {MAX_GRAMMAR_CHARS:,} characters")
        return cls("regex", pattern, param)

    @classmethod
    def choice(cls, options: Sequence[str], param: str) -> "GrammarSpec":
        if not options:
            raise invalid_param(param, "give at least one choice")
        if len(options) > MAX_CHOICES:
            raise invalid_param(param, f"{len(options)} choices; at most {MAX_CHOICES} are allowed")
        text = json.dumps(list(options))
        if len(text) > MAX_GRAMMAR_CHARS:
            raise invalid_param(param, f"the choices are longer than {MAX_GRAMMAR_CHARS:,} characters in all")
        return cls("choice", text, param)

    @classmethod
    def lark(cls, grammar: str, param: str) -> "GrammarSpec":
        if len(grammar) > MAX_GRAMMAR_CHARS:
            raise invalid_param(param, f"the grammar is longer than {MAX_GRAMMAR_CHARS:,} characters")
        return cls("lark", grammar, param)

    def to_llguidance(self) -> str:
        """The llguidance grammar (a JSON string) for this spec."""
        llg = _llguidance()
        matcher = llg.LLMatcher
        if self.kind in ("json_schema", "json_object"):
            return matcher.grammar_from_json_schema(self.text, defaults=JSON_OPTIONS)
        if self.kind == "regex":
            return matcher.grammar_from_regex(self.text)
        if self.kind == "choice":
            # One literal per option: a regex alternation would read the options' metacharacters.
            return matcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in json.loads(self.text)))
        return matcher.grammar_from_lark(self.text)


class GrammarError(APIError):
    """A grammar that does not compile: 400 naming the request field."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(400, f"Invalid value for '{param}': {message}", param=param, code="invalid_grammar")


class GrammarEngine:
    """One per server: the vocabulary as llguidance sees it, a cache of compiled grammars, and the pieces of
    the closing path. Thread-safe: compiling runs in the CPU pool while the engine thread masks."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_ids: Sequence[int]) -> None:
        llg = _llguidance()
        self.vocab_size = vocab_size
        self.stop_ids = list(stop_ids)
        self.ll_tokenizer = self._ll_tokenizer(llg, tokenizer, vocab_size, self.stop_ids)
        self.limits = llg.LLParserLimits(**LIMITS)
        self._compiled: OrderedDict[str, Any] = OrderedDict()  # llguidance grammar -> matcher at its start
        self._lock = threading.Lock()
        single = {}
        for s in ('"', "}", "]", ",", "0", "a"):
            ids = tokenizer.encode(s, add_special_tokens=False)
            single[s] = ids[0] if len(ids) == 1 else None
        self._quote, self._letter = single['"'], single["a"]
        # Outside strings: close containers; else a comma (required members remain: their keys are then forced
        # bytes); else the shortest values. A digit comes last so that a number ends instead of growing.
        self._closers = [single[s] for s in ("}", "]", ",", '"', "0") if single[s] is not None]
        table = tokenizer.token_bytes()
        lengths = [len(b) if b else 1 << 20 for b in table] if table is not None else \
            [len(tokenizer.decode([i]).encode("utf-8")) or 1 << 20 for i in range(tokenizer.vocab_size)]
        lengths += [1 << 20] * (vocab_size - len(lengths))
        self._token_len = np.array(lengths[:vocab_size], dtype=np.int64)
        for i in self.stop_ids:
            if i < vocab_size:
                self._token_len[i] = 1 << 20

    @staticmethod
    def _ll_tokenizer(llg: Any, tokenizer: Any, vocab_size: int, stop_ids: list[int]) -> Any:
        try:
            return llg.LLTokenizer(tokenizer.backend.to_str(), n_vocab=vocab_size, eos_token=stop_ids or None)
        except (ValueError, RuntimeError):  # a decoder llguidance does not read (character tokenizers): give bytes
            special = set(tokenizer.special_ids)

            class Vocab:
                eos_token_id = stop_ids[0] if stop_ids else 0
                bos_token_id = tokenizer.bos_token_id
                special_token_ids = sorted(special)
                tokens = [(b"\xff" + (tokenizer.id_to_token(i) or "").encode()) if i in special
                          else tokenizer.decode([i]).encode("utf-8") for i in range(tokenizer.vocab_size)]

                def __call__(self, text: Any) -> list[int]:
                    s = text.decode("utf-8", "replace") if isinstance(text, bytes) else text
                    return tokenizer.encode(s, add_special_tokens=False)

            return llg.LLTokenizer(llg.TokenizerWrapper(Vocab()), n_vocab=vocab_size, eos_token=stop_ids or None)

    def compile(self, spec: GrammarSpec) -> Any:
        """A matcher at the start of `spec`'s grammar (cached); GrammarError (400) if it does not compile.

        CPU work (milliseconds to, within the limits, a second): call it off the event loop."""
        llg = _llguidance()
        try:
            grammar = spec.to_llguidance()
        except (ValueError, TypeError) as exc:
            raise GrammarError(spec.param, str(exc)[:500]) from None
        with self._lock:
            prototype = self._compiled.get(grammar)
            if prototype is not None:
                self._compiled.move_to_end(grammar)
                return prototype
        matcher = llg.LLMatcher(self.ll_tokenizer, grammar, log_level=0, limits=self.limits)
        if matcher.is_error():
            raise GrammarError(spec.param, _clean_error(matcher.get_error()))
        with self._lock:
            self._compiled[grammar] = matcher
            while len(self._compiled) > COMPILED_CACHE_SIZE:
                self._compiled.popitem(last=False)
        return matcher

    def constraint(self, compiled: Any) -> "GrammarConstraint":
        """A fresh per-sequence constraint from a compiled grammar (its own copy of the parser state)."""
        return GrammarConstraint(self, compiled.deep_copy())

    # ---- masks and the closing path ------------------------------------------------------------
    def _allowed_bits(self, matcher: Any, words: np.ndarray) -> np.ndarray:
        """(V,) uint8, 1 where `matcher` allows the token next (its bitmask computed into `words`)."""
        matcher.unsafe_compute_mask_ptr(words.ctypes.data, words.nbytes)
        return np.unpackbits(words.view(np.uint8), bitorder="little")[:self.vocab_size]

    def mask(self, matcher: Any, words: np.ndarray) -> torch.Tensor:
        """The bool mask (V,) of tokens `matcher` allows next."""
        return torch.from_numpy(self._allowed_bits(matcher, words).view(np.bool_))

    def bias(self, matcher: Any, words: np.ndarray) -> torch.Tensor:
        """The logit bias (V,) float32 of the tokens `matcher` allows next: 0, or -inf for the others."""
        matcher.unsafe_compute_mask_ptr(words.ctypes.data, words.nbytes)
        # One gather of 8 biases per mask byte: several times faster than unpacking bits then mapping them.
        return torch.from_numpy(np.take(_BYTE_BIAS, words.view(np.uint8), axis=0).reshape(-1)[:self.vocab_size])

    def closing_path(self, matcher: Any, limit: int) -> Optional[list[int]]:
        """Tokens that finish the output from `matcher`'s state (an end token last unless the grammar stops by
        itself), at most `limit` of them; None when none is found within that (or `CLOSING_MASKS` full
        masks). Greedy, on a copy of the state."""
        m = matcher.deep_copy()
        path: list[int] = []
        words = np.empty((self.vocab_size + 31) // 32, dtype=np.int32)
        masks = [CLOSING_MASKS]
        while not m.is_stopped():
            if len(path) >= limit:
                return None
            if m.is_accepting() and self.stop_ids:
                path.append(self.stop_ids[0])
                return path
            forced = m.compute_ff_tokens()
            token = forced[0] if forced else self._closing_token(m, words, masks)
            if token is None or not m.consume_token(token):
                return None
            path.append(token)
        return path

    def _closing_token(self, m: Any, words: np.ndarray, masks: list[int]) -> Optional[int]:
        def ok(t: Optional[int]) -> bool:
            return t is not None and m.validate_tokens([t]) == 1

        if ok(self._quote) and ok(self._letter):  # inside a string: close it before anything else
            return self._quote
        if not ok(self._letter):  # a letter is not allowed: not inside a string, closers are structural
            for t in self._closers:
                if ok(t):
                    return t
        if masks[0] <= 0:
            return None
        masks[0] -= 1
        allowed = self._allowed_bits(m, words)
        if not allowed.any():
            return None
        return int(np.where(allowed, self._token_len, 1 << 40).argmin())  # the shortest (lowest id among equals)


class GrammarConstraint:
    """One sequence's grammar state, in the shape of the engine's `Constraint` protocol."""

    def __init__(self, engine: GrammarEngine, matcher: Any) -> None:
        self.engine = engine
        self.matcher = matcher
        self._words = np.empty((engine.vocab_size + 31) // 32, dtype=np.int32)
        self._path: Optional[list[int]] = None  # the closing path from the current state, while it holds
        self._path_len = 0  # its length when last computed
        self._computed_at = 1 << 62  # the budget then
        self._retry_below = CLOSING_WINDOW  # budgets above this do not look for a closing path

    def allowed(self, budget: int) -> torch.Tensor | int:
        """The token to force while closing within the budget, else the logit bias of allowed tokens."""
        if self.matcher.is_error():  # cannot happen with masked sampling; end the sequence rather than fail it
            log.warning("grammar matcher error: %s", self.matcher.get_error()[:200])
            return self.engine.stop_ids[0] if self.engine.stop_ids else 0
        path = self._closing(budget)
        if path and len(path) + CLOSING_MARGIN >= budget:
            return path[0]
        return self.engine.bias(self.matcher, self._words)

    def _closing(self, budget: int) -> Optional[list[int]]:
        """The closing path, recomputed only near the end of the budget: every step once it is close to the
        path's length, every few steps before that (a sampled token may lengthen the path)."""
        if self._path is not None or budget > self._retry_below:
            return self._path
        near = budget <= self._path_len + CLOSING_MARGIN + 8
        if not near and self._computed_at - budget < 8:
            return None
        self._path = self.engine.closing_path(self.matcher, min(budget, MAX_CLOSING_PATH))
        self._computed_at = budget
        if self._path is None:  # none found within the limits: look again a few tokens later
            self._retry_below = budget - 16
        else:
            self._path_len = len(self._path)
        return self._path

    def advance(self, token: int) -> None:
        """Record the chosen token."""
        if not self.matcher.consume_token(token):
            log.warning("grammar refused token %d: %s", token, self.matcher.get_error()[:200])
        # The greedy path from the next state is the rest of this one when its first token was taken.
        self._path = self._path[1:] if self._path and self._path[0] == token else None

    @property
    def complete(self) -> bool:
        """True once nothing may follow (the value is closed, or an end token was accepted)."""
        return self.matcher.is_stopped()


def _clean_error(message: str) -> str:
    """llguidance's message, first lines only (no internal state dumps)."""
    lines = [line for line in message.strip().splitlines() if line.strip()]
    return " ".join(lines[:4])[:500] or "the grammar does not compile"


__all__ = ["GrammarEngine", "GrammarConstraint", "GrammarSpec", "GrammarError", "check_schema", "json_depth",
           "MAX_GRAMMAR_CHARS", "MAX_SCHEMA_DEPTH", "MAX_CHOICES"]
