"""Fixtures for the fine-tuning tests: a tiny char-level model folder."""

import pytest

from finetune_helpers import char_tokenizer
from gptforge.model import GPT
from gptforge.tokenizer import Tokenizer
from gptforge.loading import save


@pytest.fixture(scope="session")
def tokenizer() -> Tokenizer:
    return char_tokenizer()


@pytest.fixture
def base_model(tmp_path, tokenizer):
    """A tiny random GPT-2-style model folder with a char tokenizer."""
    model = GPT.from_config("nano", vocab_size=tokenizer.vocab_size, block_size=48, n_layer=2, n_head=2, n_embd=64)
    path = tmp_path / "base"
    save(path, model, tokenizer)
    return path
