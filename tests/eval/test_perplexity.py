"""Perplexity against a transformers GPT2 model with the same weights."""

import math

import pytest
import torch

from gptforge.eval.perplexity import perplexity_of_file, perplexity_of_text, sliding_windows
from gptforge.eval.scoring import prefix_token_id

transformers = pytest.importorskip("transformers")

TEXT = "The cat sat on the mat. Paris is the capital of France. Über den Wolken, naïve café."
LONG_TEXT = " ".join(["One plus one is two. The dog sat on the log. A bird sang in the tree."] * 4)


@pytest.fixture(scope="module")
def hf_model(model_dir):
    return transformers.GPT2LMHeadModel.from_pretrained(model_dir).eval()


def test_single_window_equals_hf_exp_mean_loss(model_and_tokenizer, hf_model):
    model, tokenizer = model_and_tokenizer
    ids = [prefix_token_id(tokenizer)] + tokenizer.encode(TEXT)
    assert len(ids) <= model.config.block_size
    with torch.no_grad():
        hf_loss = hf_model(torch.tensor([ids]), labels=torch.tensor([ids])).loss.item()
    result = perplexity_of_text(model, tokenizer, TEXT, progress=False)
    assert result.num_tokens == len(ids) - 1
    assert result.perplexity == pytest.approx(math.exp(hf_loss), rel=1e-4)
    assert result.num_bytes == len(TEXT.encode("utf-8"))
    assert result.bits_per_byte == pytest.approx(hf_loss * result.num_tokens / math.log(2) / result.num_bytes,
                                                 rel=1e-4)


@pytest.mark.parametrize("stride", [1, 5, 16])
def test_sliding_window_equals_hf_with_the_same_contexts(model_and_tokenizer, hf_model, stride):
    """Token p is scored given tokens from its window start; HF computes each window separately."""
    model, tokenizer = model_and_tokenizer
    length = 16
    ids = [prefix_token_id(tokenizer)] + tokenizer.encode(LONG_TEXT)[:40]
    expected, count = 0.0, 0
    with torch.no_grad():
        for begin, first, end in sliding_windows(len(ids), length, stride):
            window = torch.tensor([ids[begin:end - 1]])
            logprobs = torch.log_softmax(hf_model(window).logits[0].float(), -1)
            for p in range(first, end):
                expected -= logprobs[p - 1 - begin, ids[p]].item()
                count += 1
    result = perplexity_of_text(model, tokenizer, tokenizer.decode(ids[1:]), max_length=length, stride=stride,
                                batch_size=3, progress=False)
    assert result.num_tokens == count == len(ids) - 1
    assert result.nll_sum == pytest.approx(expected, rel=1e-4)


def test_windows_score_every_token_once_with_enough_context():
    for n, length, stride in [(2, 4, 4), (50, 8, 3), (51, 8, 8), (9, 8, 1), (100, 16, 16)]:
        scored = []
        for begin, first, end in sliding_windows(n, length, stride):
            assert end - 1 - begin <= length  # model input fits the context
            if first > 1:
                assert first - begin >= length - stride + 1  # context of the first new token
            scored.extend(range(first, end))
        assert scored == list(range(1, n))
    with pytest.raises(ValueError, match="stride"):
        list(sliding_windows(10, 8, 9))


def test_stride_changes_the_context_not_the_tokens_scored(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    coarse = perplexity_of_text(model, tokenizer, LONG_TEXT, max_length=32, stride=32, progress=False)
    fine = perplexity_of_text(model, tokenizer, LONG_TEXT, max_length=32, stride=4, progress=False)
    assert coarse.num_tokens == fine.num_tokens
    assert coarse.nll_sum != pytest.approx(fine.nll_sum)


def test_file_errors(model_and_tokenizer, tmp_path):
    model, tokenizer = model_and_tokenizer
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        perplexity_of_file(model, tokenizer, tmp_path / "missing.txt")
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(ValueError, match="latin1.txt: not UTF-8"):
        perplexity_of_file(model, tokenizer, bad)
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(ValueError, match="empty.txt: the file is empty"):
        perplexity_of_file(model, tokenizer, empty)
    with pytest.raises(ValueError, match="max_length"):
        perplexity_of_text(model, tokenizer, TEXT, max_length=1000)
