"""Prompt lookup in the server: a sequence decoding alone drafts from its context; the replies are the
plain ones (greedy tokens, stops, logprobs, streaming), drafts are counted in /metrics, and a batch of
several sequences decodes plainly."""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

from gptforge.config import Config
from gptforge.generate import generate
from gptforge.loading import load, save
from gptforge.model import GPT
from gptforge.serve.app import ServerOptions, create_app
from gptforge.tokenizer import Tokenizer

from serve_helpers import InProcessServer, free_port

CODE = ("def area(width, height):\n    return width * height\n\n"
        "def perimeter(width, height):\n    return 2 * (width + height)\n\n") * 3
PROMPTS = [CODE[:90] + "\ndef perimeter(", "def area(width, height):\n    return", "x = 1\n"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A random model whose blocks write weakly into the residual stream: near a bigram model, so greedy
    decoding loops and drafts get accepted (and some rejected), while attention still reads the cache."""
    torch.manual_seed(0)
    tokenizer = Tokenizer.train_bpe([CODE], vocab_size=300)
    model = GPT(Config.from_name("nano").replace(vocab_size=tokenizer.vocab_size, block_size=128,
                                                       init_std=0.2))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("attn.out.weight", "mlp.down.weight")):
                param.mul_(0.3)
    path = tmp_path_factory.mktemp("lookup") / "loopy"
    save(path, model, tokenizer)
    return path


@pytest.fixture(scope="module")
def base(model_dir):
    options = ServerOptions(model_name="loopy", prompt_lookup=6, log_json=False, prefix_cache_mb=0)
    with InProcessServer(create_app(lambda: load(model_dir), options), free_port()) as srv:
        yield srv.base


def complete(base: str, prompt: str, **fields) -> dict:
    r = httpx.post(f"{base}/v1/completions", json={"model": "loopy", "prompt": prompt, "temperature": 0,
                                                   **fields}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def counters(base: str) -> tuple[float, float]:
    text = httpx.get(f"{base}/metrics", timeout=10).text
    value = {name: float(re.search(rf"^{name}_total (\S+)$", text, re.M).group(1))
             for name in ("gptforge_draft_tokens", "gptforge_accepted_draft_tokens")}
    return value["gptforge_draft_tokens"], value["gptforge_accepted_draft_tokens"]


def test_greedy_replies_are_the_plain_ones_and_drafts_are_kept(base, model_dir):
    model, tokenizer = load(model_dir)
    before = counters(base)
    for prompt in PROMPTS:
        for max_tokens in (1, 7, 23, 60):  # budgets ending inside accepted drafts
            fast = complete(base, prompt, max_tokens=max_tokens)["choices"][0]
            plain = complete(base, prompt, max_tokens=max_tokens, prompt_lookup_num_tokens=0)["choices"][0]
            assert fast["text"] == plain["text"] and fast["finish_reason"] == plain["finish_reason"]
        want = generate(model, prompt, tokenizer, max_new_tokens=60, temperature=0, token_healing=False)[0]
        assert plain["text"] == want.text
    drafted, accepted = (a - b for a, b in zip(counters(base), before))
    assert drafted > accepted > 20  # many tokens came from drafts, and some drafts were rejected


def test_stop_strings_logprobs_and_streaming_match_plain_decoding(base):
    prompt = PROMPTS[0]
    plain = complete(base, prompt, max_tokens=60, prompt_lookup_num_tokens=0, logprobs=2)["choices"][0]
    fast = complete(base, prompt, max_tokens=60, logprobs=2)["choices"][0]
    assert fast["text"] == plain["text"]
    assert fast["logprobs"]["tokens"] == plain["logprobs"]["tokens"]
    assert fast["logprobs"]["token_logprobs"] == pytest.approx(plain["logprobs"]["token_logprobs"], abs=1e-4)
    stop = plain["text"][25:29]  # a stop string that lands inside a multi-token step
    cut = complete(base, prompt, max_tokens=60, stop=[stop])["choices"][0]
    assert cut["text"] == plain["text"][:plain["text"].index(stop)] and cut["finish_reason"] == "stop"
    with httpx.stream("POST", f"{base}/v1/completions", timeout=60,
                      json={"model": "loopy", "prompt": prompt, "max_tokens": 60, "temperature": 0,
                            "stream": True}) as r:
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    assert "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1]) == plain["text"]


def test_sampled_replies_follow_the_seed_and_a_batch_decodes_plainly(base):
    prompt = PROMPTS[0]
    a = complete(base, prompt, max_tokens=40, temperature=0.8, seed=7)["choices"][0]["text"]
    b = complete(base, prompt, max_tokens=40, temperature=0.8, seed=7)["choices"][0]["text"]
    assert a == b and a
    solo = [complete(base, p, max_tokens=40)["choices"][0]["text"] for p in PROMPTS]
    with ThreadPoolExecutor(len(PROMPTS)) as pool:  # several at once: batched plain steps, the same replies
        together = list(pool.map(lambda p: complete(base, p, max_tokens=40)["choices"][0]["text"], PROMPTS))
    assert together == solo


@pytest.mark.parametrize("field,value", [("prompt_lookup_num_tokens", -1), ("prompt_lookup_num_tokens", 1000),
                                         ("max_matching_ngram_size", 0)])
def test_bad_lookup_parameters_are_400s_naming_them(base, field, value):
    r = httpx.post(f"{base}/v1/completions", json={"model": "loopy", "prompt": "x", field: value}, timeout=30)
    assert r.status_code == 400 and field in r.text


def test_the_official_client_takes_the_request_fields(base):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused")
    fast = client.completions.create(model="loopy", prompt=PROMPTS[0], max_tokens=30, temperature=0)
    plain = client.completions.create(model="loopy", prompt=PROMPTS[0], max_tokens=30, temperature=0,
                                      extra_body={"prompt_lookup_num_tokens": 0})
    assert fast.choices[0].text == plain.choices[0].text
    with pytest.raises(openai.BadRequestError, match="max_matching_ngram_size"):
        client.completions.create(model="loopy", prompt="x", extra_body={"max_matching_ngram_size": 99})


@pytest.mark.parametrize("flag,value", [("--prompt-lookup", "-1"), ("--prompt-lookup-ngram", "0")])
def test_bad_cli_flags_are_one_line_errors(model_dir, flag, value):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "gptforge.cli", "serve", "--model", str(model_dir), flag, value],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and f"{flag} must be in" in proc.stderr
