"""Supervised fine-tuning data: read records, render them to prompt/completion segments, tokenize with
prompt masking, pack and pad.

Record formats (detected from the first record's keys, or named explicitly):
- `text`: `{"text"}`, continued pretraining; every token is trained.
- `prompt_completion`: `{"prompt", "completion"}`; loss on the completion only.
- `alpaca`: `{"instruction", "input"?, "output"}`, rendered with the Alpaca prompt; loss on the output.
- `chat`: `{"messages": [{"role", "content"}, ...]}`, rendered with the model's chat template; loss on the
  assistant turns only.
- task formats (`gptforge.data.templates`): classification, sentiment, translation, summarization, qa, code.

Files: JSONL, JSON (a list of records), CSV, Parquet; `hf:NAME[:SPLIT]` loads a Hugging Face dataset
(online only). Every error names the file, the line (or row) and the field.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Optional, Sequence

import torch

if TYPE_CHECKING:  # pragma: no cover
    from ..tokenizer import Tokenizer

IGNORE_INDEX = -100
BASIC_FORMATS = ("text", "prompt_completion", "alpaca", "chat")
ALPACA_PROMPT = ("Below is an instruction that describes a task{context}. Write a response that appropriately "
                 "completes the request.\n\n### Instruction:\n{instruction}\n\n{input}### Response:\n")


from .records import DataError, Record, read_records
from .templates import Segment, detect_task


@dataclass
class Example:
    """A tokenized example: `input_ids` and per-token `train_mask` (True = predict this token)."""

    input_ids: list[int]
    train_mask: list[bool]
    label: Optional[int] = None  # class index, for the classification-head option


# ---- formats ------------------------------------------------------------------------------------------

def detect_format(record: Record) -> str:
    """The format implied by a record's keys (see the module docstring)."""
    keys = set(record.data)
    if "messages" in keys:
        return "chat"
    if {"instruction", "output"} <= keys:
        return "alpaca"
    if {"prompt", "completion"} <= keys:
        return "prompt_completion"
    task = detect_task(keys)
    if task:
        return task
    if "text" in keys:
        return "text"
    if {"chosen", "rejected"} <= keys:
        raise DataError(f"{record.where()}: this is preference data (chosen/rejected pairs); train on it with "
                        "objective dpo or orpo (gptforge finetune --objective dpo)")
    raise DataError(f"{record.where()}: cannot tell the data format from fields {sorted(keys)}; expected "
                    "'text', 'prompt'+'completion', 'instruction'+'output', 'messages', or a task format "
                    "(text+label, source+target, document+summary, context+question+answer, prefix+completion)")


def render_segments(record: Record, fmt: str, tokenizer: "Tokenizer") -> list[Segment]:
    """Prompt (not trained) and completion (trained) segments of one record in a basic format."""
    if fmt == "text":
        return [Segment(record.text("text"), True)]
    if fmt == "prompt_completion":
        return [Segment(record.text("prompt", allow_empty=True), False), Segment(record.text("completion"), True)]
    if fmt == "alpaca":
        context = record.text("input", required=False, allow_empty=True)
        prompt = ALPACA_PROMPT.format(
            context=", paired with an input that provides further context" if context.strip() else "",
            instruction=record.text("instruction"),
            input=f"### Input:\n{context}\n\n" if context.strip() else "")
        return [Segment(prompt, False), Segment(record.text("output"), True)]
    if fmt == "chat":
        return render_chat(record, tokenizer)
    raise DataError(f"{record.where()}: unknown format {fmt!r}; basic formats are {list(BASIC_FORMATS)}")


def render_chat(record: Record, tokenizer: "Tokenizer") -> list[Segment]:
    """Chat messages rendered with the chat template; assistant turns (with their end marker) are trained.

    The template is rendered for growing prefixes of the conversation: the text an assistant message adds
    after the generation prompt is exactly what the model must learn to produce.
    """
    messages = record.data.get("messages")
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{record.where('messages')}: expected a non-empty list of {{'role', 'content'}} objects")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise DataError(f"{record.where(f'messages[{i}]')}: expected an object with string 'role' and 'content'")
        if m["role"] not in ("system", "user", "assistant", "tool"):
            raise DataError(f"{record.where(f'messages[{i}].role')}: unknown role {m['role']!r} "
                            "(system, user, assistant, tool)")
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{record.where('messages')}: no assistant message to learn from")
    segments: list[Segment] = []
    done = ""
    for i, message in enumerate(messages):
        if message["role"] == "assistant":
            prompt = tokenizer.apply_chat_template(messages[:i], add_generation_prompt=True)
            segments.append(Segment(_extend(done, prompt, record), False))
            done = prompt
        full = tokenizer.apply_chat_template(messages[:i + 1], add_generation_prompt=False)
        segments.append(Segment(_extend(done, full, record), message["role"] == "assistant"))
        done = full
    return [s for s in segments if s.text]


