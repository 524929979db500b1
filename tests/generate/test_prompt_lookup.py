"""Prompt-lookup speculative decoding: same greedy output, same sampling distribution, drafts as in transformers."""

import itertools
import json

import pytest
import torch
from scipy.stats import chisquare

from gptforge import cli
from gptforge.config import Config
from gptforge.errors import ParameterError
from gptforge.generate import generate, stream
from gptforge.loading import save
from gptforge.model import GPT
from gptforge.sampling import SamplingParams, process_logits
from gptforge.speculative import find_draft
from gptforge.tokenizer import Tokenizer

CODE = ("def area(width, height):\n    return width * height\n\n"
        "def perimeter(width, height):\n    return 2 * (width + height)\n\n") * 3


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.train_bpe([CODE], vocab_size=300)


def _loopy_model(preset, vocab, block=128, alpha=0.3):
    """A random model whose blocks write weakly into the residual stream: it is close to a bigram model,
    so greedy decoding settles into loops that prompt lookup can draft (a plain random model rarely repeats
    its context), while attention still reads the cache (rejected drafts that leaked would change it)."""
    torch.manual_seed(0)
    model = GPT(Config.from_name(preset).replace(vocab_size=vocab, block_size=block, init_std=0.2)).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("attn.out.weight", "mlp.down.weight")):
                param.mul_(alpha)
    return model


@pytest.fixture(scope="module", params=["nano", "llama-nano"])
def model(request, tokenizer):
    return _loopy_model(request.param, tokenizer.vocab_size)


PROMPTS = ["def area(width, height):\n    return", CODE[:60] + "\ndef perimeter(", "x"]


def test_greedy_output_is_identical_and_drafts_are_accepted_and_rejected(model, tokenizer):
    drafted = accepted = 0
    for prompt in PROMPTS:
        for healing in (True, False):
            plain = generate(model, prompt, tokenizer, max_new_tokens=60, eos_token_id=[], token_healing=healing)[0]
            fast = generate(model, prompt, tokenizer, max_new_tokens=60, eos_token_id=[], token_healing=healing,
                            prompt_lookup_num_tokens=5)[0]
            assert fast.token_ids == plain.token_ids and fast.text == plain.text
            assert fast.finish_reason == plain.finish_reason == "length"
            assert plain.draft_tokens is None and fast.draft_tokens >= fast.accepted_draft_tokens >= 0
            drafted, accepted = drafted + fast.draft_tokens, accepted + fast.accepted_draft_tokens
    assert drafted > accepted  # some drafts were rejected (and rolled back)...
    if model.config.name == "nano":
        assert accepted > 60  # ...and many kept: the tokens of several steps came from one forward pass


def test_every_length_eos_and_stop_string_ends_where_plain_decoding_ends(model, tokenizer):
    prompt = PROMPTS[1]
    plain = generate(model, prompt, tokenizer, max_new_tokens=40, eos_token_id=[], token_healing=False)[0]
    kept = 0
    for n in range(1, 41, 3):  # max_new_tokens landing at many positions, most of them inside an accepted draft
        fast = generate(model, prompt, tokenizer, max_new_tokens=n, eos_token_id=[], token_healing=False,
                        prompt_lookup_num_tokens=6)[0]
        assert fast.token_ids == plain.token_ids[:n] and fast.finish_reason == "length"
        kept += fast.accepted_draft_tokens
    assert kept > 0 or model.config.name != "nano"
    for j in (5, 17, 29):
        eos = plain.token_ids[j]
        want = generate(model, prompt, tokenizer, max_new_tokens=40, eos_token_id=eos, token_healing=False)[0]
        got = generate(model, prompt, tokenizer, max_new_tokens=40, eos_token_id=eos, token_healing=False,
                       prompt_lookup_num_tokens=6)[0]
        assert (got.token_ids, got.finish_reason, got.stop_reason) == (want.token_ids, "stop", eos)
        stop = tokenizer.decode(plain.token_ids[j:j + 2]).strip() or "\n"
        want = generate(model, prompt, tokenizer, max_new_tokens=40, stop=stop, eos_token_id=[], token_healing=False)[0]
        got = generate(model, prompt, tokenizer, max_new_tokens=40, stop=stop, eos_token_id=[], token_healing=False,
                       prompt_lookup_num_tokens=6)[0]
        assert (got.text, got.finish_reason, got.stop_reason) == (want.text, want.finish_reason, want.stop_reason)


@pytest.mark.parametrize("kwargs", [
    dict(repetition_penalty=1.3, presence_penalty=0.4, frequency_penalty=0.3),
    dict(no_repeat_ngram_size=4, min_new_tokens=10, logit_bias={5: 2.0}),
    dict(logprobs=True, top_logprobs=3),
])
def test_processors_and_logprobs_apply_to_each_verified_position(model, tokenizer, kwargs):
    eos = tokenizer.encode("\n\n")[:1]
    plain = generate(model, PROMPTS[:2], tokenizer, max_new_tokens=40, eos_token_id=eos, token_healing=False, **kwargs)
    fast = generate(model, PROMPTS[:2], tokenizer, max_new_tokens=40, eos_token_id=eos, token_healing=False,
                    prompt_lookup_num_tokens=5, **kwargs)
    for p, f in zip(plain, fast):
        assert (f.token_ids, f.finish_reason) == (p.token_ids, p.finish_reason)
        if kwargs.get("logprobs"):
            assert f.logprobs == pytest.approx(p.logprobs, abs=1e-4)
            assert [list(t) for t in f.top_logprobs] == [list(t) for t in p.top_logprobs]


