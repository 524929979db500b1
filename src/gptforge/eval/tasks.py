"""Task evaluation on JSONL files: choices scored by log-likelihood, generations scored by text metrics.

One JSON object per line. The fields each task type reads (a `--template` may use any field):

| task type        | fields                                        | default prompt                          | metrics |
|------------------|-----------------------------------------------|-----------------------------------------|---------|
| multiple_choice  | prompt (or question), choices, answer (index or text) | `{prompt}`                      | acc, acc_norm |
| classification   | text, label (one of the label list)           | `{text}\nLabel:`                        | acc, acc_norm |
| qa               | question, answer (text or list), context?     | `{context}\nQuestion: {question}\nAnswer:` | exact_match, f1 |
| translation      | source, target (text or list)                 | `{source}\nTranslation:`                | bleu, chrf |
| summarization    | document, summary (text or list)              | `{document}\nSummary:`                  | rouge1, rouge2, rougeL |
| generation       | prompt, reference (text or list)              | `{prompt}`                              | all of the above |

Few-shot prompts follow lm-eval's layout: k solved examples, each `prompt + " " + answer`, joined by a
blank line before the query. The k examples are drawn without replacement, from `fewshot_file` or
else from the other examples of the same file, by a generator seeded with (seed, example index), so
the same command always builds the same prompts.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence

from ..progress import Progress

from ..data.records import iter_jsonl
from ..errors import DataError
from . import metrics as text_metrics
from .scoring import encode_pair, score_continuations

if TYPE_CHECKING:
    from ..model import GPT
    from ..tokenizer import Tokenizer

CHOICE_TASKS = ("multiple_choice", "classification")
GENERATION_TASKS = ("qa", "translation", "summarization", "generation")
TASK_TYPES = CHOICE_TASKS + GENERATION_TASKS

DEFAULT_TEMPLATES = {
    "multiple_choice": "{prompt}",
    "classification": "{text}\nLabel:",
    "qa": "{context}\nQuestion: {question}\nAnswer:",
    "translation": "{source}\nTranslation:",
    "summarization": "{document}\nSummary:",
    "generation": "{prompt}",
}
# The field holding the answer text(s) of generation tasks.
REFERENCE_FIELDS = {"qa": "answer", "translation": "target", "summarization": "summary", "generation": "reference"}
TASK_METRICS = {
    "qa": ("exact_match", "f1"),
    "translation": ("bleu", "chrf"),
    "summarization": ("rouge1", "rouge2", "rougeL"),
    "generation": text_metrics.GENERATION_METRICS,
}
TARGET_DELIMITER = " "
FEWSHOT_DELIMITER = "\n\n"


@dataclass
class TaskExample:
    """One evaluation example: its rendered prompt and either choices + answer or reference texts."""

    prompt: str
    choices: list[str] = field(default_factory=list)
    answer: Optional[int] = None
    references: list[str] = field(default_factory=list)
    location: str = ""  # "file:line", for messages

    @property
    def target(self) -> str:
        """The answer text shown after the prompt in few-shot demonstrations."""
        return self.choices[self.answer] if self.choices else self.references[0]


class TaskDataError(DataError):
    """A task file that cannot be read as the chosen task type; the message names file, line and field."""


def read_jsonl(path: str | Path) -> list[tuple[int, dict[str, Any]]]:
    """(line number, object) of each non-blank line; errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"task file not found: {path}")
    records = list(iter_jsonl(path, error=TaskDataError))
    if not records:
        raise TaskDataError(f"{path}: the file has no examples")
    return records


def _text_field(record: dict, name: str, where: str) -> str:
    if name not in record:
        raise TaskDataError(f"{where}: missing field '{name}'")
    value = record[name]
    if not isinstance(value, str):
        raise TaskDataError(f"{where}: field '{name}' must be a string, got {type(value).__name__}")
    return value


def _texts_field(record: dict, name: str, where: str) -> list[str]:
    if name not in record:
        raise TaskDataError(f"{where}: missing field '{name}'")
    value = record[name]
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, list) or not values or not all(isinstance(v, str) for v in values):
        raise TaskDataError(f"{where}: field '{name}' must be a string or a non-empty list of strings")
    return values


def _render(template: str, record: dict, where: str) -> str:
    try:
        return template.format_map(record)
    except KeyError as exc:
        raise TaskDataError(f"{where}: missing field '{exc.args[0]}' (used by the prompt template)") from None
    except (IndexError, ValueError, AttributeError) as exc:
        raise TaskDataError(f"{where}: cannot fill the prompt template {template!r}: {exc}") from None


