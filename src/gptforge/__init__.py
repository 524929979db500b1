"""gptforge: train, adapt, evaluate and serve GPT-style language models."""

from .config import Config, ConfigError, PRESETS
from .model import GPT, KVCache
from .tokenizer import Tokenizer

__version__ = "0.1.0"

__all__ = ["GPT", "Config", "ConfigError", "KVCache", "PRESETS", "Tokenizer", "__version__"]
