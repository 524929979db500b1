"""Task templates: labelled records -> prompt/completion pairs, with per-task prompts.

| task | fields | default prompt -> completion |
|---|---|---|
| classification | text, label (+ label list) | "Text: {text}\\nLabel:" -> " {label}" |
| sentiment | text, label (default labels negative/positive) | "Review: {text}\\nSentiment:" -> " {label}" |
| translation | source, target (+ language names) | "Translate {source_lang} to {target_lang}.\\n{source_lang}: {source}\\n{target_lang}:" -> " {target}" |
| summarization | document, summary | "{document}\\nTL;DR:" -> " {summary}" |
| qa | context, question, answer | "Context: {context}\\nQuestion: {question}\\nAnswer:" -> " {answer}" |
| code | prefix, completion, suffix? | prefix -> completion; with a suffix: "<fim_prefix>{prefix}<fim_suffix>{suffix}<fim_middle>" (a model with FIM tokens, gptforge.fim), else "<PRE> {prefix} <SUF>{suffix} <MID>" -> completion |

A user prompt is a Python format string over the record's fields (plus `labels`, `source_lang`, `target_lang`).
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from typing import Any, Optional

from .records import DataError, Record

@dataclass
class Segment:
    """A piece of rendered text; `train` says whether its tokens are targets of the loss."""

    text: str
    train: bool


TASK_FIELDS: dict[str, tuple[str, ...]] = {
    "classification": ("text", "label"),
    "sentiment": ("text", "label"),
    "translation": ("source", "target"),
    "summarization": ("document", "summary"),
    "qa": ("context", "question", "answer"),
    "code": ("prefix", "completion"),
}
TARGET_FIELD = {"classification": "label", "sentiment": "label", "translation": "target",
                "summarization": "summary", "qa": "answer", "code": "completion"}
DEFAULT_PROMPTS = {
    "classification": "Text: {text}\nLabel:",
    "sentiment": "Review: {text}\nSentiment:",
    "translation": "Translate {source_lang} to {target_lang}.\n{source_lang}: {source}\n{target_lang}:",
    "summarization": "{document}\nTL;DR:",
    "qa": "Context: {context}\nQuestion: {question}\nAnswer:",
    "code": "{prefix}",
}
FIM_PROMPT = "<PRE> {prefix} <SUF>{suffix} <MID>"
DEFAULT_METRIC = {"classification": "accuracy", "sentiment": "accuracy", "translation": "chrf",
                  "summarization": "rougeL", "qa": "f1", "code": "exact_match", "prompt_completion": "rougeL",
                  "alpaca": "rougeL", "chat": None, "text": None}


@dataclass
class TaskTemplate:
    """How one task's records become prompt/completion text."""

    kind: str
    prompt: Optional[str] = None  # format string; None = DEFAULT_PROMPTS[kind]
    labels: Optional[list[str]] = None  # classification/sentiment: the allowed labels (verbalizers)
    source_lang: str = "English"
    target_lang: str = "French"
    completion_prefix: str = " "  # joins prompt and completion ("Label:" + " positive")
    fim_prompt: Optional[str] = None  # code with a suffix: the model's FIM format (gptforge.fim), else FIM_PROMPT

    def __post_init__(self) -> None:
        if self.kind not in TASK_FIELDS:
            raise DataError(f"unknown task {self.kind!r}; tasks are {sorted(TASK_FIELDS)}")
        if self.kind == "sentiment" and self.labels is None:
            self.labels = ["negative", "positive"]
        if self.labels is not None:
            if not isinstance(self.labels, list) or not self.labels:
                raise DataError(f"task {self.kind}: 'labels' must be a non-empty list, got {self.labels!r}")
            self.labels = [str(label) for label in self.labels]
        self._fields = [f for _, f, _, _ in string.Formatter().parse(self.template) if f]

    @property
    def template(self) -> str:
        return self.prompt if self.prompt is not None else DEFAULT_PROMPTS[self.kind]

    def target(self, record: Record) -> str:
        """The completion text of a record, checked (labels must be in the label list)."""
        name = TARGET_FIELD[self.kind]
        value = record.text(name)
        if self.labels is not None and value not in self.labels:
            raise DataError(f"{record.where(name)}: label {value!r} is not in the label list {self.labels}")
        return value

    def prompt_text(self, record: Record) -> str:
        """The rendered prompt of a record."""
        values: dict[str, Any] = {"labels": ", ".join(self.labels or []), "source_lang": self.source_lang,
                                  "target_lang": self.target_lang}
        for name in TASK_FIELDS[self.kind]:
            if name != TARGET_FIELD[self.kind]:
                values[name] = record.text(name)
        for name in self._fields:
            if name not in values:
                values[name] = record.text(name)
        if self.kind == "code" and "suffix" in record.data and self.prompt is None:
            return (self.fim_prompt or FIM_PROMPT).format(prefix=values["prefix"],
                                                          suffix=record.text("suffix", allow_empty=True))
        return self.template.format(**values)

    def segments(self, record: Record) -> list[Segment]:
        """Prompt (masked) and completion (trained) segments."""
        prefix = "" if self.kind == "code" else self.completion_prefix
        return [Segment(self.prompt_text(record), False), Segment(prefix + self.target(record), True)]

    def choices(self) -> Optional[list[str]]:
        """Completions to score for log-likelihood classification, or None for generative tasks."""
        if self.labels is None:
            return None
        return [self.completion_prefix + label for label in self.labels]


def detect_task(keys: set[str]) -> Optional[str]:
    """The task whose fields a record has (classification for text+label), or None."""
    for kind in ("qa", "translation", "summarization", "classification"):
        if set(TASK_FIELDS[kind]) <= keys:
            return kind
    if {"prefix", "completion"} <= keys:
        return "code"
    return None


def infer_labels(records: list[Record], field_name: str = "label") -> list[str]:
    """The sorted distinct labels of a dataset (used when a classification task gives no list)."""
    return sorted({r.text(field_name) for r in records})


__all__ = ["TaskTemplate", "TASK_FIELDS", "DEFAULT_PROMPTS", "DEFAULT_METRIC", "detect_task", "infer_labels"]
