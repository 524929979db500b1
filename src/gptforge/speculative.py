"""Prompt-lookup speculative decoding: draft tokens from the context itself, keep those the model agrees with.

`find_draft` proposes the tokens that followed an earlier occurrence of the context's last n-gram (the
candidate generator of `transformers`' `prompt_lookup_num_tokens`); the decode loop in `gptforge.generate`
feeds the last token plus the draft in one forward pass and `accept_draft` keeps the longest prefix the
model would itself have chosen, then the model's own next token. Greedy output is the output of plain
greedy decoding; sampled output follows the same distribution: a draft token d is kept with probability
p(d) (the speculative rejection rule min(1, p/q) with a one-hot draft q), and after a rejection the next
token is drawn from p with d removed, renormalised.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from .sampling import SamplingParams, process_logits, sample_next_token


def find_draft(context: Sequence[int], num_tokens: int, max_ngram: int) -> list[int]:
    """Up to `num_tokens` tokens that followed the earliest earlier match of the context's last n-gram.

    n runs from `max_ngram` down to 1 and the first n with a match wins, as in `transformers`'
    PromptLookupCandidateGenerator (so both libraries draft the same tokens from the same context).
    """
    length = len(context)
    if num_tokens < 1 or length < 2:
        return []
    ids = torch.tensor(context, dtype=torch.long)
    for n in range(min(max_ngram, length - 1), 0, -1):
        # Windows end before the last token, so the n-gram never matches itself and a draft is never empty.
        windows = ids[:length - 1].unfold(0, n, 1)  # (length - n, n)
        hits = (windows == ids[length - n:]).all(-1).nonzero()
        if hits.numel():
            start = int(hits[0, 0]) + n
            return [int(t) for t in context[start:start + num_tokens]]
    return []


@dataclass
class DraftSchedule:
    """How many tokens to draft next: fewer after a rejection, more after a draft kept whole.

    Drafts shrink by one after a rejection and grow by two after a full accept, up to `max_tokens` (the
    schedule transformers uses for draft models); after n drafts in a row rejected whole, n plain steps
    come before the next draft, so a context the model does not repeat costs little more than plain
    decoding. `generate` and the server's engine both draft through one of these per sequence.
    """

    max_tokens: int
    limit: int = 0
    misses: int = 0
    wait: int = 0

    def __post_init__(self) -> None:
        self.limit = self.max_tokens

    def room(self) -> int:
        """Draft tokens the next step may verify (0: a plain step)."""
        return 0 if self.wait else self.limit

    def update(self, drafted: int, kept: int) -> None:
        """Record one step: `drafted` tokens were verified, `kept` of them accepted."""
        if drafted:
            self.limit = min(self.max_tokens, self.limit + 2) if kept == drafted else max(1, self.limit - 1)
            self.misses = 0 if kept else min(self.misses + 1, 8)
            self.wait = self.misses
        elif self.wait:
            self.wait -= 1


def accept_draft(logits: torch.Tensor, draft: Sequence[int], params: SamplingParams, generated: Sequence[int],
                 prompt: Sequence[int], generator: Optional[torch.Generator]) -> list[int]:
    """The tokens to keep from one verify pass: the accepted draft prefix, then the model's own token.

    `logits` (k+1, V) are the model's raw next-token logits after the last token and after each of the k
    draft tokens. Each position is processed (penalties, temperature, top-k/p, ...) with the tokens that
    precede it, exactly as plain decoding would process it, so every kept token is chosen from the
    distribution plain decoding would have sampled it from.
    """
    k = len(draft)
    contexts = [list(generated) + list(draft[:i]) for i in range(k + 1)]
    processed = process_logits(logits.float(), [params] * (k + 1), contexts, prompts=[prompt] * (k + 1))
    if params.greedy:
        chosen = sample_next_token(processed, [params] * (k + 1)).tolist()
        n = 0
        while n < k and chosen[n] == draft[n]:
            n += 1
        return list(draft[:n]) + [chosen[n]]
    probs = torch.nan_to_num(processed, nan=float("-inf")).softmax(-1)
    for i, token in enumerate(draft):
        row = probs[i]
        if not (torch.isfinite(row).all() and row.sum() > 0):  # as sample_next_token: fall back to the argmax
            best = int(processed[i].argmax())
            if best == token:
                continue
            return list(draft[:i]) + [best]
        keep = float(row[token])
        if float(torch.rand((), generator=generator, device=row.device)) < keep:
            continue
        residual = row.clone()
        residual[token] = 0.0
        if float(residual.sum()) <= 0.0:  # p(d) was 1 up to rounding: d is the only possible token
            continue
        return list(draft[:i]) + [int(torch.multinomial(residual, 1, generator=generator)[0])]
    bonus = sample_next_token(processed[k:], [params], [generator])
    return list(draft) + [int(bonus[0])]


__all__ = ["find_draft", "accept_draft", "DraftSchedule"]
