"""Automatic prefix caching: the store's naming and LRU bound, and, through the official client against
real servers, greedy replies identical with the cache on and off while hits are reported."""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

from gptforge.config import Config
from gptforge.loading import save
from gptforge.model import GPT
from gptforge.serve.app import ServerOptions
from gptforge.serve.prefix_cache import KVBlock, PrefixCache
from gptforge.tokenizer import Tokenizer

from serve_helpers import CORPUS, MODEL_NAME

openai = pytest.importorskip("openai")

KEY = "sk-prefix"
MODEL = MODEL_NAME
SYSTEM = ("You are a careful assistant. Answer briefly and politely; the quick brown fox jumps over the lazy "
          "dog. Once upon a time there was a tiny model that served requests over HTTP.")
QUESTIONS = ["Hello world!", "What is 0123 + 45?", "Tell me about the fox.", "Once upon a time?", "Why?", "{}"]


def block(nbytes_per_tensor: int = 64) -> KVBlock:
    return KVBlock(torch.zeros(nbytes_per_tensor // 4), torch.zeros(nbytes_per_tensor // 4))


def test_digests_name_whole_prefixes():
    cache = PrefixCache(1 << 20, block_tokens=4)
    a = cache.digests(list(range(10)))
    assert len(a) == 2  # full blocks only
    diverging, straight = cache.digests(list(range(8)) + [99, 98, 97, 96]), cache.digests(list(range(12)))
    assert diverging[:2] == straight[:2] == a and diverging[2] != straight[2]
    b = cache.digests([7] + list(range(1, 10)))  # the first token differs: every later block differs too
    assert a[0] != b[0] and a[1] != b[1]
    assert cache.digests(list(range(12)), known=a) == cache.digests(list(range(12)))
    assert cache.digests(list(range(8)), namespace="adapter") != a


def test_lru_eviction_stays_within_the_budget_and_keeps_roots():
    cache = PrefixCache(capacity_bytes=5 * 128, block_tokens=4)  # room for five 128-byte blocks
    chain = cache.digests(list(range(16)))  # 4 blocks
    cache.insert(chain, {d: block() for d in chain})
    other = cache.digests([5] * 16)
    cache.insert(other, {d: block() for d in other})
    assert cache.bytes <= cache.capacity_bytes and len(cache) == 5 and cache.evictions == 3
    assert len(cache.lookup(other)) == 4  # the newest chain is whole
    # The older chain lost its deepest blocks first: what is left of it is still reachable from the root.
    assert len(cache.lookup(chain)) == 1
    cache.insert([], {b"big": block(1024)})  # larger than the whole budget: not kept, nothing evicted
    assert b"big" not in cache and len(cache) == 5


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """Like conftest's model, with a context long enough for a five-turn chat."""
    torch.manual_seed(0)
    tokenizer = Tokenizer.train_bpe(CORPUS * 20, vocab_size=320)
    config = Config(name="tiny", family="llama", vocab_size=tokenizer.vocab_size, block_size=512, n_layer=2,
                    n_head=4, n_embd=64, pos_embedding="rope", norm="rmsnorm", mlp="swiglu", bias=False)
    path = tmp_path_factory.mktemp("serve-prefix") / MODEL_NAME
    save(path, GPT(config), tokenizer)
    return path


def metric(base: str, name: str) -> float:
    text = httpx.get(f"{base}/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    return float(re.search(rf"^{name} (\S+)$", text, re.M).group(1))


@pytest.fixture(scope="module")
def servers(start_server):
    """The same model served with the prefix cache on (default budget) and off."""
    on = start_server(ServerOptions(model_name=MODEL, api_keys=[KEY], max_batch=4))
    off = start_server(ServerOptions(model_name=MODEL, api_keys=[KEY], max_batch=4, prefix_cache_mb=0))
    return on, off


def clients(servers):
    return [openai.OpenAI(base_url=f"{s.base}/v1", api_key=KEY, max_retries=0) for s in servers]


def ask(client, messages, **extra):
    return client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0, **extra)


def test_concurrent_shared_system_prompt_same_greedy_replies(servers):
    with_cache, without = clients(servers)
    hits_before = metric(servers[0].base, "gptforge_prefix_cache_hits_total")
    conversations = [[{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}] for q in QUESTIONS]
    ask(with_cache, conversations[0])  # the system prompt is now cached
    with ThreadPoolExecutor(4) as pool:
        cached = list(pool.map(lambda m: ask(with_cache, m), conversations))
        plain = list(pool.map(lambda m: ask(without, m), conversations))
    assert [r.choices[0].message.content for r in cached] == [r.choices[0].message.content for r in plain]
    assert all(r.usage.prompt_tokens_details.cached_tokens >= 16 for r in cached)
    assert all(r.usage.prompt_tokens_details.cached_tokens == 0 for r in plain)
    assert all(r.usage.prompt_tokens_details.cached_tokens < r.usage.prompt_tokens for r in cached)
    hits = metric(servers[0].base, "gptforge_prefix_cache_hits_total") - hits_before
    assert hits == sum(r.usage.prompt_tokens_details.cached_tokens for r in cached)
    assert metric(servers[0].base, "gptforge_prefix_cache_queries_total") >= hits + len(QUESTIONS)
    assert metric(servers[1].base, "gptforge_prefix_cache_hits_total") == 0


def test_growing_chat_reuses_its_history(servers):
    with_cache, without = clients(servers)
    messages = [{"role": "system", "content": "Be brief."}]
    cached_per_turn = []
    for turn, question in enumerate(QUESTIONS[:5]):
        messages.append({"role": "user", "content": f"{question} (turn {turn})"})
        a, b = ask(with_cache, messages), ask(without, messages)
        assert a.choices[0].message.content == b.choices[0].message.content
        cached_per_turn.append(a.usage.prompt_tokens_details.cached_tokens)
        messages.append({"role": "assistant", "content": a.choices[0].message.content})
    assert cached_per_turn[0] == 0 and cached_per_turn[1] >= 16
    assert all(later >= earlier for earlier, later in zip(cached_per_turn, cached_per_turn[1:]))
    assert cached_per_turn[4] > cached_per_turn[1]  # the history grows and stays cached


def test_streamed_usage_and_completions_report_cached_tokens(servers):
    with_cache, without = clients(servers)
    prompt = SYSTEM + " Question: how are you?"
    first = with_cache.completions.create(model=MODEL, prompt=prompt, max_tokens=4, temperature=0)
    chunks = list(with_cache.completions.create(model=MODEL, prompt=prompt, max_tokens=4, temperature=0, stream=True,
                                                stream_options={"include_usage": True}))
    assert first.choices[0].text == "".join(c.choices[0].text for c in chunks if c.choices)
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens >= 16
    # Prompt log-probabilities need every prompt token's logits: such requests compute the whole prompt.
    echo = with_cache.completions.create(model=MODEL, prompt=prompt, max_tokens=0, echo=True, logprobs=1)
    plain = without.completions.create(model=MODEL, prompt=prompt, max_tokens=0, echo=True, logprobs=1)
    assert echo.usage.prompt_tokens_details.cached_tokens == 0
    assert echo.choices[0].logprobs.token_logprobs == pytest.approx(plain.choices[0].logprobs.token_logprobs, abs=1e-5)


def test_small_budget_evicts_and_stays_bounded(start_server):
    # 16-token blocks of this model: 2 layers x (k, v) x 4 heads x 16 slots x 16 dims x 4 bytes = 16 KiB.
    budget_mb = 3 * 16 / 1024
    srv = start_server(ServerOptions(model_name=MODEL, api_keys=[KEY], prefix_cache_mb=budget_mb))
    client = openai.OpenAI(base_url=f"{srv.base}/v1", api_key=KEY, max_retries=0)
    for i in range(6):
        client.completions.create(model=MODEL, prompt=f"{i} {SYSTEM}", max_tokens=2, temperature=0)
    held = metric(srv.base, "gptforge_prefix_cache_bytes")
    assert 0 < held <= budget_mb * 1024 * 1024
    assert metric(srv.base, "gptforge_prefix_cache_capacity_bytes") == int(budget_mb * 1024 * 1024)
    # The most recent prompt is still cached, the first ones are gone.
    again = client.completions.create(model=MODEL, prompt=f"5 {SYSTEM}", max_tokens=2, temperature=0)
    first = client.completions.create(model=MODEL, prompt=f"0 {SYSTEM}", max_tokens=2, temperature=0)
    assert again.usage.prompt_tokens_details.cached_tokens > 0
    assert first.usage.prompt_tokens_details.cached_tokens == 0


def test_negative_budget_is_a_one_line_cli_error(model_dir):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "gptforge.cli", "serve", "--model", str(model_dir),
                           "--prefix-cache-mb", "-1"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "--prefix-cache-mb must be >= 0" in proc.stderr
