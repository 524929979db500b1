"""Helpers for compression tests: a tiny model trained for a few seconds, perplexity, greedy decoding."""

from __future__ import annotations

import math
from functools import lru_cache

import torch

from gptforge.config import Config
from gptforge.model import GPT, causal_lm_loss
from gptforge.tokenizer import Tokenizer

TEXT = ("the quick brown fox jumps over the lazy dog. a stitch in time saves nine. "
        "all that glitters is not gold. the early bird catches the worm. ") * 40
HELD_OUT = "the lazy dog jumps over the quick brown fox. all that glitters is not gold. a stitch in time. " * 4


def tiny_config(family: str) -> Config:
    if family == "gpt2":
        return Config.from_name("nano", vocab_size=320, block_size=64, n_embd=64, n_head=4)
    return Config.from_name("llama-nano", vocab_size=320, block_size=64, n_embd=64, n_head=4, n_kv_head=2)


@lru_cache(maxsize=1)
def tiny_tokenizer() -> Tokenizer:
    """The BPE tokenizer of TEXT that every tiny model here uses."""
    return Tokenizer.train_bpe([TEXT], 300)


def train_tiny(family: str, steps: int = 40) -> GPT:
    """A tiny model that has learned TEXT well enough for greedy decoding to be confident."""
    torch.manual_seed(0)
    tokenizer = tiny_tokenizer()
    model = GPT(tiny_config(family))
    ids = torch.tensor(tokenizer.encode(TEXT))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(steps):
        starts = torch.randint(0, ids.numel() - 33, (8,))
        batch = torch.stack([ids[s: s + 33] for s in starts.tolist()])
        loss = causal_lm_loss(model(batch[:, :-1]), batch[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@torch.no_grad()
def perplexity(model: GPT, text: str = HELD_OUT) -> float:
    """exp(mean next-token loss) of `text` in one window."""
    ids = torch.tensor(tiny_tokenizer().encode(text))[None, : model.config.block_size + 1]
    return math.exp(float(causal_lm_loss(model(ids[:, :-1]).float(), ids[:, 1:])))


@torch.no_grad()
def greedy(model: GPT, prompt: list[int], n: int) -> list[int]:
    """Greedy continuation: the generation module when present, else a KV-cache loop."""
    try:
        from gptforge.generate import generate
    except ImportError:
        generate = None
    if generate is not None:
        return list(generate(model, [prompt], max_new_tokens=n, do_sample=False)[0].token_ids)
    model.setup_cache(1, len(prompt) + n)
    try:
        ids = torch.tensor([prompt])
        logits = model(ids, cache_slots=torch.arange(len(prompt)), last_only=True)
        out = []
        for i in range(n):
            token = int(logits[0, -1].argmax())
            out.append(token)
            pos = len(prompt) + i
            logits = model(torch.tensor([[token]]), cache_slots=torch.tensor([pos]))
        return out
    finally:
        model.clear_cache()
