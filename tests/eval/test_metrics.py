"""Metrics against known values and against sacrebleu / rouge-score called directly."""

import pytest
import sacrebleu
from rouge_score import rouge_scorer

from gptforge.eval import metrics


def test_squad_normalisation_and_exact_match():
    assert metrics.normalize_answer("The  Denver Broncos!") == "denver broncos"
    assert metrics.normalize_answer("an apple, a pear") == "apple pear"
    assert metrics.exact_match(["the Denver Broncos", "Carolina"], ["Denver Broncos", "Panthers"]) == 0.5
    # Best over several references.
    assert metrics.exact_match(["Panthers"], [["Carolina Panthers", "Panthers"]]) == 1.0


def test_token_f1_known_values():
    # 2 common words; precision 2/3, recall 1 -> F1 0.8.
    assert metrics.token_f1(["Denver Broncos won"], ["the Denver Broncos"]) == pytest.approx(0.8)
    assert metrics.token_f1(["nothing alike"], ["Denver Broncos"]) == 0.0
    # Repeated words count with multiplicity: pred "x y y", ref "y y z" -> overlap 2, P=R=2/3.
    assert metrics.token_f1(["x y y"], ["y y z"]) == pytest.approx(2 / 3)
    assert metrics.token_f1([""], [""]) == 1.0 and metrics.token_f1(["a"], ["x"]) == 0.0


def test_accuracy_and_length_mismatch():
    assert metrics.accuracy([1, 2, 3, 4], [1, 0, 3, 0]) == 0.5
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        metrics.exact_match(["a", "b"], ["a"])


def test_bleu_and_chrf_match_sacrebleu_with_multiple_references():
    hyps = ["the cat is on the mat", "there is a dog in the garden", "hello world"]
    refs = [["the cat sits on the mat", "a cat is on the mat"], ["a dog is in the garden"], ["hello there world"]]
    # sacrebleu's layout: one stream per reference slot, None where an example has fewer references.
    streams = [["the cat sits on the mat", "a dog is in the garden", "hello there world"],
               ["a cat is on the mat", None, None]]
    assert metrics.bleu(hyps, refs) == pytest.approx(sacrebleu.corpus_bleu(hyps, streams).score)
    assert metrics.chrf(hyps, refs) == pytest.approx(sacrebleu.corpus_chrf(hyps, streams).score)
    assert metrics.bleu(["the cat sat on the mat today"], ["the cat sat on the mat today"]) == pytest.approx(100)
    assert metrics.bleu(["xyz qqq"], ["the cat sat on the mat"]) == pytest.approx(0.0)


def test_rouge_known_values():
    # pred "the cat sat" vs ref "the cat sat on the mat": unigram P=1, R=1/2; bigram P=1, R=2/5; LCS = 3.
    scores = metrics.rouge(["the cat sat"], ["the cat sat on the mat"])
    assert scores["rouge1"] == pytest.approx(2 / 3)
    assert scores["rouge2"] == pytest.approx(2 * 0.4 / 1.4)
    assert scores["rougeL"] == pytest.approx(2 / 3)
    # Mean over examples equals the library's per-example F-measures averaged.
    preds, refs = ["cats are running fast", "a b c d"], ["the cat runs fast", "d c b a"]
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    expected = sum(scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(preds, refs)) / 2
    assert metrics.rouge(preds, refs)["rougeL"] == pytest.approx(expected)


def test_generation_metrics_selects_and_rejects_names():
    out = metrics.generation_metrics(["the cat"], ["the cat"], ["exact_match", "rougeL", "chrf"])
    assert list(out) == ["exact_match", "rougeL", "chrf"] and out["exact_match"] == 1.0
    with pytest.raises(ValueError, match="unknown metric"):
        metrics.generation_metrics(["a"], ["a"], ["meteor"])
