"""Preference data: prompt / chosen / rejected records, rendered and tokenized with prompt masking.

Record shapes (TRL's, so Hub preference sets and `gptforge feedback export` read alike):
- text: `{"prompt": str, "chosen": str, "rejected": str}`; EOS ends each answer.
- chat: `{"prompt": [messages], "chosen": [assistant message(s)], "rejected": [...]}`, rendered with the
  model's chat template; `chosen`/`rejected` may also be plain strings (one assistant message).
- chat, implicit prompt: `{"chosen": [conversation], "rejected": [conversation]}`; the prompt is the
  leading messages the two conversations share.

Only answer tokens are trained (the prompt is masked), exactly as in supervised fine-tuning: both answers
of a pair are tokenized as prompt + answer with `tokenize_segments`, so the prompt tokens are identical.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

import torch

from .records import DataError, Record
from .sft import Example, collate, tokenize_segments
from .templates import Segment

if TYPE_CHECKING:  # pragma: no cover
    from ..tokenizer import Tokenizer

PREFERENCE_FIELDS = ("chosen", "rejected")
ROLES = ("system", "user", "assistant", "tool")


@dataclass
class Pair:
    """One tokenized preference pair: the same prompt with the chosen and with the rejected answer."""

    chosen: Example
    rejected: Example


def is_preference_record(record: Record) -> bool:
    """Whether a record has the chosen/rejected fields of preference data."""
    return all(name in record.data for name in PREFERENCE_FIELDS)


def is_chat_record(record: Record) -> bool:
    """Whether a preference record is conversational (messages rather than plain text)."""
    return any(isinstance(record.data.get(k), list) for k in ("prompt", "chosen", "rejected"))


def _messages(record: Record, field: str, value: Any) -> list[dict[str, str]]:
    if isinstance(value, str):  # a plain answer to a chat prompt: one assistant message
        if not value.strip():
            raise DataError(f"{record.where(field)}: empty string")
        return [{"role": "assistant", "content": value}]
    if not isinstance(value, list):
        raise DataError(f"{record.where(field)}: expected a string or a list of {{'role', 'content'}} messages, "
                        f"got {type(value).__name__}")
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise DataError(f"{record.where(f'{field}[{i}]')}: expected an object with string 'role' and 'content'")
        if m["role"] not in ROLES:
            raise DataError(f"{record.where(f'{field}[{i}].role')}: unknown role {m['role']!r} ({', '.join(ROLES)})")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def split_conversations(record: Record) -> tuple[list[dict[str, str]], list[dict[str, str]], list[dict[str, str]]]:
    """(prompt messages, chosen messages, rejected messages) of a chat record, implicit prompt included."""
    chosen = _messages(record, "chosen", record.data.get("chosen"))
    rejected = _messages(record, "rejected", record.data.get("rejected"))
    if record.data.get("prompt") is not None:
        prompt_value = record.data["prompt"]
        if isinstance(prompt_value, str):
            prompt = [{"role": "user", "content": prompt_value}]
        else:
            prompt = _messages(record, "prompt", prompt_value)
    else:  # the shared leading messages are the prompt
        shared = 0
        while shared < min(len(chosen), len(rejected)) - 1 and chosen[shared] == rejected[shared]:
            shared += 1
        prompt, chosen, rejected = chosen[:shared], chosen[shared:], rejected[shared:]
        if not prompt:
            raise DataError(f"{record.where('chosen')}: no 'prompt' field and the chosen and rejected conversations "
                            "share no leading messages to use as the prompt")
    for name, answer in (("chosen", chosen), ("rejected", rejected)):
        if not answer or answer[-1]["role"] != "assistant":
            raise DataError(f"{record.where(name)}: the answer must end with an assistant message")
    return prompt, chosen, rejected


def render_pair(record: Record, tokenizer: "Tokenizer") -> tuple[list[Segment], list[Segment]]:
    """Prompt (masked) and answer (trained) segments of the chosen and of the rejected side."""
    for name in PREFERENCE_FIELDS:
        if record.data.get(name) is None:
            raise DataError(f"{record.where(name)}: missing (preference records have prompt, chosen, rejected; "
                            f"this one has {sorted(record.data)})")
    if not is_chat_record(record):
        prompt = record.text("prompt", allow_empty=True)
        return ([Segment(prompt, False), Segment(record.text("chosen"), True)],
                [Segment(prompt, False), Segment(record.text("rejected"), True)])
    prompt, chosen, rejected = split_conversations(record)
    try:
        prompt_text = tokenizer.apply_chat_template(prompt, add_generation_prompt=True)
        sides = []
        for name, answer in (("chosen", chosen), ("rejected", rejected)):
            full = tokenizer.apply_chat_template(prompt + answer, add_generation_prompt=False)
            if not full.startswith(prompt_text):
                raise DataError(f"{record.where(name)}: the chat template does not render the prompt as a prefix of "
                                "prompt + answer, so the prompt cannot be masked")
            sides.append([Segment(prompt_text, False), Segment(full[len(prompt_text):], True)])
    except ValueError as exc:  # TokenizerError: the template refused the messages
        if isinstance(exc, DataError):
            raise
        raise DataError(f"{record.where('prompt')}: {exc}") from exc
    return sides[0], sides[1]


def encode_pair(record: Record, tokenizer: "Tokenizer", max_len: int) -> Pair:
    """Tokenize both sides of a record (max_len + 1 tokens each: rows are shifted into inputs and labels)."""
    chosen, rejected = render_pair(record, tokenizer)
    pair = Pair(tokenize_segments(chosen, tokenizer, max_len + 1), tokenize_segments(rejected, tokenizer, max_len + 1))
    for name, ex in (("chosen", pair.chosen), ("rejected", pair.rejected)):
        if not any(ex.train_mask[1:]):
            raise DataError(f"{record.where(name)}: the answer has no tokens to train on")
    return pair


def collate_pairs(pairs: Sequence[Pair], pad_id: int) -> dict[str, torch.Tensor]:
    """`input_ids` and shifted `labels`, both (2B, T): the B chosen rows first, then the B rejected rows."""
    input_ids, labels = collate([p.chosen for p in pairs] + [p.rejected for p in pairs], pad_id)
    return {"input_ids": input_ids, "labels": labels}


__all__ = ["Pair", "is_preference_record", "is_chat_record", "split_conversations", "render_pair", "encode_pair",
           "collate_pairs", "PREFERENCE_FIELDS"]
