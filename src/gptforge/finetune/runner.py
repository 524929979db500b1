"""`finetune(recipe)`: load the model, build the tasks, attach LoRA / a classification head, run the shared
training loop (`gptforge.train.loop.train`), then score the test splits and write `eval.json`."""

from __future__ import annotations

import dataclasses
import json
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn as nn

from ..atomic import atomic_write_text
from ..config import ConfigError
from ..data.sft import BASIC_FORMATS, DataError, Record, read_records, render_segments, resolve_format
from ..data.templates import DEFAULT_METRIC, TaskTemplate, infer_labels
from ..fim import fim_prompt_format
from ..loading import load, load_model, load_tokenizer, save
from ..model import GPT
from ..tokenizer import Tokenizer
from .lora import apply_lora, load_lora, merge_lora, save_lora, trainable_parameters
from .classifier import SequenceClassifier
from .evaluate import TaskEvaluator
from .mixture import MultiTaskSource, TaskData, mixture_probabilities
from .recipe import FinetuneRecipe, TaskRecipe

log = logging.getLogger(__name__)


@dataclass
class FinetuneResult:
    """What a fine-tuning run produced."""

    out_dir: Path
    model_dir: Optional[Path]  # final weights (or adapter)
    best_dir: Optional[Path]  # best by the early-stopping metric
    merged_dir: Optional[Path]  # LoRA with merge: a plain model
    steps: int
    stopped_early: bool
    val: dict[str, float] = field(default_factory=dict)  # last validation metrics
    test: dict[str, Any] = field(default_factory=dict)  # per task: test metrics and baseline
    train_result: Any = None
    before: dict[str, float] = field(default_factory=dict)  # preference tuning: held-out metrics before training


# ---- tasks -------------------------------------------------------------------------------------------

def _split_records(records: list[Record], fraction: float, seed: int) -> tuple[list[Record], list[Record]]:
    """Deterministic hold-out of `fraction` of the records (at least one when fraction > 0)."""
    if fraction <= 0 or len(records) < 2:
        return records, []
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    n_val = max(1, int(round(len(records) * fraction)))
    val_idx = set(order[:n_val])
    return [r for i, r in enumerate(records) if i not in val_idx], [records[i] for i in sorted(val_idx)]


def build_task(spec: TaskRecipe, tokenizer: Any, *, seed: int = 0, classification_head: bool = False) -> TaskData:
    """Read a task's files, resolve its format, template and metric, and check every record up front."""
    train_records = read_records(spec.data)
    fmt = resolve_format(train_records, spec.format)
    if spec.val_data:
        val_records = read_records(spec.val_data)
    else:
        train_records, val_records = _split_records(train_records, spec.val_fraction, seed)
    test_records = read_records(spec.test_data) if spec.test_data else []
    if spec.max_test_examples and len(test_records) > spec.max_test_examples:
        stride = len(test_records) / spec.max_test_examples  # evenly spread: every module keeps a share
        test_records = [test_records[int(i * stride)] for i in range(spec.max_test_examples)]
    template = None
    if fmt in BASIC_FORMATS:
        if classification_head:
            raise ConfigError(f"task {spec.name!r}: head: classification needs a classification task, not {fmt!r}")

        def render(record: Record) -> list:
            return render_segments(record, fmt, tokenizer)
    else:
        labels = spec.labels
        if fmt in ("classification",) and labels is None:
            labels = infer_labels(train_records)
        template = TaskTemplate(fmt, prompt=spec.prompt, labels=labels, source_lang=spec.source_lang,
                                target_lang=spec.target_lang,
                                fim_prompt=fim_prompt_format(tokenizer) if fmt == "code" else None)
        render = template.segments
    metric = DEFAULT_METRIC.get(fmt) if spec.metric == "auto" else (None if spec.metric == "none" else spec.metric)
    if metric == "accuracy" and (template is None or template.labels is None):
        raise ConfigError(f"task {spec.name!r}: metric 'accuracy' needs a classification task with labels")
    task = TaskData(name=spec.name, fmt=fmt, render=render, train=train_records, val=val_records, test=test_records,
                    template=template, metric=metric, weight=spec.weight, max_new_tokens=spec.max_new_tokens,
                    stop=list(spec.stop), baseline=spec.baseline)
    if classification_head:
        task.class_ids = {label: i for i, label in enumerate(template.labels)}
    for record in train_records + val_records + test_records:
        render(record)  # raises DataError naming file, line and field; before any training starts
    if not train_records:
        raise DataError(f"{spec.data}: no training records left after holding out validation data")
    return task


