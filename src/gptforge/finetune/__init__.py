"""Fine-tuning: recipes, multi-task mixing, per-task validation, classification head, docstring task.

Submodules are imported on use (`gptforge.finetune.runner.finetune` pulls in the training loop).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {"finetune": "runner", "FinetuneResult": "runner", "load_finetuned": "runner",
            "FinetuneRecipe": "recipe", "TaskRecipe": "recipe", "load_recipe": "recipe", "recipe_from_dict": "recipe",
            "MultiTaskSource": "mixture", "mixture_probabilities": "mixture", "TaskEvaluator": "evaluate",
            "SequenceClassifier": "classifier", "extract_docstring_pairs": "docstrings"}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = list(_EXPORTS)
