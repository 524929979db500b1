"""A tiny GPT-2-family model with a byte-level BPE tokenizer, saved once per session (HF loads it too)."""

import pytest
import torch

from gptforge import GPT
from gptforge.tokenizer import Tokenizer
from gptforge.loading import save

CORPUS = [
    "The cat sat on the mat. The dog sat on the log. A bird sang in the tree.",
    "Paris is the capital of France. Rome is the capital of Italy. Berlin is in Germany.",
    "One plus one is two. Two plus two is four. Three plus three is six.",
    "Question: what colour is the sky? Answer: blue. Question: what colour is grass? Answer: green.",
    "Les chats dorment. Über den Wolken — naïve café, déjà vu.",
]


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny_model")
    tokenizer = Tokenizer.train_bpe(CORPUS * 20, vocab_size=320)
    torch.manual_seed(1234)
    model = GPT.from_config("nano", vocab_size=tokenizer.vocab_size, block_size=64, n_embd=64, n_head=4)
    with torch.no_grad():
        # Larger-than-init weights make the predictions far from uniform, so choices rarely tie.
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.15)
    save(directory, model, tokenizer)
    return directory


@pytest.fixture(scope="session")
def model_and_tokenizer(model_dir):
    from gptforge.loading import load

    return load(model_dir, device="cpu")