def parse_example(record: dict, task_type: str, where: str, *, template: Optional[str] = None,
                  labels: Optional[Sequence[str]] = None) -> TaskExample:
    """One JSONL record as a TaskExample of `task_type`; bad records raise TaskDataError naming `where`."""
    if task_type not in TASK_TYPES:
        raise ValueError(f"--task-type must be one of {', '.join(TASK_TYPES)}, got {task_type!r}")
    record = dict(record)
    if task_type == "multiple_choice":
        if "prompt" not in record and "question" in record:
            record["prompt"] = record["question"]
        if template is None:
            _text_field(record, "prompt", where)
        if "choices" not in record:
            raise TaskDataError(f"{where}: missing field 'choices'")
        choices = record["choices"]
        if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
            raise TaskDataError(f"{where}: field 'choices' must be a list of at least two strings")
        answer = _answer_index(record, choices, where)
    elif task_type == "classification":
        _text_field(record, "text", where)
        label = record.get("label")
        if "label" not in record:
            raise TaskDataError(f"{where}: missing field 'label'")
        choices = [str(x) for x in labels or ()]
        if str(label) not in choices:
            raise TaskDataError(f"{where}: field 'label' is {label!r}, not one of the labels {choices}")
        answer = choices.index(str(label))
    else:
        if task_type == "qa":
            _text_field(record, "question", where)
            record.setdefault("context", "")
        references = _texts_field(record, REFERENCE_FIELDS[task_type], where)
        prompt = _render(template or DEFAULT_TEMPLATES[task_type], record, where)
        if task_type == "qa" and template is None and not record["context"]:
            prompt = prompt.lstrip("\n")
        return TaskExample(prompt=prompt, references=references, location=where)
    prompt = _render(template or DEFAULT_TEMPLATES[task_type], record, where)
    return TaskExample(prompt=prompt, choices=choices, answer=answer, location=where)


def _answer_index(record: dict, choices: list[str], where: str) -> int:
    if "answer" not in record:
        raise TaskDataError(f"{where}: missing field 'answer'")
    answer = record["answer"]
    if isinstance(answer, bool) or not isinstance(answer, (int, str)):
        raise TaskDataError(f"{where}: field 'answer' must be a choice index or one of the choices")
    if isinstance(answer, int):
        if not 0 <= answer < len(choices):
            raise TaskDataError(f"{where}: field 'answer' is {answer}, outside 0..{len(choices) - 1}")
        return answer
    if answer not in choices:
        raise TaskDataError(f"{where}: field 'answer' is {answer!r}, not one of the choices {choices}")
    return choices.index(answer)


def load_task(path: str | Path, task_type: str, *, template: Optional[str] = None,
              labels: Optional[Sequence[str]] = None) -> list[TaskExample]:
    """Read a task JSONL file; classification labels default to the labels in order of first appearance."""
    records = read_jsonl(path)
    if task_type == "classification" and not labels:
        labels = []
        for number, record in records:
            if "label" not in record:
                raise TaskDataError(f"{path}:{number}: missing field 'label'")
            if str(record["label"]) not in labels:
                labels.append(str(record["label"]))
        if len(labels) < 2:
            raise TaskDataError(f"{path}: classification needs at least two labels, found {labels}")
    return [parse_example(record, task_type, f"{path}:{number}", template=template, labels=labels)
            for number, record in records]


def fewshot_prompts(examples: Sequence[TaskExample], shots: int, *, pool: Optional[Sequence[TaskExample]] = None,
                    seed: int = 1234) -> list[str]:
    """Each example's prompt preceded by `shots` solved examples drawn deterministically.

    Without `pool` the demonstrations come from `examples` themselves, never the example being asked.
    """
    if shots < 0:
        raise ValueError(f"--shots must be >= 0, got {shots}")
    if shots == 0:
        return [e.prompt for e in examples]
    exclude_self = pool is None
    pool = examples if pool is None else pool
    available = len(pool) - (1 if exclude_self else 0)
    if available < shots:
        raise ValueError(f"--shots {shots} needs at least {shots} demonstration examples, the pool has {available}")
    prompts = []
    for index, example in enumerate(examples):
        rng = random.Random(f"{seed}:{index}")
        if exclude_self:
            # Draw from the other len(pool) - 1 examples: indices at or after the query's shift by one.
            drawn = [i + (i >= index) for i in rng.sample(range(len(pool) - 1), shots)]
        else:
            drawn = rng.sample(range(len(pool)), shots)
        demos = [pool[i] for i in drawn]
        shown = [d.prompt + TARGET_DELIMITER + d.target for d in demos]
        prompts.append(FEWSHOT_DELIMITER.join(shown + [example.prompt]))
    return prompts


@dataclass
class TaskResult:
    """Metrics of one task file, and the per-example predictions."""

    task: str
    task_type: str
    num_examples: int
    shots: int
    metrics: dict[str, float]
    predictions: list[Any]

    def to_dict(self, with_predictions: bool = False) -> dict:
        """JSON-ready; predictions only when asked (they can be long)."""
        out = {"task": self.task, "task_type": self.task_type, "num_examples": self.num_examples,
               "shots": self.shots, "metrics": self.metrics}
        if with_predictions:
            out["predictions"] = self.predictions
        return out


