"""The OpenAI-compatible server runs every family: concurrent greedy completions (continuous batching over
one KV cache, each request in its own row) equal `gptforge.generate`'s tokens."""

import concurrent.futures
import time

import pytest
import torch

from gptforge.generate import generate
from gptforge.loading import load, save
from gptforge.serve.app import ServerOptions, create_app
from gptforge.tokenizer import Tokenizer
from hf_families import CASES, hf_model

pytest.importorskip("transformers")
TEXT = "the quick brown fox jumps over the lazy dog; pack my box with five dozen liquor jugs. " * 30
PROMPTS = ["the quick brown", "pack my box with", "lazy"]


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.train_bpe([TEXT], 300)


@pytest.mark.parametrize("case", CASES)
def test_server_completions_equal_generate(case, tmp_path, tokenizer):
    from fastapi.testclient import TestClient

    hf_model(case, vocab_size=320).save_pretrained(tmp_path / "hf")
    model, _ = load(tmp_path / "hf")
    # Only word pieces can win the argmax (zero head rows for the rest): the texts compare exactly, no special
    # token ends a sequence early, and a wrong row or position in the server shows as different words.
    words = [i for i in range(tokenizer.vocab_size) if (t := tokenizer.decode([i])) and t.replace(" ", "").isalpha()]
    with torch.no_grad():
        drop = torch.ones(model.config.vocab_size, dtype=torch.bool)
        drop[words] = False
        model.lm_head.weight[drop] = 0
    save(tmp_path / "model", model, tokenizer)
    expected = {p: o.text for p, o in zip(PROMPTS, generate(model, [tokenizer.encode(p) for p in PROMPTS], tokenizer,
                                                            max_new_tokens=12, eos_token_id=[]))}
    app = create_app(lambda: load(tmp_path / "model"), ServerOptions(model_name=case, api_keys=["sk-f"], max_batch=4))
    with TestClient(app) as client:
        deadline = time.monotonic() + 60
        while client.get("/health").status_code != 200:  # the model loads in the background
            assert time.monotonic() < deadline, client.get("/health").text
            time.sleep(0.05)

        def complete(prompt: str) -> list[int]:
            body = {"model": case, "prompt": prompt, "max_tokens": 12, "temperature": 0, "logprobs": 1}
            reply = client.post("/v1/completions", json=body, headers={"Authorization": "Bearer sk-f"})
            assert reply.status_code == 200, reply.text
            choice = reply.json()["choices"][0]
            assert len(choice["logprobs"]["tokens"]) == 12
            return choice["text"]

        with concurrent.futures.ThreadPoolExecutor(3) as pool:  # overlapping requests share decode steps
            got = dict(zip(PROMPTS, pool.map(complete, PROMPTS)))
    assert got == expected and all(len(text) >= 12 for text in got.values())
