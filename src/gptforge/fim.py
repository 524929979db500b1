"""Fill-in-the-middle (FIM): the special tokens, the training transform and the infill prompt.

Training (Bavarian et al. 2022, "Efficient Training of Language Models to Fill in the Middle"; StarCoder):
a document is cut at two character positions drawn uniformly into prefix, middle and suffix, and
written as
    PSM: <fim_prefix> prefix <fim_suffix> suffix <fim_middle> middle
    SPM: <fim_prefix> <fim_suffix> suffix <fim_middle> prefix middle
(the SPM variant of the paper, as StarCoder trains it), each piece tokenized on its own. The document's
end-of-text token follows the middle, so a model learns to stop when the gap is filled.

Serving builds the same PSM shape from an editor's prefix and suffix: `infill_prompt` is the one place
that does, for the server's `/infill` and `suffix`, `gptforge generate --suffix` and `generate(suffix=)`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np

from .errors import ParameterError

FIM_PREFIX, FIM_MIDDLE, FIM_SUFFIX, FIM_PAD = "<fim_prefix>", "<fim_middle>", "<fim_suffix>", "<fim_pad>"
FIM_SPECIAL_TOKENS = (FIM_PREFIX, FIM_MIDDLE, FIM_SUFFIX, FIM_PAD)  # StarCoder's names, added when fim_rate > 0
# The same roles under other families' names (StarCoder, Qwen2.5-Coder), so their tokenizers infill too.
FIM_TOKEN_NAMES = {
    "prefix": (FIM_PREFIX, "<|fim_prefix|>"),
    "suffix": (FIM_SUFFIX, "<|fim_suffix|>"),
    "middle": (FIM_MIDDLE, "<|fim_middle|>"),
    "pad": (FIM_PAD, "<|fim_pad|>"),
    "repo": ("<repo_name>", "<reponame>", "<|repo_name|>"),
    "file_sep": ("<file_sep>", "<|file_sep|>"),
}
# Between extra context chunks when the tokenizer has no file separator (llama.cpp's server does the same).
CHUNK_SEPARATOR = "\n\n--- snippet ---\n\n"
FIM_ORDERS = ("psm", "spm")


class FimError(ParameterError):
    """A fill-in-the-middle request the model or its tokenizer cannot serve."""


@dataclass(frozen=True)
class FimTokens:
    """Ids of a tokenizer's FIM tokens (pad, repo and file_sep are optional)."""

    prefix: int
    suffix: int
    middle: int
    pad: Optional[int] = None
    repo: Optional[int] = None
    file_sep: Optional[int] = None


def _lookup(tokenizer: Any, role: str) -> Optional[int]:
    for name in FIM_TOKEN_NAMES[role]:
        token_id = tokenizer.token_to_id(name)
        if token_id is not None:
            return token_id
    return None


def fim_tokens(tokenizer: Any) -> Optional[FimTokens]:
    """The tokenizer's FIM token ids, or None when prefix, suffix or middle is missing."""
    found = {role: _lookup(tokenizer, role) for role in FIM_TOKEN_NAMES}
    if found["prefix"] is None or found["suffix"] is None or found["middle"] is None:
        return None
    return FimTokens(**found)


def require_fim_tokens(tokenizer: Any, param: str = "suffix") -> FimTokens:
    """The FIM token ids, or a FimError (naming `param` and the missing tokens) for a model without them."""
    tokens = fim_tokens(tokenizer)
    if tokens is not None:
        return tokens
    missing = [FIM_TOKEN_NAMES[r][0] for r in ("prefix", "suffix", "middle") if _lookup(tokenizer, r) is None]
    raise FimError(param, f"this model cannot fill in the middle: its tokenizer has no {', '.join(missing)} "
                   f"token{'s' if len(missing) > 1 else ''}; pretrain it with data.fim_rate > 0 (docs/pretrain.md)")


# ---- training ------------------------------------------------------------------------------------
def split_for_fim(text: str, rng: np.random.Generator) -> tuple[str, str, str]:
    """(prefix, middle, suffix) of `text` cut at two uniform character positions; they join back to `text`."""
    lo, hi = sorted(int(x) for x in rng.integers(0, len(text) + 1, size=2))
    return text[:lo], text[lo:hi], text[hi:]