def _extend(done: str, rendered: str, record: Record) -> str:
    if not rendered.startswith(done):
        raise DataError(f"{record.where('messages')}: the chat template does not render conversations "
                        "prefix-consistently, so assistant turns cannot be masked")
    return rendered[len(done):]


# ---- tokenization, packing, padding ------------------------------------------------------------------

def tokenize_segments(segments: Sequence[Segment], tokenizer: "Tokenizer", max_len: int,
                      add_eos: bool = True) -> Example:
    """Token ids and train mask; EOS (trained) is appended; overlong prompts lose tokens from the left."""
    prompt_ids: list[int] = []
    prompt_mask: list[bool] = []
    first = True
    for segment in segments:
        ids = tokenizer.encode(segment.text, add_special_tokens=first)
        first = False
        prompt_ids += ids
        prompt_mask += [segment.train] * len(ids)
    if add_eos and tokenizer.eos_token_id is not None:
        prompt_ids.append(tokenizer.eos_token_id)
        prompt_mask.append(True)
    if len(prompt_ids) > max_len:
        # Keep the end: the completion and the prompt text right before it matter most.
        cut = len(prompt_ids) - max_len
        prompt_ids, prompt_mask = prompt_ids[cut:], prompt_mask[cut:]
    return Example(prompt_ids, prompt_mask)


def pack_examples(examples: Iterable[Example], max_len: int) -> list[Example]:
    """Concatenate short examples (greedily, in order) into rows of at most `max_len` tokens."""
    rows: list[Example] = []
    current = Example([], [])
    for ex in examples:
        if current.input_ids and len(current.input_ids) + len(ex.input_ids) > max_len:
            rows.append(current)
            current = Example([], [])
        current = Example(current.input_ids + ex.input_ids, current.train_mask + ex.train_mask)
    if current.input_ids:
        rows.append(current)
    return rows


def collate(examples: Sequence[Example], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded (input_ids, labels), both (B, T); labels are shifted targets with -100 where not trained."""
    width = max(len(ex.input_ids) for ex in examples) - 1
    inputs = torch.full((len(examples), max(width, 1)), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), max(width, 1)), IGNORE_INDEX, dtype=torch.long)
    for row, ex in enumerate(examples):
        ids = torch.tensor(ex.input_ids, dtype=torch.long)
        mask = torch.tensor(ex.train_mask, dtype=torch.bool)
        n = len(ex.input_ids) - 1
        if n <= 0:
            continue
        inputs[row, :n] = ids[:-1]
        # labels[t] = ids[t+1] when token t+1 is trained (it is a completion/assistant token).
        labels[row, :n] = torch.where(mask[1:], ids[1:], torch.full_like(ids[1:], IGNORE_INDEX))
    return inputs, labels


# ---- one call: file -> examples ----------------------------------------------------------------------

def resolve_format(records: Sequence[Record], fmt: str) -> str:
    """`fmt`, or the detected format when it is "auto"."""
    return detect_format(records[0]) if fmt == "auto" else fmt


def load_sft_examples(path: str | Path, tokenizer: "Tokenizer", *, fmt: str = "auto", max_len: int = 512,
                      render: Optional[Callable[[Record], list[Segment]]] = None) -> list[Example]:
    """Read a file and tokenize every record (basic formats, or a custom `render`)."""
    records = read_records(path)
    fmt = resolve_format(records, fmt)
    render = render or (lambda r: render_segments(r, fmt, tokenizer))
    return [tokenize_segments(render(r), tokenizer, max_len) for r in records]


__all__ = ["DataError", "Record", "Segment", "Example", "IGNORE_INDEX", "BASIC_FORMATS", "read_records",
           "detect_format", "render_segments", "render_chat", "tokenize_segments", "pack_examples", "collate",
           "resolve_format", "load_sft_examples", "ALPACA_PROMPT"]
