"""Token healing: let the model re-choose the prompt's last token, so prompts may end anywhere.

A prompt that ends where the tokenizer would not cut (`"return "` with its trailing space, half a word,
a bare newline before an indented line) leaves the model at a token boundary it rarely saw in training:
`" "` followed by `"x"` instead of the usual `" x"`. Healing removes the last prompt token and
constrains the first generated token(s) to start with its bytes, so the model picks the natural
token (`" x"`); the text shown to the user drops those bytes again, so it continues the prompt
exactly and the prompt text is never changed.

    healed = heal_prompt(tokenizer, ids)      # None when healing cannot apply
    healed.prompt_ids                          # the prompt without its last token
    healed.constraint()                        # per sequence: allowed first tokens (engine `Constraint`)
    healed.hidden_text                         # the removed token's text, dropped from the output

Only byte-level BPE tokenizers are healed (their tokens are fixed byte strings).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch


class _Index:
    """Sorted token byte strings of a vocabulary, for prefix queries (built once per tokenizer)."""

    def __init__(self, table: Sequence[Optional[bytes]], special: frozenset[int]) -> None:
        pairs = sorted((b, i) for i, b in enumerate(table) if b and i not in special)
        self.keys = [b for b, _ in pairs]
        self.ids = [i for _, i in pairs]
        self.by_bytes: dict[bytes, list[int]] = {}
        for b, i in pairs:
            self.by_bytes.setdefault(b, []).append(i)
        self.size = len(table)

    def extending(self, prefix: bytes) -> list[int]:
        """Ids of the tokens whose bytes start with `prefix`."""
        lo = bisect.bisect_left(self.keys, prefix)
        hi = lo
        while hi < len(self.keys) and self.keys[hi].startswith(prefix):
            hi += 1
        return self.ids[lo:hi]

    def allowed(self, remaining: bytes) -> torch.Tensor:
        """(V,) bool: tokens that extend `remaining`, or are a non-empty prefix of it."""
        ids = self.extending(remaining)
        for n in range(1, len(remaining)):
            ids += self.by_bytes.get(remaining[:n], [])
        mask = torch.zeros(self.size, dtype=torch.bool)
        mask[ids] = True
        return mask


_INDEXES: dict[int, _Index] = {}


def _index(tokenizer: Any) -> Optional[_Index]:
    table = tokenizer.token_bytes() if hasattr(tokenizer, "token_bytes") else None
    if table is None:
        return None
    key = id(table)
    if key not in _INDEXES:
        _INDEXES[key] = _Index(table, tokenizer.special_ids)
    return _INDEXES[key]


class HealingConstraint:
    """The first generated tokens must spell out the removed bytes (then generation is free)."""

    def __init__(self, index: _Index, table: Sequence[Optional[bytes]], removed: bytes) -> None:
        self.index, self.table, self.remaining = index, table, removed

    def allowed(self, budget: int) -> torch.Tensor | int:
        """Mask of tokens consistent with the bytes still to spell (all tokens once they are spelled)."""
        return self.index.allowed(self.remaining)

    def advance(self, token: int) -> None:
        piece = self.table[token] or b""
        self.remaining = self.remaining[len(piece):] if self.remaining.startswith(piece) else b""

    @property
    def active(self) -> bool:
        return bool(self.remaining)

    @property
    def complete(self) -> bool:
        return False  # healing never ends a sequence


@dataclass
class HealedPrompt:
    """A prompt with its last token removed, and what the first generated tokens must restore."""

    prompt_ids: list[int]
    removed: bytes
    hidden_text: str
    _index: _Index
    _table: Sequence[Optional[bytes]]

    def constraint(self) -> HealingConstraint:
        """A fresh constraint for one sequence."""
        return HealingConstraint(self._index, self._table, self.removed)


def heal_prompt(tokenizer: Any, prompt_ids: Sequence[int]) -> Optional[HealedPrompt]:
    """The healed form of `prompt_ids`, or None where healing does not apply.

    It does not apply to tokenizers that are not byte-level, to prompts of one token, to a special last
    token, or to a last token that no longer token extends (nothing to re-choose).
    """
    index = _index(tokenizer)
    if index is None or len(prompt_ids) < 2:
        return None
    last = int(prompt_ids[-1])
    table = tokenizer.token_bytes()
    removed = table[last] if 0 <= last < len(table) else None
    if not removed or last in tokenizer.special_ids:
        return None
    try:
        hidden = removed.decode("utf-8")
    except UnicodeDecodeError:  # the token ends inside a character: the text cannot be split here
        return None
    if len(index.extending(removed)) < 2:  # only the token itself: the boundary is already natural
        return None
    return HealedPrompt(list(prompt_ids[:-1]), removed, hidden, index, table)


__all__ = ["heal_prompt", "HealedPrompt", "HealingConstraint"]
