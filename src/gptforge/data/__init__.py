"""Data: corpora (`corpus`), token shards (`shards.prepare_corpus`) and pretraining batches (`loader`).

Submodules are imported on use, so `gptforge.data.sft` and friends load without the rest.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {"prepare_corpus": "shards", "PreparedCorpus": "shards", "load_prepared": "shards",
            "iter_documents": "corpus", "CorpusError": "corpus", "TokenWindowLoader": "loader"}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = list(_EXPORTS)
