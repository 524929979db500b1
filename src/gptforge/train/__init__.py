"""Training: the one loop (`loop.train`; its parts in state, checkpointing, budget), schedules, AdamW, distributed
wrappers and the pretraining recipe.

Submodules are imported on use, so importing one does not pull in the rest.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {"TrainConfig": "loop", "TrainResult": "loop", "train": "loop", "TrainState": "state",
            "pretrain": "pretrain", "Recipe": "pretrain", "load_recipe": "pretrain"}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = list(_EXPORTS)