def split_lines_for_fim(text: str, rng: np.random.Generator) -> tuple[str, str, str]:
    """(prefix, middle, suffix) with the middle whole lines: it starts at a line start and ends at a line
    end (before its newline), as when an editor asks for the lines between the code above and below."""
    starts = [0] + [i + 1 for i, ch in enumerate(text) if ch == "\n" and i + 1 < len(text)]
    lo = int(starts[int(rng.integers(len(starts)))])
    ends = [i for i in range(lo, len(text)) if text[i] == "\n"]
    if not text.endswith("\n") or not ends:  # the text's last line, when no newline ends it
        ends.append(len(text))
    hi = int(ends[int(rng.integers(len(ends)))])
    return text[:lo], text[lo:hi], text[hi:]


def choose_fim(text: str, rng: np.random.Generator, fim_rate: float,
               spm_rate: float, line_rate: float = 0.0) -> Optional[tuple[str, tuple[str, str, str]]]:
    """With probability `fim_rate`: (order, (prefix, middle, suffix)); else None (the text stays as it is).

    With probability `line_rate` the cut is at line boundaries (`split_lines_for_fim`), else at two
    uniform character positions. The same generator state gives the same choice, so prepared shards
    depend only on the seed.
    """
    draw_fim, draw_spm = rng.random(2)
    if draw_fim >= fim_rate or not text:
        return None
    order = "spm" if draw_spm < spm_rate else "psm"
    if line_rate > 0 and rng.random() < line_rate:  # drawn only then: seeds without it keep their shards
        return order, split_lines_for_fim(text, rng)
    return order, split_for_fim(text, rng)


def fim_pieces(text: str, max_chars: int) -> list[str]:
    """`text` cut at line ends into pieces of at most `max_chars` characters (a longer line is a piece of
    its own); they join back to `text`. `max_chars` <= 0: the whole text, one piece."""
    if max_chars <= 0 or len(text) <= max_chars:
        return [text]
    pieces: list[str] = []
    current = ""
    for line in text.splitlines(keepends=True):
        if current and len(current) + len(line) > max_chars:
            pieces.append(current)
            current = ""
        current += line
    if current:
        pieces.append(current)
    return pieces


def fim_training_ids(tokens: FimTokens, order: str, prefix: Sequence[int], middle: Sequence[int],
                     suffix: Sequence[int]) -> list[int]:
    """The training sequence of one transformed document (pieces already tokenized)."""
    if order == "psm":
        return [tokens.prefix, *prefix, tokens.suffix, *suffix, tokens.middle, *middle]
    if order == "spm":
        return [tokens.prefix, tokens.suffix, *suffix, tokens.middle, *prefix, *middle]
    raise ValueError(f"FIM order must be one of {FIM_ORDERS}, got {order!r}")


# ---- inference -----------------------------------------------------------------------------------
@dataclass
class InfillPrompt:
    """Prompt ids for the model, and whether context was cut to fit `max_prompt_tokens`."""

    ids: list[int]
    truncated: bool = False


def _extra_ids(tokenizer: Any, tokens: FimTokens, extra: Sequence[tuple[str, str]]) -> list[int]:
    """Context files before the FIM prefix: llama.cpp's repo-level pattern when the tokenizer has its tokens,
    else each chunk as a document of its own, ended by end-of-text as the training stream separates them."""
    if not extra:
        return []
    ids: list[int] = []
    if tokens.file_sep is not None:
        if tokens.repo is not None:
            ids += [tokens.repo, *tokenizer.encode("myproject\n", add_special_tokens=False)]
        for filename, text in extra:
            ids += [tokens.file_sep, *tokenizer.encode(f"{filename or 'tmp'}\n{text}", add_special_tokens=False)]
        return ids + [tokens.file_sep, *tokenizer.encode("filename\n", add_special_tokens=False)]
    end = tokenizer.eos_token_id
    for _, text in extra:
        ids += tokenizer.encode(text, add_special_tokens=False)
        ids += [end] if end is not None else tokenizer.encode(CHUNK_SEPARATOR, add_special_tokens=False)
    return ids


