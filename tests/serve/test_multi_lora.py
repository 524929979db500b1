"""Several LoRA adapters on one base: per-row adapter math, and through the official client against a real
server, each request's greedy output equal to its merged model alone, with the adapters batched together."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

from gptforge.finetune.lora import LoRAConfig, LoRALinear, apply_lora, load_lora, lora_modules, merge_lora, save_lora
from gptforge.loading import load
from gptforge.serve.app import ServerOptions
from gptforge.serve.multi_lora import attach_adapters, parse_lora_flags

openai = pytest.importorskip("openai")

KEY = "sk-lora"
MODEL = "tiny-chat"
BANNED = (0, 1, 2, 3)  # the special tokens: every reply runs to max_tokens and is plain text (the server hides
# special tokens, the reference decodes them; text around them would differ, not the tokens)
PROMPTS = ["The quick brown fox jumps over the lazy dog. Once upon a time", "Hello world! {\"name\": "]
ADAPTERS = {"alpha": (["attn.qkv", "attn.out"], 4, 1), "beta": (["attn.qkv", "mlp.up", "mlp.down"], 8, 2)}


def randomized_adapter(model, targets, rank, seed):
    """`model` with a LoRA adapter whose B is random (a fresh adapter has B = 0 and changes nothing)."""
    apply_lora(model, LoRAConfig(r=rank, alpha=16, target_modules=targets))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.3)
    return model


@pytest.fixture(scope="module")
def adapter_dirs(model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    dirs = {}
    for name, (targets, rank, seed) in ADAPTERS.items():
        model, _ = load(model_dir)
        dirs[name] = str(save_lora(randomized_adapter(model, targets, rank, seed), root / name))
    return dirs


def greedy_alone(model_dir, adapter_dir, prompt: str, n: int) -> str:
    """The reference: the merged model (or the base) alone, full forward per token, no cache."""
    model, tok = load(model_dir)
    if adapter_dir is not None:
        merge_lora(load_lora(model, adapter_dir))
    ids = tok.encode(prompt)
    out = []
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([ids + out]))[0, -1]
            logits[list(BANNED)] = float("-inf")
            out.append(int(logits.argmax()))
    return tok.decode(out)


def test_per_row_updates_equal_each_adapter_alone(model_dir, adapter_dirs):
    base, _ = load(model_dir)
    adapters = attach_adapters(base, adapter_dirs)
    x = torch.randn(3, 5, base.config.n_embd)
    layer = base.get_submodule("blocks.0.attn.qkv")
    adapters.select([adapters.slots["beta"], 0, adapters.slots["alpha"]])  # three rows, three models
    mixed = layer(x)
    adapters.select(None)
    for row, name in ((0, "beta"), (1, None), (2, "alpha")):
        alone, _ = load(model_dir)
        if name is not None:
            load_lora(alone, adapter_dirs[name])
        single = alone.get_submodule("blocks.0.attn.qkv")
        assert isinstance(single, LoRALinear) == (name is not None)
        torch.testing.assert_close(mixed[row], single(x[row:row + 1])[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias))  # none selected


@pytest.fixture(scope="module")
def server(start_server, adapter_dirs):
    # A slowed step (20 ms) so that concurrent requests overlap and decode in one batch.
    return start_server(ServerOptions(model_name=MODEL, api_keys=[KEY], max_batch=8, lora=adapter_dirs),
                        step_delay=0.02)


def test_models_lists_the_adapters(server, adapter_dirs):
    client = openai.OpenAI(base_url=f"{server.base}/v1", api_key=KEY, max_retries=0)
    cards = {m.id: m for m in client.models.list().data}
    assert set(cards) == {MODEL, "alpha", "beta"}
    assert cards["alpha"].model_extra["parent"] == MODEL and cards["beta"].model_extra["root"] == adapter_dirs["beta"]
    assert client.models.retrieve("beta").id == "beta"


def test_each_request_equals_its_merged_model_alone(server, model_dir, adapter_dirs):
    client = openai.OpenAI(base_url=f"{server.base}/v1", api_key=KEY, max_retries=0, timeout=120)
    bias = {str(i): -100 for i in BANNED}
    jobs = [(model, prompt) for prompt in PROMPTS for model in (MODEL, "alpha", "beta")] * 2  # 12 in flight

    adapters = server.app.state.server.engine.adapters
    batches: list[set[int]] = []
    select = adapters.select

    def recording_select(slots):
        if slots is not None:
            batches.append(set(slots))
        select(slots)

    adapters.select = recording_select

    def complete(job):
        model, prompt = job
        return client.completions.create(model=model, prompt=prompt, max_tokens=10, temperature=0, logit_bias=bias)

    try:
        with ThreadPoolExecutor(len(jobs)) as pool:
            results = list(pool.map(complete, jobs))
    finally:
        adapters.select = select
    assert any(len(b) == 3 for b in batches)  # base, alpha and beta rows in one forward
    expected = {(model, prompt): greedy_alone(model_dir, adapter_dirs.get(model), prompt, 10)
                for model, prompt in set(jobs)}
    for (model, prompt), res in zip(jobs, results):
        assert res.model == model
        assert res.choices[0].text == expected[model, prompt], (model, prompt)
    for prompt in PROMPTS:  # the adapters do change the model (so the comparison above can fail)
        assert len({expected[m, prompt] for m in (MODEL, "alpha", "beta")}) == 3
    chat = client.chat.completions.create(model="alpha", messages=[{"role": "user", "content": "Hello"}],
                                          max_tokens=4, temperature=0)
    assert chat.model == "alpha" and chat.usage.completion_tokens >= 1


def test_unknown_adapter_and_embeddings_of_an_adapter_are_404(server):
    headers = {"Authorization": f"Bearer {KEY}"}
    r = httpx.post(f"{server.base}/v1/completions", headers=headers,
                   json={"model": "gamma", "prompt": "Hi", "max_tokens": 2})
    assert r.status_code == 404 and r.json()["error"]["param"] == "model"
    assert "alpha" in r.json()["error"]["message"]
    r = httpx.post(f"{server.base}/v1/embeddings", headers=headers, json={"model": "alpha", "input": "Hi"})
    assert r.status_code == 404 and "base model" in r.json()["error"]["message"]


def test_lora_flag_errors_name_the_value(tmp_path, adapter_dirs):
    assert parse_lora_flags([f"a={adapter_dirs['alpha']}"], "base") == {"a": adapter_dirs["alpha"]}
    for value, message in (("noequals", "expected NAME=DIR"), ("bad name=x", "the name must be"),
                           (f"base={adapter_dirs['alpha']}", "taken by the base model"),
                           (f"x={tmp_path}", "no adapter_config.json")):
        with pytest.raises((ValueError, FileNotFoundError), match=message):
            parse_lora_flags([value], "base")
    with pytest.raises(ValueError, match="already taken"):
        parse_lora_flags([f"a={adapter_dirs['alpha']}", f"a={adapter_dirs['beta']}"], "base")
