"""Fixtures for compression tests."""

from __future__ import annotations

import pytest

from compress_helpers import tiny_tokenizer, train_tiny
from gptforge.loading import save


@pytest.fixture(scope="session")
def trained_dirs(tmp_path_factory) -> dict[str, str]:
    """{'gpt2': dir, 'llama': dir} of saved tiny trained models with tokenizers."""
    root = tmp_path_factory.mktemp("compress-models")
    out = {}
    for family in ("gpt2", "llama"):
        model = train_tiny(family)
        out[family] = str(save(root / family, model, tiny_tokenizer()))
    return out