# ---- model setup -------------------------------------------------------------------------------------

def set_dropout(model: GPT, dropout: Optional[float], attn_dropout: Optional[float]) -> None:
    """Override the residual/MLP and attention dropout of a loaded model for this run."""
    if dropout is not None:
        model.config.dropout = float(dropout)
        for block in model.blocks:
            block.drop.p = float(dropout)
    if attn_dropout is not None:
        model.config.attn_dropout = float(attn_dropout)  # read by Attention.forward at each call


def _saver(recipe: FinetuneRecipe, tokenizer: Tokenizer) -> Callable[[nn.Module, Path], None]:
    """How the loop writes model folders: the full model, or adapters for LoRA; plus the head for classifiers."""
    def write(model: nn.Module, directory: Path) -> None:
        body = model.body if isinstance(model, SequenceClassifier) else model
        if recipe.method == "full":
            save(directory, body, tokenizer)
        else:
            save_lora(body, directory, base_model=str(recipe.model))
            tokenizer.save(directory)
        if isinstance(model, SequenceClassifier):
            model.save_head(directory)

    return write


def _restore_best(model: nn.Module, recipe: FinetuneRecipe, best_dir: Path) -> None:
    """Load the best checkpoint's weights back into the in-memory model (for test scoring and merging)."""
    body = model.body if isinstance(model, SequenceClassifier) else model
    if recipe.method == "lora":
        load_lora(body, best_dir)
    else:
        best = load_model(best_dir)
        body.load_state_dict(best.state_dict())
    if isinstance(model, SequenceClassifier):
        model.load_head(best_dir)


# ---- the run -----------------------------------------------------------------------------------------