def evaluate_choices(model: "GPT", tokenizer: "Tokenizer", examples: Sequence[TaskExample], prompts: Sequence[str],
                     *, batch_size: int = 16, max_length: Optional[int] = None,
                     progress: bool = True) -> tuple[dict[str, float], list[int]]:
    """acc and acc_norm (log-likelihood per character of the choice, as lm-eval) and the predicted indices."""
    pairs, owners = [], []
    for index, (example, prompt) in enumerate(zip(examples, prompts)):
        for choice in example.choices:
            pairs.append(encode_pair(tokenizer, prompt, TARGET_DELIMITER + choice))
            owners.append(index)
    bar = Progress(len(pairs), desc="scoring choices", unit="choice", enabled=progress)
    scores = score_continuations(model, pairs, batch_size=batch_size, max_length=max_length,
                                 on_batch=lambda n, _tokens: bar.update(n))
    bar.close()
    per_example: list[list[float]] = [[] for _ in examples]
    for owner, score in zip(owners, scores):
        per_example[owner].append(score.logprob)
    predicted, predicted_norm = [], []
    for example, lls in zip(examples, per_example):
        predicted.append(max(range(len(lls)), key=lambda i: lls[i]))
        normed = [ll / max(len(c), 1) for ll, c in zip(lls, example.choices)]
        predicted_norm.append(max(range(len(normed)), key=lambda i: normed[i]))
    answers = [e.answer for e in examples]
    metrics = {"acc": text_metrics.accuracy(predicted, answers),
               "acc_norm": text_metrics.accuracy(predicted_norm, answers)}
    return metrics, predicted


def generate_texts(model: "GPT", tokenizer: "Tokenizer", prompts: Sequence[str], *, max_new_tokens: int = 64,
                   stop: Sequence[str] = (FEWSHOT_DELIMITER,), batch_size: int = 16,
                   progress: bool = True) -> list[str]:
    """Greedy continuations of `prompts`, cut at the first stop string; prompts keep their last tokens."""
    from ..generate import generate

    room = model.config.block_size - max_new_tokens
    if room < 1:
        raise ValueError(f"max_new_tokens {max_new_tokens} leaves no room for a prompt in the model context "
                         f"(block_size={model.config.block_size})")
    texts: list[str] = []
    bar = Progress(len(prompts), desc="generating", unit="prompt", enabled=progress)
    for start in range(0, len(prompts), batch_size):
        ids = [tokenizer.encode(p)[-room:] for p in prompts[start:start + batch_size]]
        outputs = generate(model, ids, tokenizer=tokenizer, max_new_tokens=max_new_tokens, do_sample=False,
                           stop=list(stop) or None)
        texts.extend(cut_at_stop(out.text, stop) for out in outputs)
        bar.update(len(ids))
    bar.close()
    return texts


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """`text` up to the first occurrence of any stop string."""
    cut = len(text)
    for s in stop:
        if s and s in text:
            cut = min(cut, text.index(s))
    return text[:cut]


def evaluate_task(model: "GPT", tokenizer: "Tokenizer", path: str | Path, task_type: str, *, shots: int = 0,
                  fewshot_file: Optional[str | Path] = None, seed: int = 1234, template: Optional[str] = None,
                  labels: Optional[Sequence[str]] = None, limit: Optional[int] = None, batch_size: int = 16,
                  max_length: Optional[int] = None, max_new_tokens: int = 64,
                  stop: Sequence[str] = (FEWSHOT_DELIMITER,), metric_names: Optional[Sequence[str]] = None,
                  progress: bool = True) -> TaskResult:
    """Evaluate a model on a JSONL task file (see the module docstring for the formats)."""
    if task_type not in TASK_TYPES:
        raise ValueError(f"--task-type must be one of {', '.join(TASK_TYPES)}, got {task_type!r}")
    examples = load_task(path, task_type, template=template, labels=labels)
    if task_type == "classification":
        labels = examples[0].choices
    if limit is not None and limit < 1:
        raise ValueError(f"--limit must be >= 1, got {limit}")
    if fewshot_file is not None:
        pool = load_task(fewshot_file, task_type, template=template, labels=labels)
        examples = examples[:limit]
        prompts = fewshot_prompts(examples, shots, pool=pool, seed=seed)
    else:
        # Demonstrations come from the whole file even when --limit shortens the evaluated part.
        prompts = fewshot_prompts(examples, shots, seed=seed)[:limit]
        examples = examples[:limit]
    if task_type in CHOICE_TASKS:
        scores, predicted = evaluate_choices(model, tokenizer, examples, prompts, batch_size=batch_size,
                                             max_length=max_length, progress=progress)
        predictions: list[Any] = [e.choices[i] for e, i in zip(examples, predicted)]
    else:
        predictions = generate_texts(model, tokenizer, prompts, max_new_tokens=max_new_tokens, stop=stop,
                                     batch_size=batch_size, progress=progress)
        names = metric_names or TASK_METRICS[task_type]
        scores = text_metrics.generation_metrics([p.strip() for p in predictions],
                                                 [e.references for e in examples], names)
    return TaskResult(str(path), task_type, len(examples), shots, scores, predictions)
