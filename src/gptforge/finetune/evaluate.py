"""Per-task validation: masked loss and the task's metric (accuracy by label log-likelihood or by the
classification head; ROUGE/BLEU/chrF/EM/F1 of greedy generations via `gptforge.eval.metrics`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional, Sequence

import torch
import torch.nn.functional as F

from ..data.sft import IGNORE_INDEX, Record, collate, tokenize_segments
from ..eval import metrics as task_metrics
from .mixture import TaskData, collate_classification, encode_record

if TYPE_CHECKING:  # pragma: no cover
    from ..tokenizer import Tokenizer


def reference_text(task: TaskData, record: Record) -> str:
    """The expected completion of a record (what generation is scored against)."""
    if task.template is not None:
        return task.template.target(record).strip()
    return "".join(s.text for s in task.render(record) if s.train).strip()


def prompt_ids(task: TaskData, record: Record, tokenizer: "Tokenizer", max_len: int) -> list[int]:
    """Token ids of the prompt part of a record (the segments before the first trained one)."""
    segments = task.render(record)
    first_trained = next(i for i, s in enumerate(segments) if s.train)
    return tokenize_segments(segments[:first_trained], tokenizer, max_len, add_eos=False).input_ids


def baseline_prediction(record: Record, field_name: str) -> str:
    """A trivial prediction copied from a record field; identifiers become words (parse_args -> parse args)."""
    return str(record.data.get(field_name, "")).replace("_", " ").strip()


class TaskEvaluator:
    """`evaluate(model) -> {"val_loss", "<task>/val_loss", "<task>/<metric>", ...}` for the training loop."""

    def __init__(self, tasks: Sequence[TaskData], tokenizer: "Tokenizer", *, max_len: int, batch_size: int = 16,
                 max_examples: int = 64, classification: bool = False) -> None:
        self.tasks = list(tasks)
        self.tokenizer = tokenizer
        self.max_len, self.batch_size, self.max_examples = max_len, batch_size, max_examples
        self.classification = classification
        pad = tokenizer.pad_token_id
        self.pad_id = 0 if pad is None else pad

    def __call__(self, model: torch.nn.Module) -> dict[str, float]:
        return self.evaluate(model, "val")

    def evaluate(self, model: torch.nn.Module, split: str = "val") -> dict[str, float]:
        """Loss and metric per task on `split` ("val" or "test"); `val_loss` is the mean over tasks."""
        out: dict[str, float] = {}
        losses = []
        for task in self.tasks:
            records = getattr(task, split)
            if self.max_examples and split == "val":
                records = records[:self.max_examples]
            if not records:
                continue
            if self.classification:
                loss, accuracy = self.head_loss_and_accuracy(model, task, records)
                out[f"{task.name}/accuracy"] = accuracy
            else:
                loss = self.loss(model, task, records)
                out.update({f"{task.name}/{k}": v for k, v in self.metric(model, task, records).items()})
            out[f"{task.name}/{split}_loss"] = loss
            losses.append(loss)
        if losses:
            out[f"{split}_loss"] = sum(losses) / len(losses)
        return out

    @torch.no_grad()
    def loss(self, model: torch.nn.Module, task: TaskData, records: Sequence[Record]) -> float:
        """Mean cross-entropy over the trained (completion) tokens of `records`."""
        total, count = 0.0, 0
        device = next(model.parameters()).device
        examples = [encode_record(task, r, self.tokenizer, self.max_len) for r in records]
        for start in range(0, len(examples), self.batch_size):
            x, y = collate(examples[start:start + self.batch_size], self.pad_id)
            logits = model(x.to(device))
            y = y.to(device)
            total += float(F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1),
                                           ignore_index=IGNORE_INDEX, reduction="sum"))
            count += int((y != IGNORE_INDEX).sum())
        return total / max(count, 1)

    @torch.no_grad()
    def head_loss_and_accuracy(self, model: torch.nn.Module, task: TaskData,
                               records: Sequence[Record]) -> tuple[float, float]:
        """Cross-entropy and accuracy of a classification head at each prompt's last token."""
        device = next(model.parameters()).device
        examples = [encode_record(task, r, self.tokenizer, self.max_len, classification=True) for r in records]
        total, correct = 0.0, 0
        for start in range(0, len(examples), self.batch_size):
            x, y = collate_classification(examples[start:start + self.batch_size], self.pad_id)
            logits = model(x.to(device))
            y = y.to(device)
            picked = y != IGNORE_INDEX
            total += float(F.cross_entropy(logits[picked].float(), y[picked], reduction="sum"))
            correct += int((logits[picked].argmax(-1) == y[picked]).sum())
        return total / len(examples), correct / len(examples)

    def metric(self, model: torch.nn.Module, task: TaskData, records: Sequence[Record]) -> dict[str, float]:
        """The task's metric on `records` (empty when the task has none)."""
        if task.metric is None:
            return {}
        if task.metric == "accuracy":
            predictions = self.classify(model, task, records)
            references = [task.template.target(r) for r in records]
            return {"accuracy": task_metrics.accuracy(predictions, references)}
        predictions = self.generate(model, task, records)
        references = [reference_text(task, r) for r in records]
        return task_metrics.generation_metrics(predictions, references, [task.metric])

    def classify(self, model: torch.nn.Module, task: TaskData, records: Sequence[Record]) -> list[str]:
        """The label whose completion (" label" + EOS) has the highest log-likelihood, per record."""
        from ..eval.scoring import score_continuations

        assert task.template is not None and task.template.labels is not None
        eos = [self.tokenizer.eos_token_id] if self.tokenizer.eos_token_id is not None else []
        choices = [self.tokenizer.encode(c, add_special_tokens=False) + eos for c in task.template.choices()]
        pairs = []
        for r in records:
            context = prompt_ids(task, r, self.tokenizer, self.max_len - max(len(c) for c in choices))
            pairs += [(context, c) for c in choices]
        scores = score_continuations(model, pairs, batch_size=self.batch_size * len(choices))
        n = len(choices)
        labels = task.template.labels
        return [labels[max(range(n), key=lambda j: scores[i * n + j].logprob)] for i in range(len(records))]

    def generate(self, model: torch.nn.Module, task: TaskData, records: Sequence[Record]) -> list[str]:
        """Greedy completions of the records' prompts, cut at the task's stop strings."""
        from ..generate import generate

        budget = min(self.max_len, model.config.block_size) - task.max_new_tokens
        prompts = [prompt_ids(task, r, self.tokenizer, budget) for r in records]
        outputs = []
        for start in range(0, len(prompts), self.batch_size):
            outputs += generate(model, prompts[start:start + self.batch_size], tokenizer=self.tokenizer,
                                max_new_tokens=task.max_new_tokens, do_sample=False, stop=list(task.stop) or None)
        return [o.text.strip() for o in outputs]

    def baseline(self, task: TaskData, split: str = "test") -> Optional[dict[str, float]]:
        """The task metric of the trivial baseline prediction (`task.baseline` field), or None."""
        records = getattr(task, split)
        if task.baseline is None or not records or task.metric in (None, "accuracy"):
            return None
        predictions = [baseline_prediction(r, task.baseline) for r in records]
        references = [reference_text(task, r) for r in records]
        return task_metrics.generation_metrics(predictions, references, [task.metric])


__all__ = ["TaskEvaluator", "reference_text", "prompt_ids", "baseline_prediction"]
