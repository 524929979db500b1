"""`generate`, `stream` and `score_tokens`: batching, sampling, stop strings, logprobs, errors."""

import pytest
import torch

from gptforge.config import Config
from gptforge.generate import generate, score_tokens, stream
from gptforge.model import GPT
from gptforge.tokenizer import Tokenizer
from gptforge.loading import load_model, save

TEXT = "the quick brown fox jumps over the lazy dog. héllo wörld 🙂 日本語! " * 4


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.train_bpe([TEXT], vocab_size=300)


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def model(request, tokenizer):
    torch.manual_seed(0)
    preset = "nano" if request.param == "gpt2" else "llama-nano"
    config = Config.from_name(preset).replace(vocab_size=tokenizer.vocab_size, block_size=64, init_std=0.2)
    return GPT(config).eval()


PROMPTS = ["the quick brown fox", "héllo", "over the lazy dog. the"]


@pytest.mark.parametrize("kwargs", [
    dict(),
    dict(do_sample=True, seed=3, top_k=20, temperature=0.9),
    dict(do_sample=True, seed=4, num_return_sequences=2, top_p=0.9),
    dict(num_beams=3, num_return_sequences=2),
    dict(repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.5),
])
def test_batched_prompts_equal_generating_each_alone(model, tokenizer, kwargs):
    batched = generate(model, PROMPTS, tokenizer, max_new_tokens=12, eos_token_id=[], **kwargs)
    alone = [o for p in PROMPTS for o in generate(model, p, tokenizer, max_new_tokens=12, eos_token_id=[], **kwargs)]
    assert [o.token_ids for o in batched] == [o.token_ids for o in alone]
    assert [o.index for o in batched] == sorted(o.index for o in batched)
    assert all(len(o.token_ids) == 12 and o.finish_reason == "length" for o in batched)


def test_cached_decoding_equals_full_recomputation(model, tokenizer):
    ids = tokenizer.encode(PROMPTS[0])
    out = generate(model, ids, max_new_tokens=10, eos_token_id=[])[0]
    seq = list(ids)
    with torch.no_grad():
        for _ in range(10):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    assert out.token_ids == seq[len(ids):]


def test_seeded_sampling_is_reproducible(model, tokenizer):
    def run(seed):
        return [o.token_ids for o in generate(model, PROMPTS[0], tokenizer, max_new_tokens=16, do_sample=True,
                                              seed=seed, num_return_sequences=2, eos_token_id=[])]
    first = run(11)
    assert first == run(11)
    assert first != run(12)
    assert first[0] != first[1]  # the sequences of one request differ from each other


def test_eos_int_or_list_stops_and_is_not_returned(model, tokenizer):
    free = generate(model, PROMPTS[0], tokenizer, max_new_tokens=12, eos_token_id=[])[0].token_ids
    stop_at = free[4]
    first = free.index(stop_at)
    for eos in (stop_at, [999 % tokenizer.vocab_size, stop_at]):
        out = generate(model, PROMPTS[0], tokenizer, max_new_tokens=12, eos_token_id=eos)[0]
        assert out.token_ids == free[:first]
        assert out.finish_reason == "stop" and out.stop_reason == stop_at
    forced = generate(model, PROMPTS[0], tokenizer, max_new_tokens=12, eos_token_id=stop_at,
                      min_new_tokens=first + 1)[0]
    assert len(forced.token_ids) > first


def test_stop_string_across_token_boundaries_and_stream(model, tokenizer):
    free = generate(model, PROMPTS[1], tokenizer, max_new_tokens=20, eos_token_id=[])[0]
    pieces = [tokenizer.decode([t]) for t in free.token_ids]
    # a stop string that starts inside one token and ends inside the next one
    k = next(i for i in range(2, len(pieces) - 1) if len(pieces[i]) >= 2 and len(pieces[i + 1]) >= 1)
    stop = pieces[k][-1] + pieces[k + 1][:1]
    expected = free.text[:free.text.index(stop)]
    out = generate(model, PROMPTS[1], tokenizer, max_new_tokens=20, eos_token_id=[], stop=["zzzz", stop])[0]
    assert out.text == expected and out.finish_reason == "stop" and out.stop_reason == stop
    deltas = list(stream(model, PROMPTS[1], tokenizer, max_new_tokens=20, eos_token_id=[], stop=[stop]))
    assert "".join(deltas) == expected
    assert all(stop not in d for d in deltas)
    whole = list(stream(model, PROMPTS[1], tokenizer, max_new_tokens=20, eos_token_id=[]))
    assert "".join(whole) == free.text


