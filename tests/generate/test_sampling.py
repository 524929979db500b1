"""Sampling primitives: logits processing equals the `transformers` processors; text helpers."""

import pytest
import torch
from transformers.generation import logits_process as hf

from gptforge.sampling import (IncrementalDetokenizer, SamplingParams, StopStringMatcher, process_logits,
                               sample_next_token, truncate_at_stop)
from gptforge.tokenizer import Tokenizer

VOCAB = 50


def _random_logits(rows: int = 4) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(rows, VOCAB, generator=generator) * 3


def _hf(processor, logits, input_ids=None):
    if input_ids is None:
        input_ids = torch.zeros(logits.shape[0], 1, dtype=torch.long)
    return processor(input_ids, logits.clone())


@pytest.mark.parametrize("name,value,processor", [
    ("top_k", 7, lambda: hf.TopKLogitsWarper(7)),
    ("top_p", 0.8, lambda: hf.TopPLogitsWarper(0.8)),
    ("top_p", 0.05, lambda: hf.TopPLogitsWarper(0.05)),
    ("min_p", 0.1, lambda: hf.MinPLogitsWarper(0.1)),
    ("typical_p", 0.7, lambda: hf.TypicalLogitsWarper(0.7)),
    ("temperature", 0.7, lambda: hf.TemperatureLogitsWarper(0.7)),
])
def test_filters_equal_transformers_processors(name, value, processor):
    logits = _random_logits()
    params = [SamplingParams(do_sample=True, **{name: value})] * logits.shape[0]
    ours = process_logits(logits, params, [[]] * logits.shape[0])
    theirs = _hf(processor(), logits)
    assert torch.equal(torch.isinf(ours), torch.isinf(theirs))
    torch.testing.assert_close(ours[~torch.isinf(ours)], theirs[~torch.isinf(theirs)])


def test_chained_filters_equal_transformers_chain():
    logits = _random_logits()
    params = [SamplingParams(do_sample=True, temperature=0.8, top_k=20, top_p=0.9, min_p=0.05)] * 4
    chain = hf.LogitsProcessorList([hf.TemperatureLogitsWarper(0.8), hf.TopKLogitsWarper(20),
                                    hf.TopPLogitsWarper(0.9), hf.MinPLogitsWarper(0.05)])
    theirs = _hf(chain, logits)
    ours = process_logits(logits, params, [[]] * 4)
    torch.testing.assert_close(ours, theirs)


def test_repetition_and_ngram_penalties_equal_transformers():
    logits = _random_logits(2)
    prompts = [[1, 2, 3, 1, 2], [4, 4, 5, 6, 4]]
    generated = [[7, 1], [5, 8]]
    full = torch.tensor([p + g for p, g in zip(prompts, generated)])
    for params, processor in [
        (SamplingParams(repetition_penalty=1.3), hf.RepetitionPenaltyLogitsProcessor(1.3)),
        (SamplingParams(no_repeat_ngram_size=2), hf.NoRepeatNGramLogitsProcessor(2)),
        (SamplingParams(no_repeat_ngram_size=3), hf.NoRepeatNGramLogitsProcessor(3)),
    ]:
        ours = process_logits(logits, [params] * 2, generated, prompts=prompts)
        theirs = processor(full, logits.clone())
        torch.testing.assert_close(ours, theirs)


def test_min_new_tokens_equals_transformers():
    logits = _random_logits(2)
    params = SamplingParams(min_new_tokens=3, max_new_tokens=5, eos_token_id=[3, 9])
    processor = hf.MinNewTokensLengthLogitsProcessor(prompt_length_to_skip=2, min_new_tokens=3, eos_token_id=[3, 9])
    ours = process_logits(logits, [params] * 2, [[5, 6], [5, 6]], prompts=[[1, 2], [1, 2]])
    theirs = processor(torch.tensor([[1, 2, 5, 6]] * 2), logits.clone())
    torch.testing.assert_close(ours, theirs)
    done = process_logits(logits, [params] * 2, [[5, 6, 7]] * 2)
    torch.testing.assert_close(done, logits)


