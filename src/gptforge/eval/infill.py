"""Fill-in-the-middle quality: does the model restore a line taken out of a file it did not train on?

A case is a non-blank line of a held-out file with up to `context_chars` characters on each side. Two
figures, each next to what the model gets from the prefix alone (an editor without infill):
- exact match: the model fills the gap (greedy, `generate(..., suffix=...)`) and the middle must be the
  line exactly (from the prefix alone: the first line it writes);
- bits per byte of the line: its log-likelihood given the FIM prompt (prefix and suffix, cut to the
  context as the server cuts them), and given the prefix alone. Lower with the suffix means the model
  uses what comes after the gap; this figure moves long before exact match does for small models. `gptforge demo` reports both on validation files of the standard
library, and `benchmarks/fim_quality.py` compares models trained with and without FIM.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch


@dataclass(frozen=True)
class InfillCase:
    prefix: str  # the text before the line (ends with a newline)
    middle: str  # the line, without its newline
    suffix: str  # the newline, then the text after the line


@dataclass
class InfillReport:
    cases: int
    exact_match: Optional[float]  # share of lines restored exactly with the suffix in view (None: no FIM tokens)
    prefix_only_exact_match: float  # the same model from the prefix alone (its first line)
    bits_per_byte: Optional[float] = None  # of the lines, given prefix and suffix (None: no FIM tokens)
    prefix_only_bits_per_byte: float = float("nan")  # of the lines, given the prefix alone
    example: Optional[dict[str, Any]] = None  # a case the model restored (else the first) and what it put there

    def to_dict(self) -> dict[str, Any]:
        return {"cases": self.cases, "exact_match": self.exact_match,
                "prefix_only_exact_match": self.prefix_only_exact_match, "bits_per_byte": self.bits_per_byte,
                "prefix_only_bits_per_byte": self.prefix_only_bits_per_byte, "example": self.example}


def infill_cases(texts: Sequence[str], n: int, *, seed: int = 0, context_chars: int = 600,
                 max_line_chars: int = 80) -> list[InfillCase]:
    """Up to `n` cases from `texts` (files), drawn reproducibly by `seed`."""
    rng = random.Random(seed)
    files = [t.splitlines(keepends=True) for t in texts]
    files = [lines for lines in files if len(lines) >= 3]
    cases: list[InfillCase] = []
    for _ in range(n * 20):
        if len(cases) == n or not files:
            break
        lines = rng.choice(files)
        i = rng.randrange(1, len(lines) - 1)
        if not lines[i].strip() or len(lines[i]) > max_line_chars:
            continue
        prefix, suffix = "".join(lines[:i]), "".join(lines[i + 1:])
        cases.append(InfillCase(prefix[-context_chars:], lines[i].rstrip("\n"), "\n" + suffix[:context_chars]))
    return cases


def validation_texts(data: Any) -> list[str]:
    """The validation files of a recipe's `data` section (`split: documents`): the texts training never saw."""
    from ..data.corpus import Corpus
    from ..data.shards import doc_in_val

    if data.split != "documents":
        raise ValueError(f"data.split: held-out files need split 'documents', got {data.split!r}")
    corpus = Corpus(data.sources, max_bytes=data.max_bytes)
    return [d.text for d in corpus.documents() if doc_in_val(d.text, data.val_fraction)]


def line_bits_per_byte(model: torch.nn.Module, tokenizer: Any, cases: Sequence[InfillCase], *, use_suffix: bool,
                       batch_size: int = 16) -> float:
    """Bits per UTF-8 byte of the cases' lines given the FIM prompt (`use_suffix`) or the prefix alone; each
    context is cut to what fits the model's context with the line (the FIM prompt as the server cuts it)."""
    from ..fim import infill_prompt
    from .scoring import context_length, prefix_token_id, score_continuations

    limit = context_length(model, None)
    pairs, num_bytes = [], 0
    for case in cases:
        line = tokenizer.encode(case.middle, add_special_tokens=False)
        room = limit - len(line)
        if not line or room < 8:
            continue
        if use_suffix:
            context = infill_prompt(tokenizer, case.prefix, case.suffix, max_prompt_tokens=room).ids
        else:
            context = ([prefix_token_id(tokenizer)] + tokenizer.encode(case.prefix, add_special_tokens=False))[-room:]
        pairs.append((context, line))
        num_bytes += len(case.middle.encode("utf-8"))
    if not pairs:
        return float("nan")
    scores = score_continuations(model, pairs, batch_size=batch_size, max_length=limit)
    return -sum(s.logprob for s in scores) / (math.log(2) * num_bytes)


def _first_line(text: str) -> Optional[str]:
    """The first line of a continuation when it is complete (a newline follows it), else None."""
    return text.split("\n", 1)[0] if "\n" in text else None


@torch.no_grad()
def evaluate_infill(model: torch.nn.Module, tokenizer: Any, cases: Sequence[InfillCase], *,
                    max_new_tokens: int = 40) -> InfillReport:
    """Exact match of the restored lines, with the suffix and from the prefix alone (greedy both); a model
    without FIM tokens (gptforge.fim) gets the prefix-only figure alone."""
    from ..fim import fim_tokens
    from ..generate import generate

    if not cases:
        raise ValueError("cases: no infill cases (the held-out files have no line to take out)")
    continued = [o.text for o in generate(model, [c.prefix for c in cases], tokenizer, temperature=0,
                                          max_new_tokens=max_new_tokens, truncate_prompt=True)]
    baseline = sum(_first_line(text) == c.middle for text, c in zip(continued, cases)) / len(cases)
    baseline_bits = line_bits_per_byte(model, tokenizer, cases, use_suffix=False)
    if fim_tokens(tokenizer) is None:
        return InfillReport(len(cases), None, baseline, None, baseline_bits)
    filled = [generate(model, c.prefix, tokenizer, suffix=c.suffix, max_new_tokens=max_new_tokens, temperature=0,
                       truncate_prompt=True)[0].text for c in cases]
    hits = sum(text == c.middle for text, c in zip(filled, cases))
    shown = next((i for i, (t, c) in enumerate(zip(filled, cases)) if t == c.middle), 0)
    case = cases[shown]
    example = {"prefix": case.prefix, "suffix": case.suffix, "middle": case.middle, "filled": filled[shown],
               "restored": filled[shown] == case.middle}
    bits = line_bits_per_byte(model, tokenizer, cases, use_suffix=True)
    return InfillReport(len(cases), hits / len(cases), baseline, bits, baseline_bits, example)


__all__ = ["InfillCase", "InfillReport", "infill_cases", "evaluate_infill", "line_bits_per_byte", "validation_texts"]
