"""gptforge: train, adapt, evaluate and serve GPT-style language models.

    import gptforge
    from gptforge.generate import generate

    model, tokenizer = gptforge.load("runs/demo/model")
    print(generate(model, "def fib(n):", tokenizer, max_new_tokens=32)[0].text)

Names that need torch are imported on first use, so `import gptforge` (and the CLI's `--help`) stays fast.
"""

from __future__ import annotations

import importlib
from typing import Any

from .errors import ConfigError, GptforgeError

__version__ = "0.1.0"

# name -> module that defines it (imported lazily by __getattr__; even the config, which needs PyYAML,
# stays out of `gptforge --version` and `--help`)
_LAZY = {
    "Config": "gptforge.config",
    "PRESETS": "gptforge.config",
    "GPT": "gptforge.model",
    "KVCache": "gptforge.model",
    "Tokenizer": "gptforge.tokenizer",
    "load": "gptforge.loading",
    "load_model": "gptforge.loading",
    "load_tokenizer": "gptforge.loading",
    "save": "gptforge.loading",
    "SamplingParams": "gptforge.sampling",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'gptforge' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


__all__ = ["GPT", "Config", "ConfigError", "GptforgeError", "KVCache", "PRESETS", "Tokenizer", "load", "load_model",
           "load_tokenizer", "save", "SamplingParams", "__version__"]
