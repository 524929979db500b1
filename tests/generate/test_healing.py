"""Token healing: the model re-chooses the prompt's last token; the prompt text is never changed."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gptforge.config import Config
from gptforge.generate import generate, stream
from gptforge.healing import heal_prompt
from gptforge.model import GPT
from gptforge.tokenizer import Tokenizer

CODE = ["def add(a, b):\n    return a + b\n", "    return self.value\n", "for item in items:\n    print(item)\n",
        "import os\nimport sys\n", "class Point:\n    def __init__(self, x):\n        self.x = x\n"] * 30


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.train_bpe(CODE, vocab_size=400)


@pytest.fixture(scope="module")
def model(tokenizer):
    torch.manual_seed(0)
    return GPT(Config.from_name("llama-nano", vocab_size=tokenizer.vocab_size, block_size=64, init_std=0.3)).eval()


def test_heal_removes_the_last_token_and_allows_exactly_its_extensions(tokenizer):
    ids = tokenizer.encode("    return ")
    healed = heal_prompt(tokenizer, ids)
    assert healed is not None and healed.prompt_ids == ids[:-1] and healed.hidden_text == tokenizer.decode(ids[-1:])
    allowed = healed.constraint().allowed(8).nonzero().flatten().tolist()
    table = tokenizer.token_bytes()
    assert ids[-1] in allowed and len(allowed) >= 2
    for t in allowed:  # every allowed token extends the removed bytes, or is a prefix of them
        assert table[t].startswith(healed.removed) or healed.removed.startswith(table[t])
    for t, piece in enumerate(table):  # and every such token is allowed
        if piece and t not in tokenizer.special_ids and (piece.startswith(healed.removed)
                                                          or healed.removed.startswith(piece)):
            assert t in allowed


def test_no_healing_where_it_cannot_apply(tokenizer):
    assert heal_prompt(tokenizer, tokenizer.encode("def")[:1]) is None  # one token: nothing would remain
    eos = tokenizer.eos_token_id
    assert heal_prompt(tokenizer, tokenizer.encode("def add") + [eos]) is None  # special last token
    char = Tokenizer.train_char(["abc"])
    assert heal_prompt(char, char.encode("abc")) is None  # not byte-level


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(text=st.text(alphabet="def return self.x(a, b):\n    " + "é🙂", min_size=2, max_size=24),
       seed=st.integers(0, 1000))
def test_healing_never_changes_the_prompt_text(model, tokenizer, text, seed):
    """The generated tokens re-spell the removed bytes; the text returned starts right after the prompt."""
    out = generate(model, text, tokenizer, max_new_tokens=6, do_sample=True, temperature=1.5, seed=seed,
                   eos_token_id=[], skip_special_tokens=False)[0]
    full = tokenizer.decode(out.prompt_token_ids + out.token_ids)
    assert full == text + out.text
    assert "".join(stream(model, text, tokenizer, max_new_tokens=6, do_sample=True, temperature=1.5, seed=seed,
                          eos_token_id=[], skip_special_tokens=False)) == out.text


def test_healing_can_be_turned_off_and_id_prompts_are_used_as_given(model, tokenizer):
    ids = tokenizer.encode("    return ")
    healed = generate(model, "    return ", tokenizer, max_new_tokens=4, eos_token_id=[])[0]
    plain = generate(model, "    return ", tokenizer, max_new_tokens=4, eos_token_id=[], token_healing=False)[0]
    given = generate(model, ids, tokenizer, max_new_tokens=4, eos_token_id=[])[0]
    assert healed.prompt_token_ids == ids[:-1]
    assert plain.prompt_token_ids == ids and given.prompt_token_ids == ids
    assert plain.token_ids == given.token_ids
