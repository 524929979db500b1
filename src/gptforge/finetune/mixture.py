"""Task datasets and the multi-task batch source that plugs into `gptforge.train.loop.train`.

Each micro-batch row draws a task with probability p_i (sampling weights, or temperature-scaled dataset
sizes), then the task's next example in a per-epoch shuffled order. Everything random is derived from
(seed, step) or (seed, task, epoch), so the source's state is a step counter plus one cursor per task and
a resumed run sees exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence

import numpy as np
import torch

from ..data.augment import AugmentConfig, augment_text
from ..data.sft import IGNORE_INDEX, Example, Record, Segment, collate, tokenize_segments
from ..data.templates import TASK_FIELDS, TARGET_FIELD, TaskTemplate

if TYPE_CHECKING:  # pragma: no cover
    from ..tokenizer import Tokenizer

# Record fields that augmentation may perturb, per format (never the trained target).
AUGMENT_FIELDS: dict[str, tuple[str, ...]] = {
    "prompt_completion": ("prompt",), "alpaca": ("instruction", "input"),
    **{kind: tuple(f for f in fields if f != TARGET_FIELD[kind]) for kind, fields in TASK_FIELDS.items()
       if kind != "code"},
}


@dataclass
class TaskData:
    """One task: its records, how they render to segments, and its validation setup."""

    name: str
    fmt: str
    render: Callable[[Record], list[Segment]]
    train: list[Record]
    val: list[Record]
    template: Optional[TaskTemplate] = None  # task formats only
    metric: Optional[str] = None
    weight: float = 1.0
    test: list[Record] = field(default_factory=list)
    max_new_tokens: int = 32
    stop: list[str] = field(default_factory=lambda: ["\n"])
    baseline: Optional[str] = None
    class_ids: Optional[dict[str, int]] = None  # classification head: label -> index


def mixture_probabilities(sizes: Sequence[int], weights: Sequence[float], mixing: str = "weights",
                          temperature: float = 1.0) -> np.ndarray:
    """Task sampling probabilities: p_i ~ w_i ("weights") or p_i ~ w_i * n_i^(1/T) ("temperature")."""
    w = np.asarray(weights, dtype=np.float64)
    if mixing == "temperature":
        w = w * np.asarray(sizes, dtype=np.float64) ** (1.0 / temperature)
    elif mixing != "weights":
        raise ValueError(f"data.mixing must be 'weights' or 'temperature', got {mixing!r}")
    return w / w.sum()


class MultiTaskSource:
    """`next_batch() -> (input_ids, labels)` over one or several tasks, with exact resume."""

    def __init__(self, tasks: Sequence[TaskData], tokenizer: "Tokenizer", *, batch_size: int, max_len: int,
                 probabilities: Sequence[float], seed: int = 0, packing: bool = False,
                 augment: Optional[AugmentConfig] = None, classification: bool = False) -> None:
        self.tasks = list(tasks)
        self.tokenizer = tokenizer
        self.batch_size, self.max_len, self.seed, self.packing = batch_size, max_len, seed, packing
        self.probabilities = np.asarray(probabilities, dtype=np.float64)
        self.augment = augment if augment is not None and augment.active else None
        self.classification = classification
        pad = tokenizer.pad_token_id
        self.pad_id = 0 if pad is None else pad
        self.step = 0
        self.cursors = [0] * len(self.tasks)
        self.drawn = [0] * len(self.tasks)  # examples drawn per task (for reports and tests)
        # Without augmentation every draw of an example is identical: tokenize once.
        self._cache: dict[tuple[int, int], Example] = {}

    # ---- examples ----
    def example(self, task_index: int, record_index: int, rng: Optional[random.Random] = None) -> Example:
        """The tokenized training example `record_index` of task `task_index` (augmented when configured)."""
        key = (task_index, record_index)
        if self.augment is None and key in self._cache:
            return self._cache[key]
        task = self.tasks[task_index]
        record = task.train[record_index]
        if self.augment is not None and rng is not None:
            record = augment_record(record, task.fmt, self.augment, rng)
        ex = encode_record(task, record, self.tokenizer, self.max_len, self.classification)
        if self.augment is None:
            self._cache[key] = ex
        return ex

    def _draw(self, rng: np.random.Generator) -> Example:
        t = int(rng.choice(len(self.tasks), p=self.probabilities))
        n = len(self.tasks[t].train)
        epoch, position = divmod(self.cursors[t], n)
        order = np.random.default_rng([self.seed, t, epoch]).permutation(n)
        self.cursors[t] += 1
        self.drawn[t] += 1
        aug_rng = random.Random(int(rng.integers(2 ** 62))) if self.augment is not None else None
        return self.example(t, int(order[position]), aug_rng)

    # ---- the BatchSource protocol ----
    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """One micro-batch: right-padded input ids and shifted labels (-100 on prompts and padding)."""
        rng = np.random.default_rng([self.seed, 1_000_003, self.step])
        rows: list[Example] = []
        for _ in range(self.batch_size):
            if not self.packing:
                rows.append(self._draw(rng))
                continue
            row = self._draw(rng)
            # Fill the row up to max_len (+1: the row is shifted into inputs and labels).
            while True:
                nxt = self._draw(rng)
                if len(row.input_ids) + len(nxt.input_ids) > self.max_len + 1:
                    break  # the drawn example is dropped; the next row starts fresh
                row = Example(row.input_ids + nxt.input_ids, row.train_mask + nxt.train_mask)
            rows.append(row)
        self.step += 1
        if self.classification:
            return collate_classification(rows, self.pad_id)
        return collate(rows, self.pad_id)

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "cursors": list(self.cursors), "drawn": list(self.drawn)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if len(state["cursors"]) != len(self.tasks):
            raise ValueError(f"data state has {len(state['cursors'])} task cursor(s) but the recipe has "
                             f"{len(self.tasks)} task(s); resume with the same tasks")
        self.step = int(state["step"])
        self.cursors = [int(c) for c in state["cursors"]]
        self.drawn = [int(c) for c in state.get("drawn", self.cursors)]


def augment_record(record: Record, fmt: str, config: AugmentConfig, rng: random.Random) -> Record:
    """A copy of `record` with its input fields (never the target) augmented."""
    data = dict(record.data)
    for name in AUGMENT_FIELDS.get(fmt, ()):
        if isinstance(data.get(name), str) and data[name].strip():
            data[name] = augment_text(data[name], config, rng)
    return Record(data, record.source, record.line)


def encode_record(task: TaskData, record: Record, tokenizer: "Tokenizer", max_len: int,
                  classification: bool = False) -> Example:
    """Tokenize a record; with a classification head the example is the prompt plus its class index."""
    if classification:
        assert task.template is not None and task.class_ids is not None
        label = task.template.target(record)
        prompt = tokenize_segments([Segment(task.template.prompt_text(record), False)], tokenizer, max_len,
                                   add_eos=False)
        return Example(prompt.input_ids, prompt.train_mask, label=task.class_ids[label])
    return tokenize_segments(task.render(record), tokenizer, max_len + 1)


def collate_classification(examples: Sequence[Example], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded prompts and labels that are -100 except the class index at each row's last real token."""
    width = max(len(ex.input_ids) for ex in examples)
    inputs = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    for row, ex in enumerate(examples):
        inputs[row, :len(ex.input_ids)] = torch.tensor(ex.input_ids, dtype=torch.long)
        labels[row, len(ex.input_ids) - 1] = ex.label
    return inputs, labels


__all__ = ["TaskData", "MultiTaskSource", "mixture_probabilities", "augment_record", "encode_record",
           "collate_classification", "AUGMENT_FIELDS"]