def finetune(recipe: FinetuneRecipe, *, resume: bool = False) -> FinetuneResult:
    """Fine-tune `recipe.model` on `recipe.tasks` and write the run folder `recipe.out_dir`."""
    from ..train.loop import train

    recipe.validate()
    body, tokenizer = load(recipe.model)
    if tokenizer is None:
        raise ConfigError(f"{recipe.model}: the model folder has no tokenizer.json; fine-tuning needs its tokenizer")
    if recipe.objective != "sft":
        return _finetune_preference(recipe, body, tokenizer, resume)
    classification = recipe.head == "classification"
    tasks = [build_task(spec, tokenizer, seed=recipe.data.seed, classification_head=classification)
             for spec in recipe.tasks]
    if any(t.fmt == "chat" for t in tasks) and not tokenizer.chat_template:
        # Trained on the default (ChatML) rendering: say so in the saved tokenizer, so `gptforge chat`
        # and the server know the model follows turns (a tokenizer without a template marks a base model).
        from ..tokenizer import CHATML_TEMPLATE

        tokenizer.chat_template = CHATML_TEMPLATE
    max_len = min(recipe.data.max_len, body.config.block_size)
    set_dropout(body, recipe.dropout, recipe.attn_dropout)
    if recipe.method == "lora":
        apply_lora(body, recipe.lora)
    model: nn.Module = SequenceClassifier(body, tasks[0].template.labels) if classification else body
    trainable, total = trainable_parameters(model)
    probabilities = mixture_probabilities([len(t.train) for t in tasks], [t.weight for t in tasks],
                                          recipe.data.mixing, recipe.data.temperature)
    log.info("fine-tuning %s (%s, %s head): %d of %d parameters trainable; tasks %s", recipe.model, recipe.method,
             recipe.head, trainable, total,
             ", ".join(f"{t.name} ({len(t.train)} train, {len(t.val)} val, p={p:.2f})"
                       for t, p in zip(tasks, probabilities)))
    source = MultiTaskSource(tasks, tokenizer, batch_size=recipe.data.batch_size, max_len=max_len,
                             probabilities=probabilities, seed=recipe.data.seed, packing=recipe.data.packing,
                             augment=recipe.augment, classification=classification)
    evaluator = TaskEvaluator(tasks, tokenizer, max_len=max_len, batch_size=recipe.data.eval_batch_size,
                              max_examples=max(t.max_eval_examples for t in recipe.tasks),
                              classification=classification)
    has_val = any(t.val for t in tasks)
    out_dir = Path(recipe.out_dir)
    result = train(model, recipe.train, source, out_dir, evaluate=evaluator if has_val else None,
                   save_model=_saver(recipe, tokenizer), resume=resume, run_config=_jsonable(recipe))

    best_dir = result.best_dir if result.best_dir and Path(result.best_dir).is_dir() else None
    if best_dir is not None and result.best_step != result.steps:
        _restore_best(model, recipe, best_dir)
    model.eval()
    report: dict[str, Any] = {"steps": result.steps, "stopped_early": result.stopped_early,
                              "best_step": result.best_step, "best_metric": result.best_metric,
                              "val": result.metrics, "tasks": {}}
    with torch.no_grad():
        test_metrics = evaluator.evaluate(model, "test") if any(t.test for t in tasks) else {}
    for task in tasks:
        entry: dict[str, Any] = {"train_examples": len(task.train), "val_examples": len(task.val),
                                 "test_examples": len(task.test), "metric": task.metric,
                                 "drawn": source.drawn[tasks.index(task)]}
        if task.test:
            entry["test"] = {k.split("/", 1)[1]: v for k, v in test_metrics.items() if k.startswith(task.name + "/")}
            baseline = evaluator.baseline(task, "test")
            if baseline is not None:
                entry["baseline"] = {"prediction": f"record field {task.baseline!r}", **baseline}
        report["tasks"][task.name] = entry
    return _finish(recipe, tokenizer, body, out_dir, result, best_dir, report, test=report["tasks"])


def _finetune_preference(recipe: FinetuneRecipe, body: GPT, tokenizer: Tokenizer, resume: bool) -> FinetuneResult:
    """DPO / ORPO on prompt/chosen/rejected pairs (see finetune/preference.py); eval.json has before and after."""
    from ..data.preference import encode_pair, is_chat_record
    from ..train.loop import train
    from .preference import PairSource, PreferenceEvaluator, PreferenceObjective, ReferenceModel, plot_reward_margin

    spec = recipe.tasks[0]
    records = read_records(spec.data)
    if spec.val_data:
        train_records, val_records = records, read_records(spec.val_data)
    else:
        train_records, val_records = _split_records(records, spec.val_fraction, recipe.data.seed)
    if not train_records:
        raise DataError(f"{spec.data}: no training pairs left after holding out validation pairs")
    if any(is_chat_record(r) for r in records) and not tokenizer.chat_template:
        from ..tokenizer import CHATML_TEMPLATE

        tokenizer.chat_template = CHATML_TEMPLATE  # as for chat SFT: the saved model says it follows turns
    max_len = min(recipe.data.max_len, body.config.block_size)
    for record in train_records + val_records:
        encode_pair(record, tokenizer, max_len)  # DataError naming file, line and field, before training
    set_dropout(body, recipe.dropout, recipe.attn_dropout)
    if recipe.method == "lora":
        apply_lora(body, recipe.lora)
    # The reference is the starting model (a resumed run reloads it from recipe.model, never a checkpoint).
    reference = ReferenceModel(body) if recipe.objective == "dpo" else None
    objective = PreferenceObjective(recipe.objective, recipe.preference, reference)
    source = PairSource(train_records, tokenizer, batch_size=recipe.data.batch_size, max_len=max_len,
                        seed=recipe.data.seed)
    evaluator = PreferenceEvaluator(val_records, tokenizer, objective, max_len=max_len,
                                    batch_size=recipe.data.eval_batch_size) if val_records else None
    before = _evaluate_now(body, evaluator)
    log.info("%s on %s (%s): %d train pairs, %d held-out pairs, beta %g", recipe.objective, recipe.model,
             recipe.method, len(train_records), len(val_records), recipe.preference.beta)
    out_dir = Path(recipe.out_dir)
    result = train(body, recipe.train, source, out_dir, evaluate=evaluator, save_model=_saver(recipe, tokenizer),
                   resume=resume, run_config=_jsonable(recipe), objective=objective)
    plot_reward_margin(out_dir / "metrics.jsonl", out_dir / "reward_margin.png",
                       title=f"{out_dir.name}: {recipe.objective} reward margin")
    best_dir = result.best_dir if result.best_dir and Path(result.best_dir).is_dir() else None
    report: dict[str, Any] = {"objective": recipe.objective, "steps": result.steps,
                              "stopped_early": result.stopped_early, "best_step": result.best_step,
                              "best_metric": result.best_metric, "train_pairs": len(train_records),
                              "val_pairs": len(val_records), "before": before, "val": result.metrics,
                              "reward_margin_png": str(out_dir / "reward_margin.png"), "tasks": {}}
    return _finish(recipe, tokenizer, body, out_dir, result, best_dir, report, test={}, before=before)


