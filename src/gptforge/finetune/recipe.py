"""The fine-tuning recipe: one YAML file (or dict) with dotted CLI overrides, checked into dataclasses.

    model: runs/stdlib/model          # a gptforge / Hugging Face model folder
    out_dir: runs/docstrings
    method: lora                      # full | lora
    objective: sft                    # sft | dpo | orpo (preference pairs: prompt, chosen, rejected)
    preference: {beta: 0.1, loss: sigmoid, label_smoothing: 0.0}   # dpo / orpo settings
    head: lm                          # lm (verbalizer: the label is generated) | classification (linear head)
    tasks:                            # one or more datasets; several make a multi-task run
      - {name: sorted, data: train.jsonl, val_data: val.jsonl, format: classification, labels: [yes, no]}
    data: {max_len: 256, batch_size: 16, mixing: weights, temperature: 1.0, packing: false}
    lora: {r: 8, alpha: 16, dropout: 0.05, target_modules: [attn.qkv, attn.out]}
    augment: {deletion: 0.1, swap: 0.05, synonym: 0.2, synonyms: {movie: [film]}}
    dropout: 0.1                      # overrides the model's residual/MLP dropout for this run
    train: {max_steps: 300, lr: 1e-4, eval_every: 50, early_stopping_patience: 3}   # gptforge.train.loop
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Sequence

from ..config import ConfigError, ConfigSource, apply_overrides, dataclass_from_dict, load_yaml
from ..data.augment import AugmentConfig
from ..data.sft import BASIC_FORMATS
from ..data.templates import TASK_FIELDS
from .lora import LoRAConfig
from .preference import OBJECTIVES, PreferenceSettings

_TASK_OVERRIDE = re.compile(r"^tasks\.(\d+)\.(.+=.*)$", re.S)  # --tasks.0.metric=rougeL
FORMATS = ("auto",) + BASIC_FORMATS + tuple(TASK_FIELDS) + ("preference",)
METRICS = ("auto", "none", "accuracy", "exact_match", "f1", "bleu", "chrf", "rouge1", "rouge2", "rougeL")


@dataclass
class TaskRecipe:
    """One dataset of the run, its format/prompt and how it is validated."""

    data: str = ""  # training file (JSONL/JSON/CSV/Parquet, or hf:NAME[:SPLIT])
    name: str = ""  # default: the file's stem
    val_data: Optional[str] = None  # validation file; None holds out `val_fraction` of `data`
    test_data: Optional[str] = None  # scored once after training (eval.json)
    val_fraction: float = 0.1
    format: str = "auto"
    weight: float = 1.0  # sampling weight in a multi-task run
    prompt: Optional[str] = None  # task prompt template ({field} placeholders); None = the task's default
    labels: Optional[list] = None  # classification: allowed labels; None = the labels seen in the data
    source_lang: str = "English"
    target_lang: str = "French"
    metric: str = "auto"  # validation metric besides val_loss (auto: by format, see tasks.DEFAULT_METRIC)
    baseline: Optional[str] = None  # a record field used as a trivial prediction (e.g. `name`), scored on test
    max_eval_examples: int = 64  # per evaluation; 0 = all
    max_test_examples: int = 0  # test records scored after training (an evenly spread subset); 0 = all
    max_new_tokens: int = 32  # generated tokens for generative metrics
    stop: list[str] = field(default_factory=lambda: ["\n"])  # stop strings for generative metrics

    def validate(self, where: str) -> None:
        """Raise ConfigError naming the field when a value is invalid."""
        if not self.data:
            raise ConfigError(f"{where}.data: a training file is required")
        if self.format not in FORMATS:
            raise ConfigError(f"{where}.format must be one of {list(FORMATS)}, got {self.format!r}")
        if self.metric not in METRICS:
            raise ConfigError(f"{where}.metric must be one of {list(METRICS)}, got {self.metric!r}")
        if not (isinstance(self.weight, (int, float)) and self.weight > 0):
            raise ConfigError(f"{where}.weight must be a positive number, got {self.weight!r}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"{where}.val_fraction must be in [0, 1), got {self.val_fraction!r}")
        if self.labels is not None and (not isinstance(self.labels, list) or not self.labels):
            raise ConfigError(f"{where}.labels must be a non-empty list, got {self.labels!r}")


@dataclass
class DataSettings:
    """Tokenization, batching and multi-task mixing."""

    max_len: int = 512  # tokens per example (clamped to the model's block_size)
    batch_size: int = 8  # examples (or packed rows) per micro-batch
    packing: bool = False  # concatenate short examples into rows of max_len tokens
    mixing: str = "weights"  # weights: p_i ~ weight_i | temperature: p_i ~ weight_i * n_i^(1/T)
    temperature: float = 1.0
    seed: int = 0
    eval_batch_size: int = 16

    def validate(self) -> None:
        """Raise ConfigError naming the field when a value is invalid."""
        for name in ("max_len", "batch_size", "eval_batch_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 2:
                raise ConfigError(f"data.{name} must be an integer >= 2, got {getattr(self, name)!r}")
        if self.mixing not in ("weights", "temperature"):
            raise ConfigError(f"data.mixing must be 'weights' or 'temperature', got {self.mixing!r}")
        if not self.temperature > 0:
            raise ConfigError(f"data.temperature must be positive, got {self.temperature!r}")


@dataclass
class FinetuneRecipe:
    """Everything `gptforge finetune` needs."""

    model: str = ""
    out_dir: str = "runs/finetune"
    method: Literal["full", "lora"] = "full"  # train every weight, or LoRA adapters only
    objective: Literal["sft", "dpo", "orpo"] = "sft"  # sft (targets) | dpo | orpo (preference pairs; finetune/preference.py)
    head: Literal["lm", "classification"] = "lm"  # lm: the label is generated; classification: a linear head
    merge: bool = False  # LoRA: also write merged/ (a plain model with the adapter folded in)
    dropout: Optional[float] = None
    attn_dropout: Optional[float] = None
    tasks: list[TaskRecipe] = field(default_factory=list)
    data: DataSettings = field(default_factory=DataSettings)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    preference: PreferenceSettings = field(default_factory=PreferenceSettings)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    train: Any = None  # gptforge.train.loop.TrainConfig

    def validate(self) -> None:
        """Raise ConfigError naming the field when the recipe is inconsistent."""
        if not self.model:
            raise ConfigError("recipe field 'model' (or --model) is required: a model folder to fine-tune")
        if self.method not in ("full", "lora"):
            raise ConfigError(f"recipe field 'method' must be 'full' or 'lora', got {self.method!r}")
        if self.head not in ("lm", "classification"):
            raise ConfigError(f"recipe field 'head' must be 'lm' or 'classification', got {self.head!r}")
        if not self.tasks:
            raise ConfigError("no training data: give --data FILE[,FILE..] or a 'tasks' list in the recipe")
        names = [t.name for t in self.tasks]
        if len(set(names)) != len(names):
            raise ConfigError(f"tasks must have distinct names, got {names}")
        for i, task in enumerate(self.tasks):
            task.validate(f"tasks[{i}]")
        if self.head == "classification" and (len(self.tasks) != 1 or self.tasks[0].format
                                              not in ("auto", "classification", "sentiment")):
            raise ConfigError("head: classification needs exactly one classification/sentiment task")
        if self.head == "classification" and self.data.packing:
            raise ConfigError("data.packing cannot be combined with head: classification (one label per row)")
        for name in ("dropout", "attn_dropout"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value < 1.0:
                raise ConfigError(f"recipe field {name!r} must be in [0, 1), got {value!r}")
        self._validate_objective()
        self.data.validate()
        if self.method == "lora":
            self.lora.validate()
        self.augment.validate()
        self.train.validate()


    def _validate_objective(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ConfigError(f"recipe field 'objective' must be one of {list(OBJECTIVES)}, got {self.objective!r}")
        if self.objective == "sft":
            if any(t.format == "preference" for t in self.tasks):
                raise ConfigError("format: preference (prompt/chosen/rejected pairs) needs objective: dpo or orpo")
            return
        where = f"objective: {self.objective}"
        if len(self.tasks) != 1:
            raise ConfigError(f"{where} trains on one preference dataset; the recipe has {len(self.tasks)} tasks")
        if self.tasks[0].format not in ("auto", "preference"):
            raise ConfigError(f"{where} reads prompt/chosen/rejected pairs; tasks[0].format is "
                              f"{self.tasks[0].format!r} (use auto or preference)")
        if self.head != "lm":
            raise ConfigError(f"{where} needs head: lm")
        if self.data.packing:
            raise ConfigError(f"{where} cannot pack rows (each row is one answer); set data.packing: false")
        if self.augment.active:
            raise ConfigError(f"{where} does not augment pairs; remove the augment section")
        self.preference.validate(self.objective)


def recipe_from_dict(data: dict[str, Any], source: str | ConfigSource = "recipe") -> FinetuneRecipe:
    """Build and validate a FinetuneRecipe; wrong types and unknown keys are errors naming the field."""
    from ..train.loop import TrainConfig

    source = ConfigSource.of_file(source)
    data = copy.deepcopy(data)
    tasks_raw = data.pop("tasks", None) or []
    if not isinstance(tasks_raw, list):
        raise ConfigError(f"{source.of('tasks')}: tasks must be a list of task mappings, got {tasks_raw!r}")
    tasks = []
    for i, raw in enumerate(tasks_raw):
        task = dataclass_from_dict(TaskRecipe, raw, source, f"tasks[{i}].")
        task.name = task.name or Path(str(task.data)).stem or f"task{i}"
        tasks.append(task)
    sections = {"data": DataSettings, "lora": LoRAConfig, "preference": PreferenceSettings, "augment": AugmentConfig, "train": TrainConfig}
    built = {name: dataclass_from_dict(cls, data.pop(name, None) or {}, source, f"{name}.")
             for name, cls in sections.items()}
    recipe = dataclass_from_dict(FinetuneRecipe, {**data, "tasks": tasks, **built}, source)
    try:
        recipe.validate()
    except ValueError as exc:  # ConfigError, and TrainConfig's ValueError
        raise ConfigError(f"{source.file}: {exc}") from None
    return recipe


def load_recipe(path: Optional[str | Path] = None, overrides: Sequence[str] = (), *,
                model: Optional[str] = None, data_files: Optional[Sequence[str]] = None,
                out_dir: Optional[str] = None, method: Optional[str] = None,
                objective: Optional[str] = None) -> FinetuneRecipe:
    """A recipe from YAML (optional), command-line values and `section.key=value` overrides."""
    raw: dict[str, Any] = load_yaml(path) if path else {}
    source = ConfigSource(str(path) if path else "finetune")
    flags = (("model", model, "--model"), ("out_dir", out_dir, "--out"), ("method", method, "--method"),
             ("objective", objective, "--objective"))
    for name, value, flag in flags:
        if value:
            raw[name] = value
            source.overrides[name] = f"{flag} {value}"
    if data_files:
        tasks = raw.get("tasks") or []
        if tasks and len(tasks) != len(data_files):
            raise ConfigError(f"--data names {len(data_files)} file(s) but {source.file} has {len(tasks)} task(s); "
                              "give one file per task, in order")
        raw["tasks"] = [{**(tasks[i] if tasks else {}), "data": f} for i, f in enumerate(data_files)]
    plain = []
    for item in overrides:
        match = _TASK_OVERRIDE.match(item.lstrip("-"))
        if match is None:
            plain.append(item)
            continue
        index, rest = int(match.group(1)), match.group(2)
        tasks = raw.get("tasks") or []
        if index >= len(tasks):
            raise ConfigError(f"command line ({item}): there is no tasks[{index}] (the run has {len(tasks)} task(s))")
        if not isinstance(tasks[index], dict):
            raise ConfigError(f"{source.file}: tasks[{index}] must be a mapping of field: value, got {tasks[index]!r}")
        apply_overrides(tasks[index], [rest])
        source.overrides[f"tasks.{index}.{rest.split('=', 1)[0]}"] = item
    apply_overrides(raw, plain, source)
    return recipe_from_dict(raw, source)


__all__ = ["TaskRecipe", "DataSettings", "FinetuneRecipe", "recipe_from_dict", "load_recipe", "FORMATS", "METRICS"]