def _scripted_model(vocab_size: int, script: list[int]) -> GPT:
    """A GPT-2 whose prediction at position p is script[p]: blocks are identities, wpe is one-hot."""
    model = GPT(Config.from_name("nano").replace(vocab_size=vocab_size, block_size=32, tie_embeddings=False))
    with torch.no_grad():
        for param in model.parameters():
            param.zero_()
        model.norm_f.weight.fill_(1.0)
        for pos in range(32):
            model.wpe.weight[pos, pos] = 1.0
        for pos, token in enumerate(script):
            model.lm_head.weight[token, pos] = 10.0
    return model.eval()


def test_stream_never_splits_multibyte_characters():
    byte_tok = Tokenizer.train_bpe(["ab"], vocab_size=262)  # bytes only: "🙂" is four tokens
    text = "é🙂x日本"
    script = byte_tok.encode(text)
    assert len(script) == len(text.encode("utf-8"))
    model = _scripted_model(byte_tok.vocab_size, script)
    deltas = list(stream(model, "a", byte_tok, max_new_tokens=len(script), eos_token_id=[]))
    assert "".join(deltas) == text
    assert deltas == ["é", "🙂", "x", "日", "本"]
    out = generate(model, "a", byte_tok, max_new_tokens=len(script), eos_token_id=[], stop="x日")[0]
    assert out.text == "é🙂" and out.stop_reason == "x日"


def test_logprobs_and_top_logprobs(model, tokenizer):
    out = generate(model, PROMPTS[0], tokenizer, max_new_tokens=5, logprobs=True, top_logprobs=3, eos_token_id=[])[0]
    assert len(out.logprobs) == len(out.top_logprobs) == 5
    for lp, top, token in zip(out.logprobs, out.top_logprobs, out.token_ids):
        assert len(top) == 3 and max(top.values()) == pytest.approx(lp)  # greedy picks the most likely
        assert top[token] == pytest.approx(lp)
    plain = generate(model, PROMPTS[0], tokenizer, max_new_tokens=5)[0]
    assert plain.logprobs is None and plain.top_logprobs is None


def test_prompt_longer_than_context_is_a_clear_error(model, tokenizer):
    long_prompt = list(range(1, 80))
    with pytest.raises(ValueError, match="context is 64 tokens"):
        generate(model, long_prompt, max_new_tokens=4)
    out = generate(model, long_prompt, max_new_tokens=4, truncate_prompt=True, eos_token_id=[])[0]
    assert out.prompt_token_ids == long_prompt[-63:] and len(out.token_ids) == 2 and out.finish_reason == "length"
    with pytest.raises(ValueError, match="context is 64"):
        score_tokens(model, [long_prompt])


@pytest.mark.parametrize("kwargs,name", [
    (dict(temperature=-0.5), "temperature"), (dict(top_p=0), "top_p"), (dict(max_new_tokens=-1), "max_new_tokens"),
    (dict(num_beams=2, do_sample=True), "do_sample"), (dict(colour="red"), "colour"),
])
def test_invalid_parameters_raise_value_error_naming_them(model, tokenizer, kwargs, name):
    with pytest.raises(ValueError, match=name):
        generate(model, "hi", tokenizer, **kwargs)


def test_bad_prompts_are_clear_errors(model, tokenizer):
    with pytest.raises(ValueError, match="empty"):
        generate(model, [[]], tokenizer)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        generate(model, [[1, 10**6]], tokenizer)
    with pytest.raises(ValueError, match="tokenizer"):
        generate(model, "text", None)