def infill_prompt(tokenizer: Any, prefix: str, suffix: str, *, extra: Sequence[tuple[str, str]] = (),
                  order: str = "psm", max_prompt_tokens: Optional[int] = None, param: str = "suffix") -> InfillPrompt:
    """Prompt ids asking the model for the text between `prefix` and `suffix`.

    extra: (filename, text) context chunks placed before the FIM part (most relevant last).
    max_prompt_tokens: when given, the prompt is cut to fit it as llama.cpp's server does: the suffix keeps at
    most a quarter (its start), the prefix its end, and the extra context what is left (its end).
    Raises FimError naming `param` when the tokenizer has no FIM tokens.
    """
    if order not in FIM_ORDERS:
        raise FimError("order", f"FIM order must be one of {FIM_ORDERS}, got {order!r}")
    tokens = require_fim_tokens(tokenizer, param)
    pre = tokenizer.encode(prefix, add_special_tokens=False)
    suf = tokenizer.encode(suffix, add_special_tokens=False)
    ctx = _extra_ids(tokenizer, tokens, extra)
    bos = [tokenizer.bos_token_id] if tokenizer.add_bos and tokenizer.bos_token_id is not None else []
    truncated = False
    if max_prompt_tokens is not None:
        room = max_prompt_tokens - 3 - len(bos)  # the three FIM markers
        if room < 1:
            raise FimError(param, f"no room for an infill prompt in {max_prompt_tokens} tokens")
        keep_suf = min(len(suf), max(room // 4, room - len(pre)))
        keep_pre = min(len(pre), room - keep_suf)
        keep_ctx = min(len(ctx), room - keep_suf - keep_pre)
        truncated = (keep_suf, keep_pre, keep_ctx) != (len(suf), len(pre), len(ctx))
        suf, pre = suf[:keep_suf], pre[len(pre) - keep_pre:]
        ctx = ctx[len(ctx) - keep_ctx:]
    if order == "psm":
        body = [tokens.prefix, *pre, tokens.suffix, *suf, tokens.middle]
    else:
        body = [tokens.prefix, tokens.suffix, *suf, tokens.middle, *pre]
    return InfillPrompt(ctx + bos + body, truncated)


def fim_prompt_format(tokenizer: Any) -> Optional[str]:
    """The PSM prompt as a format string over {prefix} and {suffix} in the tokenizer's own FIM token names
    (the tokenizer matches them in text), or None without FIM tokens: fine-tuning's `code` task uses it."""
    tokens = fim_tokens(tokenizer)
    if tokens is None:
        return None
    pre, suf, mid = (tokenizer.id_to_token(t) for t in (tokens.prefix, tokens.suffix, tokens.middle))
    return f"{pre}{{prefix}}{suf}{{suffix}}{mid}"


def fim_stop_ids(tokenizer: Any) -> list[int]:
    """FIM markers a model should never produce inside a middle: generation stops at them."""
    tokens = fim_tokens(tokenizer)
    if tokens is None:
        return []
    return sorted({t for t in (tokens.prefix, tokens.suffix, tokens.middle, tokens.pad, tokens.file_sep)
                   if t is not None})


def cut_at_indent(text: str, n_indent: int) -> tuple[str, bool]:
    """llama.cpp's `n_indent`: cut `text` before the first new line indented less than `n_indent` columns
    (blank lines aside). Returns the text and whether it was cut."""
    if n_indent <= 0:
        return text, False
    pos = text.find("\n")
    while pos != -1:
        line_end = text.find("\n", pos + 1)
        line = text[pos + 1:] if line_end == -1 else text[pos + 1:line_end]
        body = line.lstrip(" \t")
        if body and len(line) - len(body) < n_indent:
            return text[:pos + 1], True
        pos = line_end
    return text, False


__all__ = ["FIM_PREFIX", "FIM_MIDDLE", "FIM_SUFFIX", "FIM_PAD", "FIM_SPECIAL_TOKENS", "FIM_TOKEN_NAMES",
           "FIM_ORDERS", "FimError", "FimTokens", "InfillPrompt", "fim_tokens", "require_fim_tokens",
           "split_for_fim", "split_lines_for_fim", "choose_fim", "fim_training_ids", "infill_prompt", "fim_prompt_format", "fim_stop_ids",
           "cut_at_indent"]