def test_presence_frequency_and_bias_follow_openai_formula():
    logits = _random_logits(1)
    params = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25, logit_bias={3: 2.0, "4": -100})
    out = process_logits(logits, [params], [[1, 1, 2]])
    expected = logits.clone()
    expected[0, 1] -= 2 * 0.25 + 0.5
    expected[0, 2] -= 0.25 + 0.5
    expected[0, 3] += 2.0
    expected[0, 4] -= 100
    torch.testing.assert_close(out, expected)


def test_neutral_rows_untouched_and_mixed_rows_independent():
    logits = _random_logits(2)
    params = [SamplingParams(), SamplingParams(do_sample=True, top_k=1)]
    out = process_logits(logits, params, [[], []])
    torch.testing.assert_close(out[0], logits[0])
    assert torch.isfinite(out[1]).sum() == 1


@pytest.mark.parametrize("kwargs,name", [
    ({"temperature": -1}, "temperature"), ({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p"),
    ({"top_k": -3}, "top_k"), ({"min_p": 2}, "min_p"), ({"typical_p": 0}, "typical_p"),
    ({"max_new_tokens": 0}, "max_new_tokens"), ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"presence_penalty": 3}, "presence_penalty"), ({"num_beams": 0}, "num_beams"),
    ({"num_beams": 2, "num_return_sequences": 3}, "num_return_sequences"), ({"stop": [""]}, "stop"),
    ({"eos_token_id": "x"}, "eos_token_id"), ({"top_logprobs": 99}, "top_logprobs"),
    ({"logit_bias": {"a": 1}}, "logit_bias"), ({"early_stopping": "maybe"}, "early_stopping"),
    ({"bogus": 1}, "bogus"),
])
def test_invalid_parameters_name_the_parameter(kwargs, name):
    with pytest.raises(ValueError, match=name):
        SamplingParams.from_kwargs(**kwargs)


def test_seeded_sampling_is_reproducible_and_greedy_is_argmax():
    logits = _random_logits(3)
    params = [SamplingParams(do_sample=True)] * 3

    def draw(seed):
        generators = [torch.Generator().manual_seed(seed + i) for i in range(3)]
        return torch.stack([sample_next_token(logits, params, generators) for _ in range(20)])

    assert torch.equal(draw(5), draw(5))
    assert not torch.equal(draw(5), draw(6))
    greedy = sample_next_token(logits, [SamplingParams()] * 3)
    assert torch.equal(greedy, logits.argmax(-1))
    assert torch.equal(sample_next_token(logits, [SamplingParams(do_sample=True, temperature=0.0)] * 3), greedy)


def test_stop_strings_across_token_boundaries_and_hold_back():
    matcher = StopStringMatcher(["END", "\n\n"])
    shown = []
    for delta in ["Hello E", "N", "dless ", "story E", "ND more"]:
        text, stopped = matcher.push(delta)
        shown.append(text)
        if stopped:
            break
    assert shown == ["Hello ", "", "ENdless ", "story ", ""][:len(shown)] or "".join(shown) == "Hello ENdless story "
    assert "".join(shown) == "Hello ENdless story "
    assert matcher.stop_string == "END"
    held = StopStringMatcher(["abc"])
    assert held.push("xxab") == ("xx", False)
    assert held.flush() == "ab"
    assert truncate_at_stop("one two\n\nthree", ["\n\n", "two"]) == ("one ", "two")
    assert truncate_at_stop("plain", ["zz"]) == ("plain", None)


def test_incremental_detokenizer_never_splits_multibyte_characters():
    text = "héllo wörld 🙂 日本語 done"
    tokenizer = Tokenizer.train_bpe([text * 3, "plain ascii words here"], vocab_size=300)
    ids = tokenizer.encode(text)
    detok = IncrementalDetokenizer(tokenizer)
    deltas = [detok.push(i) for i in ids] + [detok.flush()]
    assert "".join(deltas) == text
    assert all("\ufffd" not in d for d in deltas)
    # byte-level tokens of the emoji arrive one by one (a byte-only vocabulary splits them)
    bytes_only = Tokenizer.train_bpe(["a"], vocab_size=262)
    ids = bytes_only.encode("a🙂b")
    assert len(ids) == 6
    detok = IncrementalDetokenizer(bytes_only)
    deltas = [detok.push(i) for i in ids]
    assert deltas == ["a", "", "", "", "🙂", "b"]