def test_generate_restores_the_models_own_cache(model, tokenizer):
    model.setup_cache(2, 16)
    before = model.blocks[0].attn.kv_cache
    out = generate(model, "the", tokenizer, max_new_tokens=3, eos_token_id=[])
    assert len(out) == 1 and len(out[0].token_ids) == 3
    assert model.blocks[0].attn.kv_cache is before and model.cache_max_len == 16
    model.clear_cache()


@pytest.mark.slow
def test_compiled_decode_step_gives_the_same_tokens(tokenizer):
    torch.manual_seed(0)
    config = Config.from_name("nano").replace(vocab_size=tokenizer.vocab_size, block_size=64, init_std=0.2)
    model = GPT(config).eval()
    kwargs = dict(max_new_tokens=10, eos_token_id=[])
    # one prompt, one shape: a single graph to compile keeps this test short
    eager = generate(model, PROMPTS[:1], tokenizer, **kwargs)
    compiled = generate(model, PROMPTS[:1], tokenizer, compile=True, **kwargs)
    assert [o.token_ids for o in compiled] == [o.token_ids for o in eager]
    assert "".join(stream(model, PROMPTS[0], tokenizer, compile=True, **kwargs)) == eager[0].text


def _greedy_without_cache(model: GPT, ids: list[int], n: int) -> list[int]:
    ids = list(ids)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[-n:]


def test_generate_lays_fp32_weights_out_for_decoding_by_default(tokenizer, tmp_path):
    """The fast layout is the default path: same tokens, same Parameters, ties, training and checkpoints."""
    import copy

    torch.manual_seed(0)
    config = Config.from_name("nano").replace(vocab_size=tokenizer.vocab_size, block_size=64, init_std=0.2)
    model = GPT(config).eval()
    reference = copy.deepcopy(model)
    params = list(model.parameters())
    state = {k: v.clone() for k, v in model.state_dict().items()}
    out = generate(model, PROMPTS, tokenizer, max_new_tokens=8, eos_token_id=[], token_healing=False)
    assert not model.blocks[0].attn.qkv.weight.is_contiguous()  # column-major: W.T is contiguous
    assert all(a is b for a, b in zip(model.parameters(), params))  # an optimizer keeps its parameters
    assert model.lm_head.weight is model.wte.weight  # the tie survives
    for o, prompt in zip(out, PROMPTS):
        assert o.token_ids == _greedy_without_cache(reference, tokenizer.encode(prompt), 8)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    model(torch.tensor([[1, 2, 3]])).sum().backward()  # not inference tensors: training goes on
    optimizer.zero_grad()
    model.eval()
    save(tmp_path / "saved", model, tokenizer)
    reloaded = load_model(tmp_path / "saved")
    for name, value in reloaded.state_dict().items():
        assert torch.equal(value, state[name]), name


def test_generate_leaves_16_bit_weights_row_major(tokenizer):
    """bf16/fp16 column-major GEMV is 10-20x slower on CPUs without native 16-bit matmul, so no re-layout."""
    config = Config.from_name("nano").replace(vocab_size=tokenizer.vocab_size, block_size=64)
    for dtype in (torch.bfloat16, torch.float16):
        model = GPT(config).eval().to(dtype)
        generate(model, PROMPTS[:1], tokenizer, max_new_tokens=2, eos_token_id=[])
        assert model.blocks[0].attn.qkv.weight.is_contiguous()


def test_compile_is_off_by_default_and_on_with_the_environment(tokenizer, monkeypatch):
    import gptforge.generate as gen

    seen = []
    real = gen.decode_step
    monkeypatch.setattr(gen, "decode_step", lambda model, compile: seen.append(compile) or real(model, False))
    model = GPT(Config.from_name("nano").replace(vocab_size=tokenizer.vocab_size, block_size=64)).eval()
    monkeypatch.delenv(gen.COMPILE_ENV, raising=False)
    generate(model, PROMPTS[:1], tokenizer, max_new_tokens=2)
    monkeypatch.setenv(gen.COMPILE_ENV, "1")
    generate(model, PROMPTS[:1], tokenizer, max_new_tokens=2)
    list(stream(model, PROMPTS[0], tokenizer, max_new_tokens=2))
    generate(model, PROMPTS[:1], tokenizer, max_new_tokens=2, compile=False)  # an explicit choice wins
    assert seen == [False, True, True, False]
