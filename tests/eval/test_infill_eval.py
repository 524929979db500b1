"""gptforge.eval.infill: the held-out line cases, and exact match scored against what the model writes."""

import dataclasses

import pytest
import torch

from gptforge.config import Config
from gptforge.eval.infill import InfillCase, evaluate_infill, infill_cases
from gptforge.fim import FIM_SPECIAL_TOKENS
from gptforge.generate import generate
from gptforge.model import GPT
from gptforge.tokenizer import DEFAULT_SPECIAL_TOKENS, Tokenizer

FILES = ["def area(w, h):\n    return w * h\n\n\ndef perimeter(w, h):\n    total = 2 * (w + h)\n    return total\n",
         "import os\n\nPATH = os.getcwd()\nNAME = 'x'\n" + "x = 1\n" * 200, "one line\n", ""]


def test_cases_are_lines_of_the_files_with_the_text_around_them():
    cases = infill_cases(FILES, 30, seed=3, context_chars=50)
    assert len(cases) == 30 and cases == infill_cases(FILES, 30, seed=3, context_chars=50)
    assert cases != infill_cases(FILES, 30, seed=4, context_chars=50)
    for case in cases:
        assert case.middle.strip() and "\n" not in case.middle and case.prefix.endswith("\n")
        assert case.suffix.startswith("\n") and len(case.prefix) <= 50 and len(case.suffix) <= 51
        assert any(case.prefix + case.middle + case.suffix in text for text in FILES)
    assert infill_cases(["a\n\nb\n"], 5) == []  # only blank lines between the first and last: no case


@pytest.fixture(scope="module")
def fim_model():
    torch.manual_seed(0)
    tokenizer = Tokenizer.train_bpe(FILES * 10, vocab_size=300,
                                    special_tokens=[*DEFAULT_SPECIAL_TOKENS, *FIM_SPECIAL_TOKENS])
    model = GPT(Config.from_name("llama-nano").replace(vocab_size=tokenizer.vocab_size, block_size=256))
    return model.eval(), tokenizer


def test_exact_match_counts_the_lines_the_model_restores(fim_model):
    model, tokenizer = fim_model
    cases = infill_cases(FILES, 6, seed=1)
    # Whatever this random model writes into each gap becomes the expected line of a second set of cases:
    # that set scores 1, the original (whose lines it does not write) 0.
    written = [generate(model, c.prefix, tokenizer, suffix=c.suffix, max_new_tokens=40, temperature=0,
                        truncate_prompt=True)[0].text for c in cases]
    assert all(w != c.middle for w, c in zip(written, cases))
    assert evaluate_infill(model, tokenizer, cases).exact_match == 0.0
    own = [dataclasses.replace(c, middle=w) for c, w in zip(cases, written)]
    report = evaluate_infill(model, tokenizer, own)
    assert report.exact_match == 1.0 and report.example["restored"] and report.cases == 6
    assert 0.0 <= report.prefix_only_exact_match <= 1.0


def test_a_model_without_fim_tokens_gets_the_prefix_only_figure_alone():
    torch.manual_seed(0)
    tokenizer = Tokenizer.train_bpe(FILES * 10, vocab_size=300)
    model = GPT(Config.from_name("nano").replace(vocab_size=tokenizer.vocab_size)).eval()
    report = evaluate_infill(model, tokenizer, [InfillCase("x = 1\n", "y = 2", "\nz = 3\n")])
    assert report.exact_match is None and report.example is None and report.prefix_only_exact_match == 0.0
    with pytest.raises(ValueError, match="cases"):
        evaluate_infill(model, tokenizer, [])


def test_line_bits_per_byte_is_the_lines_log_likelihood(fim_model):
    import math

    from gptforge.eval.infill import line_bits_per_byte

    model, tokenizer = fim_model
    case = InfillCase("def area(w, h):\n", "    return w * h", "\n\n\ndef perimeter(w, h):\n")
    line = tokenizer.encode(case.middle, add_special_tokens=False)
    context = [tokenizer.eos_token_id] + tokenizer.encode(case.prefix, add_special_tokens=False)
    with torch.no_grad():
        logits = model(torch.tensor([context + line])).float().log_softmax(-1)[0]
    nll = -sum(float(logits[len(context) - 1 + i, t]) for i, t in enumerate(line))
    want = nll / (math.log(2) * len(case.middle.encode()))
    assert line_bits_per_byte(model, tokenizer, [case], use_suffix=False) == pytest.approx(want, rel=1e-4)
    with_suffix = line_bits_per_byte(model, tokenizer, [case], use_suffix=True)
    assert math.isfinite(with_suffix) and with_suffix != pytest.approx(want, rel=1e-4)
