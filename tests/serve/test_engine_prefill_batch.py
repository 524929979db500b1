"""Sequences admitted together are prefilled in one left-padded forward: the same tokens as one at a time."""

from __future__ import annotations

import copy
import threading

import pytest
import torch

from gptforge.config import Config
from gptforge.model import GPT
from gptforge.sampling import SamplingParams
from gptforge.serve.engine import Engine, SequenceRequest


def tiny_model(tokenizer, **overrides) -> GPT:
    torch.manual_seed(0)
    config = Config(name="tiny", family="llama", vocab_size=tokenizer.vocab_size, block_size=64, n_layer=2,
                    n_head=4, n_kv_head=2, n_embd=64, pos_embedding="rope", norm="rmsnorm", mlp="swiglu",
                    bias=False, **overrides)
    model = GPT(config).eval()
    with torch.no_grad():  # sharper logits: greedy choices far from ties, so batching cannot flip one
        model.lm_head.weight.mul_(2.0)
    return model


class Recorder:
    """Counts the model's forwards by (rows, tokens) and collects each sequence's tokens and their logprobs."""

    def __init__(self, model: GPT) -> None:
        self.shapes: list[tuple[int, int]] = []
        self.logprobs: dict[int, list[float]] = {}
        forward = model.forward

        def counting(input_ids, *args, **kwargs):
            self.shapes.append(tuple(input_ids.shape))
            return forward(input_ids, *args, **kwargs)

        model.forward = counting

    def run(self, engine: Engine, requests: list[SequenceRequest]) -> dict[int, list[int]]:
        tokens: dict[int, list[int]] = {r.index: [] for r in requests}
        self.logprobs.update({r.index: [] for r in requests})
        errors, done, lock = [], threading.Event(), threading.Lock()
        finished = set()

        def sink(events):
            with lock:
                for e in events:
                    if e.error is not None:
                        errors.append(e.error)
                        finished.add(e.index)
                    if e.token_id is not None:
                        tokens[e.index].append(e.token_id)
                        self.logprobs[e.index].append(e.logprob)
                    if e.finish_reason is not None:
                        finished.add(e.index)
                if len(finished) == len(requests):
                    done.set()

        engine.submit(requests, sink)  # one call: all queued before the engine admits any
        assert done.wait(60), "the engine did not finish"
        assert not errors
        return tokens


def requests(prompts: list[list[int]], max_tokens: int = 6, **kw) -> list[SequenceRequest]:
    params = SamplingParams(max_new_tokens=max_tokens, logprobs=True)
    return [SequenceRequest(index=i, prompt_ids=p, params=params, max_tokens=max_tokens, **kw)
            for i, p in enumerate(prompts)]


@pytest.fixture(scope="module")
def tokenizer(reference_model):
    return reference_model[1]


@pytest.mark.parametrize("overrides", [{}, {"sliding_window": 8}], ids=["global", "sliding-window"])
def test_batched_prefill_matches_one_at_a_time(tokenizer, overrides):
    base = tiny_model(tokenizer, **overrides)
    ids = tokenizer.encode("Once upon a time there was a little model that wrote Python code all day long. " * 2)
    prompts = [ids[:3], ids[:25], ids[5:14], ids[1:2], ids[2:30], ids[7:17]]  # lengths 3, 25, 9, 1, 28, 10

    solo_model = copy.deepcopy(base)
    solo = Recorder(solo_model)
    solo_engine = Engine(solo_model, tokenizer, max_batch=8, prefix_cache_bytes=0)
    try:
        expected = {}
        for req in requests(prompts):
            expected.update(solo.run(solo_engine, [req]))
    finally:
        solo_engine.shutdown()

    batched = Recorder(base)
    engine = Engine(base, tokenizer, max_batch=8, prefix_cache_bytes=0)
    try:
        got = batched.run(engine, requests(prompts))
    finally:
        engine.shutdown()
    assert got == expected
    assert all(len(t) == 6 for t in got.values())
    for i in got:  # the same numbers, not just the same argmax
        assert batched.logprobs[i] == pytest.approx(solo.logprobs[i], abs=2e-6)
    prefills = [shape for shape in batched.shapes if shape[1] > 1]
    # Lengths 28, 25, 10, 9 | 3, 1 (the padding bound splits them): two forwards instead of six.
    assert sorted(prefills) == [(2, 3), (4, 28)]


def test_batched_prefill_with_prefix_cache_hits_logprobs_and_echo_only(tokenizer):
    model = tiny_model(tokenizer)
    ids = tokenizer.encode("def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)\n" * 2)
    assert len(ids) > 40
    solo_model = copy.deepcopy(model)
    solo_engine = Engine(solo_model, tokenizer, max_batch=8, prefix_cache_bytes=0)
    engine = Engine(model, tokenizer, max_batch=8)  # prefix cache on
    rec = Recorder(model)
    try:
        rec.run(engine, requests([ids[:40]], max_tokens=1))  # stores the first two 16-token blocks
        prompts = [ids[:36], ids[:20], ids[3:9], ids[:38]]  # 32 cached + 4, 16 cached + 4, none, 32 + 6
        reqs = requests(prompts)
        reqs[2].prompt_logprobs = True  # needs every position's logits: prefilled alone
        reqs.append(SequenceRequest(index=4, prompt_ids=ids[:5], params=SamplingParams(max_new_tokens=1),
                                    max_tokens=0))  # echo only: prefilled, nothing sampled
        rec.shapes.clear()
        got = rec.run(engine, reqs)
        expected, solo = {}, Recorder(solo_model)
        for req in requests(prompts):
            expected.update(solo.run(solo_engine, [req]))
    finally:
        engine.shutdown()
        solo_engine.shutdown()
    assert engine.metrics.prefix_cache_hits._value.get() >= 32 + 16 + 32
    assert {i: got[i] for i in range(4)} == expected
    for i in range(4):  # the cached blocks are intact: the same numbers, not just the same argmax
        assert rec.logprobs[i] == pytest.approx(solo.logprobs[i], abs=2e-6)
    assert got[4] == []
    prefills = [shape for shape in rec.shapes if shape[1] > 1]
    assert (1, 6) in prefills  # the prompt-logprobs sequence, alone
    assert any(shape[0] >= 3 for shape in prefills)  # the cache hits and the echo share a forward


def test_a_failing_batched_prefill_falls_back_to_one_at_a_time(tokenizer, monkeypatch):
    model = tiny_model(tokenizer)
    ids = tokenizer.encode("a failing batch is retried one sequence at a time")
    engine = Engine(model, tokenizer, max_batch=8, prefix_cache_bytes=0)

    def broken(self, seqs):
        raise RuntimeError("simulated failure of the padded forward")

    monkeypatch.setattr(Engine, "_prefill_batch", broken)
    try:
        got = Recorder(model).run(engine, requests([ids[:4], ids[:6], ids[2:7]], max_tokens=3))
    finally:
        engine.shutdown()
    assert all(len(t) == 3 for t in got.values())
