"""Token-level JSON constraint for `response_format: {"type": "json_object"}`.

A byte-level pushdown automaton accepts exactly the prefixes of a JSON object (compact: no whitespace
between tokens, any bytes inside strings). For a state, the allowed next tokens are those whose bytes
all feed through it; masks are cached per state, since generation revisits the same few states. When
the remaining token budget only just covers the shortest way to close the object, the closing bytes
are forced, so a reply that runs out of tokens still parses.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Optional, Sequence

import torch

# State: (mode, stack of open containers as a string of "{" / "[", aux).
State = tuple[str, str, str]
START: State = ("TOP", "", "")
DONE_MODE = "DONE"

_DIGITS = frozenset(b"0123456789")
_ESCAPES = frozenset(b'"\\/bfnrtu')
_HEX = frozenset(b"0123456789abcdefABCDEF")
_LITERALS = {ord("t"): "rue", ord("f"): "alse", ord("n"): "ull"}


def _after_value(stack: str) -> State:
    return ("AFTER", stack, "") if stack else (DONE_MODE, "", "")


def _value_start(stack: str, b: int) -> Optional[State]:
    if b == 0x22:  # "
        return ("STR", stack, "v")
    if b == 0x7B:  # {
        return ("OBJ_FIRST", stack + "{", "")
    if b == 0x5B:  # [
        return ("ARR_FIRST", stack + "[", "")
    if b == 0x2D:  # -
        return ("NUM", stack, "-")
    if b == 0x30:
        return ("NUM", stack, "0")
    if b in _DIGITS:
        return ("NUM", stack, "I")
    if b in _LITERALS:
        return ("LIT", stack, _LITERALS[b])
    return None


def _close(stack: str, b: int) -> Optional[State]:
    if stack and ((b == 0x7D and stack[-1] == "{") or (b == 0x5D and stack[-1] == "[")):
        return _after_value(stack[:-1])
    return None


def feed(state: State, b: int) -> Optional[State]:
    """The state after byte `b`, or None when `b` cannot continue a JSON object here."""
    mode, stack, aux = state
    if mode == "STR":
        if b == 0x22:
            return ("COLON", stack, "") if aux == "k" else _after_value(stack)
        if b == 0x5C:
            return ("ESC", stack, aux)
        return None if b < 0x20 else state
    if mode == "ESC":
        if b == ord("u"):
            return ("U", stack, aux + "4")
        return ("STR", stack, aux) if b in _ESCAPES else None
    if mode == "U":
        if b not in _HEX:
            return None
        left = int(aux[1:]) - 1
        return ("STR", stack, aux[0]) if left == 0 else ("U", stack, aux[0] + str(left))
    if mode == "TOP":
        return ("OBJ_FIRST", "{", "") if b == 0x7B else None
    if mode == "OBJ_FIRST":
        if b == 0x22:
            return ("STR", stack, "k")
        return _close(stack, b)
    if mode == "OBJ_KEY":
        return ("STR", stack, "k") if b == 0x22 else None
    if mode == "COLON":
        return ("VALUE", stack, "") if b == 0x3A else None
    if mode == "VALUE":
        return _value_start(stack, b)
    if mode == "ARR_FIRST":
        return _value_start(stack, b) or _close(stack, b)
    if mode == "AFTER":
        if b == 0x2C:
            return ("OBJ_KEY", stack, "") if stack[-1] == "{" else ("VALUE", stack, "")
        return _close(stack, b)
    if mode == "LIT":
        if b != ord(aux[0]):
            return None
        return ("LIT", stack, aux[1:]) if len(aux) > 1 else _after_value(stack)
    if mode == "NUM":
        return _feed_number(stack, aux, b)
    return None  # DONE: nothing may follow


def _feed_number(stack: str, aux: str, b: int) -> Optional[State]:
    digit = b in _DIGITS
    if aux == "-":
        return ("NUM", stack, "0" if b == 0x30 else "I") if digit else None
    if aux in ("0", "I"):
        if digit and aux == "I":
            return ("NUM", stack, "I")
        if b == 0x2E:
            return ("NUM", stack, ".")
        if b in (ord("e"), ord("E")):
            return ("NUM", stack, "e")
    elif aux in (".", "F"):
        if digit:
            return ("NUM", stack, "F")
        if aux == "F" and b in (ord("e"), ord("E")):
            return ("NUM", stack, "e")
        if aux == ".":
            return None
    elif aux in ("e", "S"):
        if digit:
            return ("NUM", stack, "E")
        if aux == "e" and b in (ord("+"), ord("-")):
            return ("NUM", stack, "S")
        return None
    elif aux == "E" and digit:
        return ("NUM", stack, "E")
    # A complete number ends at the first byte that cannot extend it; that byte continues the container.
    if aux in ("0", "I", "F", "E"):
        return feed(_after_value(stack), b)
    return None


def feed_bytes(state: Optional[State], data: bytes) -> Optional[State]:
    """Feed several bytes; None as soon as one is rejected."""
    for b in data:
        if state is None:
            return None
        state = feed(state, b)
    return state


_CLOSING_BYTE = {"TOP": b"{", "OBJ_FIRST": b"}", "OBJ_KEY": b'"', "COLON": b":", "VALUE": b"0",
                 "ARR_FIRST": b"]", "STR": b'"', "ESC": b"n", "U": b"0"}


def shortest_completion(state: State) -> bytes:
    """The fewest bytes that turn `state` into a complete JSON object."""
    out = bytearray()
    while state[0] != DONE_MODE:
        mode, stack, aux = state
        if mode in _CLOSING_BYTE:
            b = _CLOSING_BYTE[mode]
        elif mode == "LIT":
            b = aux[0].encode()
        elif mode == "NUM" and aux in ("-", ".", "e", "S"):
            b = b"0"
        else:  # AFTER, or a complete number: close the innermost container
            b = b"}" if stack[-1] == "{" else b"]"
        out += b
        state = feed(state, b[0])  # type: ignore[assignment]
    return bytes(out)


def token_byte_table(tokenizer, vocab_size: int) -> list[Optional[bytes]]:
    """The bytes each token id stands for (None for special/unknown ids, which JSON mode never allows)."""
    table = tokenizer.token_bytes()
    special = tokenizer.special_ids | set(tokenizer.backend.get_added_tokens_decoder())
    out: list[Optional[bytes]] = []
    for i in range(vocab_size):
        if i >= tokenizer.vocab_size or i in special:
            out.append(None)
        elif table is not None:
            out.append(table[i])
        else:
            out.append(tokenizer.decode([i]).encode("utf-8"))
    return out


class JSONConstraint:
    """Allowed-token masks and forced closing tokens for JSON-object generation over one vocabulary."""

    def __init__(self, token_bytes: Sequence[Optional[bytes]]) -> None:
        self.token_bytes = list(token_bytes)
        self.vocab_size = len(self.token_bytes)
        self.byte_token = {tb[0]: i for i, tb in enumerate(self.token_bytes) if tb is not None and len(tb) == 1}
        self.max_token_len = max((len(tb) for tb in self.token_bytes if tb), default=1)
        self._mask = lru_cache(maxsize=4096)(self._compute_mask)

    def _compute_mask(self, state: State) -> torch.Tensor:
        allowed = torch.zeros(self.vocab_size, dtype=torch.bool)
        for i, data in enumerate(self.token_bytes):
            if data and feed_bytes(state, data) is not None:
                allowed[i] = True
        return allowed

    def allowed(self, state: State) -> torch.Tensor:
        """(V,) bool: tokens that keep the output a valid prefix of a JSON object."""
        return self._mask(state)

    def allowed_within(self, state: State, budget: int) -> torch.Tensor:
        """Like `allowed`, but near the end of the budget only tokens after which the object can still close."""
        mask = self.allowed(state)
        if budget > len(shortest_completion(state)) + 4 * self.max_token_len:
            return mask
        mask = mask.clone()
        for i in mask.nonzero().flatten().tolist():
            after = feed_bytes(state, self.token_bytes[i])  # type: ignore[arg-type]
            if after is None or len(shortest_completion(after)) > budget - 1:
                mask[i] = False
        return mask

    def advance(self, state: State, token_id: int) -> Optional[State]:
        """State after `token_id` (None if it breaks the grammar)."""
        data = self.token_bytes[token_id] if token_id < self.vocab_size else None
        return feed_bytes(state, data) if data else None

    def forced_token(self, state: State, budget: int) -> Optional[int]:
        """With only `budget` tokens left, the next closing token to force (None while there is room)."""
        tail = shortest_completion(state)
        if len(tail) < budget or not tail:
            return None
        return self.byte_token.get(tail[0])


class JSONObjectConstraint:
    """One sequence's JSON-object constraint, in the shape the engine's `Constraint` protocol expects."""

    def __init__(self, grammar: JSONConstraint) -> None:
        self.grammar = grammar
        self.state: Optional[State] = START

    def allowed(self, budget: int) -> torch.Tensor | int:
        """A closing token to force when the budget is nearly spent, else the mask of allowed tokens."""
        forced = self.grammar.forced_token(self.state, budget)
        return forced if forced is not None else self.grammar.allowed_within(self.state, budget)

    def advance(self, token: int) -> None:
        self.state = self.grammar.advance(self.state, token) if self.state is not None else None

    @property
    def complete(self) -> bool:
        return self.state is not None and self.state[0] == DONE_MODE