def _evaluate_now(model: nn.Module, evaluator: Optional[Callable[[nn.Module], dict[str, float]]]) -> dict[str, float]:
    """The evaluator's metrics for the model as it is now (eval mode, no grad)."""
    if evaluator is None:
        return {}
    was_training = model.training
    model.eval()
    with torch.no_grad():
        metrics = evaluator(model)
    model.train(was_training)
    return metrics


def _jsonable(recipe: FinetuneRecipe) -> dict[str, Any]:
    return json.loads(json.dumps(dataclasses.asdict(recipe), default=str))


def load_finetuned(directory: str | Path,
                   base_model: Optional[str | Path] = None) -> tuple[nn.Module, Optional[Tokenizer]]:
    """(model, tokenizer) from a run's model/best/merged folder: full model, classifier, or base + adapter."""
    from .lora import ADAPTER_CONFIG_NAME, read_adapter_config

    directory = Path(directory)
    if (directory / ADAPTER_CONFIG_NAME).is_file():
        base = base_model or read_adapter_config(directory).get("base_model_name_or_path")
        if not base:
            raise ConfigError(f"{directory}: adapter without 'base_model_name_or_path'; pass the base model")
        model = load_model(base)
        load_lora(model, directory)
        tokenizer = load_tokenizer(directory) or load_tokenizer(base)
        if (directory / "classifier.json").is_file():
            from .classifier import HEAD_CONFIG_NAME

            labels = json.loads((directory / HEAD_CONFIG_NAME).read_text(encoding="utf-8"))["labels"]
            classifier = SequenceClassifier(model, labels)
            classifier.load_head(directory)
            return classifier.eval(), tokenizer
        return model.eval(), tokenizer
    if (directory / "classifier.json").is_file():
        return SequenceClassifier.from_pretrained(directory), load_tokenizer(directory)
    return load(directory)


def _finish(recipe: FinetuneRecipe, tokenizer: Any, body: nn.Module, out_dir: Path, result: Any,
            best_dir: Optional[Path], report: dict[str, Any], **extra: Any) -> FinetuneResult:
    """Write merged/ (LoRA with `merge`) and eval.json; the run's FinetuneResult."""
    merged_dir = None
    if recipe.merge and recipe.method == "lora":
        merged_dir = out_dir / "merged"
        merge_lora(body)
        _saver(dataclasses.replace(recipe, method="full"), tokenizer)(body, merged_dir)
        report["merged_dir"] = str(merged_dir)
    atomic_write_text(out_dir / "eval.json", json.dumps(report, indent=2))
    return FinetuneResult(out_dir=out_dir, model_dir=result.model_dir, best_dir=best_dir, merged_dir=merged_dir,
                          steps=result.steps, stopped_early=result.stopped_early, val=result.metrics,
                          train_result=result, **extra)


__all__ = ["finetune", "FinetuneResult", "build_task", "set_dropout", "load_finetuned"]
