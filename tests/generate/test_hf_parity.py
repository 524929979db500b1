"""Greedy and beam-search tokens equal `transformers` `generate` on the same tiny random weights."""

import pytest
import torch

from gptforge.generate import generate, score_tokens

PROMPTS = [[5, 17, 42, 8, 9, 30], [11, 3], [60, 61, 62, 63]]
EOS = 7


def _hf_generate(hf, prompt, **kwargs):
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), pad_token_id=0, eos_token_id=EOS, **kwargs)
    return [_trim(seq[len(prompt):].tolist()) for seq in out]


def _trim(tokens):
    """HF keeps the EOS and pads after it; our outputs end before the EOS."""
    return tokens[:tokens.index(EOS)] if EOS in tokens else tokens


def test_greedy_equals_transformers(hf_pair):
    hf, ours = hf_pair
    outputs = generate(ours, PROMPTS, max_new_tokens=20, eos_token_id=EOS)
    for prompt, output in zip(PROMPTS, outputs):
        assert output.token_ids == _hf_generate(hf, prompt, max_new_tokens=20, do_sample=False)[0]


@pytest.mark.parametrize("length_penalty,early_stopping", [(1.0, False), (0.5, True), (2.0, "never")])
def test_beam_search_equals_transformers(hf_pair, length_penalty, early_stopping):
    hf, ours = hf_pair
    kwargs = dict(max_new_tokens=10, num_beams=4, num_return_sequences=3, length_penalty=length_penalty,
                  early_stopping=early_stopping)
    outputs = generate(ours, PROMPTS, eos_token_id=[EOS], **kwargs)
    for i, prompt in enumerate(PROMPTS):
        expected = _hf_generate(hf, prompt, do_sample=False, **kwargs)
        assert [o.token_ids for o in outputs if o.index == i] == expected


def test_beam_scores_equal_transformers(hf_pair):
    hf, ours = hf_pair
    prompt = PROMPTS[0]
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), pad_token_id=0, eos_token_id=EOS,
                          max_new_tokens=6, num_beams=3, num_return_sequences=2, do_sample=False,
                          output_scores=True, return_dict_in_generate=True)
    ours_scores = [o.score for o in generate(ours, prompt, max_new_tokens=6, num_beams=3, num_return_sequences=2,
                                            eos_token_id=EOS)]
    torch.testing.assert_close(torch.tensor(ours_scores), out.sequences_scores, rtol=1e-4, atol=1e-4)


def test_repetition_penalty_and_ngram_greedy_equal_transformers(hf_pair):
    hf, ours = hf_pair
    kwargs = dict(max_new_tokens=16, repetition_penalty=1.5, no_repeat_ngram_size=2)
    output = generate(ours, PROMPTS[1], eos_token_id=EOS, **kwargs)[0]
    assert output.token_ids == _hf_generate(hf, PROMPTS[1], do_sample=False, **kwargs)[0]


def test_scores_and_echo_equal_transformers_log_softmax(hf_pair):
    hf, ours = hf_pair
    with torch.no_grad():
        logp = hf(torch.tensor([PROMPTS[0]])).logits.log_softmax(-1)[0]
    expected = [logp[i, t].item() for i, t in enumerate(PROMPTS[0][1:])]
    scores = score_tokens(ours, PROMPTS)
    assert scores[0][0] is None and len(scores[1]) == 2
    torch.testing.assert_close(torch.tensor(scores[0][1:]), torch.tensor(expected), rtol=1e-4, atol=1e-4)
    echoed = generate(ours, PROMPTS[0], max_new_tokens=2, echo=True, top_logprobs=2, logprobs=True)[0]
    assert echoed.prompt_logprobs == pytest.approx(scores[0][:1] + scores[0][1:], abs=1e-5) or \
        echoed.prompt_logprobs[1:] == pytest.approx(scores[0][1:], abs=1e-5)
    assert len(echoed.prompt_top_logprobs) == len(PROMPTS[0]) and len(echoed.prompt_top_logprobs[1]) == 2
    # the logprob of each generated token is its raw model log-probability
    full = PROMPTS[0] + echoed.token_ids
    rescored = score_tokens(ours, [full])[0][len(PROMPTS[0]):]
    assert echoed.logprobs == pytest.approx(rescored, abs=1e-4)
