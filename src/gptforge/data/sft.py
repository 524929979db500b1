"""Supervised fine-tuning data: read records, render them to prompt/completion segments, tokenize with
prompt masking, pack and pad.

Record formats (detected from the first record's keys, or named explicitly):
- `text`: `{"text"}`, continued pretraining; every token is trained.
- `prompt_completion`: `{"prompt", "completion"}`; loss on the completion only.
- `alpaca`: `{"instruction", "input"?, "output"}`, rendered with the Alpaca prompt; loss on the output.
- `chat`: `{"messages": [{"role", "content"}, ...]}`, rendered with the model's chat template; loss on the
  assistant turns only.
- task formats (`gptforge.data.tasks`): classification, sentiment, translation, summarization, qa, code.

Files: JSONL, JSON (a list of records), CSV, Parquet; `hf:NAME[:SPLIT]` loads a Hugging Face dataset
(online only). Every error names the file, the line (or row) and the field.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Optional, Sequence

import torch

if TYPE_CHECKING:  # pragma: no cover
    from ..tokenizer import Tokenizer

IGNORE_INDEX = -100
BASIC_FORMATS = ("text", "prompt_completion", "alpaca", "chat")
ALPACA_PROMPT = ("Below is an instruction that describes a task{context}. Write a response that appropriately "
                 "completes the request.\n\n### Instruction:\n{instruction}\n\n{input}### Response:\n")


from ..errors import DataError  # noqa: E402  (re-exported: gptforge.data.sft.DataError)


@dataclass
class Record:
    """One raw example and where it came from (for error messages)."""

    data: dict[str, Any]
    source: str
    line: int  # 1-based line (JSONL, CSV with header = line 1) or item/row number (JSON, Parquet, HF)

    def where(self, field: Optional[str] = None) -> str:
        unit = "line" if self.source.endswith((".jsonl", ".csv")) else "record"
        return f"{self.source} {unit} {self.line}" + (f" field {field!r}" if field else "")

    def text(self, field: str, *, required: bool = True, allow_empty: bool = False) -> str:
        """The string value of `field`, or a DataError naming file, line and field."""
        if field not in self.data or self.data[field] is None:
            if not required:
                return ""
            raise DataError(f"{self.where(field)}: missing (record has {sorted(self.data)})")
        value = self.data[field]
        if isinstance(value, (int, float)) and not isinstance(value, bool) and field in ("label", "answer", "target"):
            value = str(value)
        if not isinstance(value, str):
            raise DataError(f"{self.where(field)}: expected a string, got {type(value).__name__} {value!r}"[:300])
        if not value.strip() and not allow_empty:
            raise DataError(f"{self.where(field)}: empty string")
        return value


@dataclass
class Segment:
    """A piece of rendered text; `train` says whether its tokens are targets of the loss."""

    text: str
    train: bool


@dataclass
class Example:
    """A tokenized example: `input_ids` and per-token `train_mask` (True = predict this token)."""

    input_ids: list[int]
    train_mask: list[bool]
    label: Optional[int] = None  # class index, for the classification-head option


# ---- reading files ---------------------------------------------------------------------------------

def read_records(path: str | Path) -> list[Record]:
    """All records of a JSONL/JSON/CSV/Parquet file (or `hf:NAME[:SPLIT]`), with their line numbers."""
    spec = str(path)
    if spec.startswith("hf:"):
        return _read_hf(spec)
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        records = _read_jsonl(path)
    elif suffix == ".json":
        records = _read_json(path)
    elif suffix == ".csv":
        records = _read_csv(path)
    elif suffix == ".parquet":
        records = _read_parquet(path)
    else:
        raise DataError(f"{path}: unsupported data file type {suffix!r}; use .jsonl, .json, .csv or .parquet")
    if not records:
        raise DataError(f"{path}: no records (empty file)")
    return records


def _read_jsonl(path: Path) -> list[Record]:
    records = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                data = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path} line {number}: invalid JSON: {exc.msg}") from exc
            if not isinstance(data, dict):
                raise DataError(f"{path} line {number}: expected a JSON object, got {type(data).__name__}")
            records.append(Record(data, str(path), number))
    return records


def _read_json(path: Path) -> list[Record]:
    try:
        data = json.loads(path.read_text(encoding="utf-8") or "[]")
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: invalid JSON at line {exc.lineno}: {exc.msg}") from exc
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of records (or {{\"data\": [...]}})")
    for i, item in enumerate(data, start=1):
        if not isinstance(item, dict):
            raise DataError(f"{path} record {i}: expected a JSON object, got {type(item).__name__}")
    return [Record(item, str(path), i) for i, item in enumerate(data, start=1)]


def _read_csv(path: Path) -> list[Record]:
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        # DictReader.line_num counts physical lines, so quoted multi-line cells keep the right number.
        return [Record({k: v for k, v in row.items() if k is not None}, str(path), reader.line_num) for row in reader]


def _read_parquet(path: Path) -> list[Record]:
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:  # pragma: no cover - pyarrow comes with `datasets`
        raise DataError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow)") from exc
    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as exc:  # pyarrow raises its own error types
        raise DataError(f"{path}: cannot read Parquet file: {exc}") from exc
    return [Record(row, str(path), i) for i, row in enumerate(rows, start=1)]


def _read_hf(spec: str) -> list[Record]:
    parts = spec[3:].split(":")
    name, split = parts[0], parts[1] if len(parts) > 1 else "train"
    try:
        import datasets
    except ImportError as exc:  # pragma: no cover
        raise DataError(f"{spec}: Hugging Face datasets need `pip install datasets`") from exc
    try:
        dataset = datasets.load_dataset(name, split=split)
    except Exception as exc:  # offline, unknown name, bad split: the library's message says which
        raise DataError(f"{spec}: cannot load Hugging Face dataset {name!r} split {split!r}: {exc}") from exc
    records = [Record(dict(row), spec, i) for i, row in enumerate(dataset, start=1)]
    if not records:
        raise DataError(f"{spec}: no records")
    return records


# ---- formats ------------------------------------------------------------------------------------------

def detect_format(record: Record) -> str:
    """The format implied by a record's keys (see the module docstring)."""
    from .tasks import detect_task

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