def test_several_prompts_and_sequences_and_stream(model, tokenizer):
    kwargs = dict(max_new_tokens=20, eos_token_id=[], token_healing=False)
    plain = generate(model, PROMPTS, tokenizer, num_return_sequences=2, **kwargs)
    fast = generate(model, PROMPTS, tokenizer, num_return_sequences=2, prompt_lookup_num_tokens=4, **kwargs)
    assert [(o.index, o.token_ids) for o in fast] == [(o.index, o.token_ids) for o in plain]
    streamed = "".join(stream(model, PROMPTS[1], tokenizer, prompt_lookup_num_tokens=4, **kwargs))
    assert streamed == plain[2].text


def test_sampling_follows_the_plain_distribution():
    """Sampled 3-token continuations follow the exact distribution the model and its processors define."""
    vocab, new, n = 4, 3, 600  # drafts start after the first token: 3 tokens leave room for one
    torch.manual_seed(1)
    model = GPT(Config.from_name("nano").replace(vocab_size=vocab, block_size=32, init_std=0.3)).eval()
    prompt = [0, 1, 2, 3, 0, 1, 2, 3, 0, 1]  # its last bigram recurs, so every step has a draft
    params = SamplingParams(do_sample=True, temperature=0.8, top_k=3, repetition_penalty=1.2, max_new_tokens=new,
                            eos_token_id=[])
    exact = {}
    with torch.no_grad():
        for seq in itertools.product(range(vocab), repeat=new):
            prob = 1.0
            for i in range(new):
                logits = model(torch.tensor([prompt + list(seq[:i])]))[:, -1]
                processed = process_logits(logits, [params], [list(seq[:i])], prompts=[prompt])
                prob *= float(processed.softmax(-1)[0, seq[i]])
            exact[seq] = prob
    outs = generate(model, prompt, params=params.replace(seed=7, num_return_sequences=n, prompt_lookup_num_tokens=3))
    assert sum(o.accepted_draft_tokens for o in outs) > n // 20  # drafts were kept, not only rejected
    counts = {seq: 0 for seq in exact}
    for o in outs:
        counts[tuple(o.token_ids)] += 1
    likely = [s for s in exact if exact[s] * n >= 5]  # chi-square wants expected counts >= 5: pool the rest
    observed = [counts[s] for s in likely] + [n - sum(counts[s] for s in likely)]
    expected = [exact[s] * n for s in likely] + [n - sum(exact[s] * n for s in likely)]
    if expected[-1] < 1e-9:
        observed, expected = observed[:-1], expected[:-1]
    assert chisquare(observed, expected).pvalue > 1e-3
    assert 0.5 * sum(abs(counts[s] / n - exact[s]) for s in exact) < 0.1  # total variation distance


def test_drafts_match_transformers_prompt_lookup():
    from transformers.generation.candidate_generator import PromptLookupCandidateGenerator

    generator = torch.Generator().manual_seed(0)
    for _ in range(200):
        context = torch.randint(0, 4, (int(torch.randint(2, 30, (1,), generator=generator)),), generator=generator)
        hf = PromptLookupCandidateGenerator(num_output_tokens=5, max_matching_ngram_size=3, max_length=1000)
        candidates, _ = hf.get_candidates(context[None, :])
        assert find_draft(context.tolist(), 5, 3) == candidates[0, len(context):].tolist()
    assert find_draft([7], 5, 2) == [] and find_draft([1, 2, 3], 0, 2) == []


def test_bad_parameters_are_refused(model, tokenizer):
    with pytest.raises(ParameterError, match="prompt_lookup_num_tokens"):
        generate(model, "x", tokenizer, num_beams=2, prompt_lookup_num_tokens=3)
    with pytest.raises(ParameterError, match="prompt_lookup_num_tokens"):
        generate(model, "x", tokenizer, prompt_lookup_num_tokens=-1)
    with pytest.raises(ParameterError, match="max_matching_ngram_size"):
        generate(model, "x", tokenizer, prompt_lookup_num_tokens=3, max_matching_ngram_size=0)


def test_cli_prompt_lookup(tmp_path, tokenizer, capsys):
    save(tmp_path, _loopy_model("nano", tokenizer.vocab_size), tokenizer)
    base = ["generate", "--model", str(tmp_path), "--prompt", PROMPTS[0], "--max-new-tokens", "30", "--jsonl",
            "--no-token-healing"]
    assert cli.main(base) == 0
    plain = json.loads(capsys.readouterr().out)
    assert cli.main(base + ["--prompt-lookup", "5"]) == 0
    fast = json.loads(capsys.readouterr().out)
    assert fast["token_ids"] == plain["token_ids"] and fast["accepted_draft_tokens"] > 0
    assert cli.main(base + ["--prompt-lookup", "4", "--num-beams", "2"]) == 2
    assert "prompt_lookup_num_tokens" in capsys.readouterr().err
