"""Text metrics: accuracy, exact match and token F1 (SQuAD normalisation), BLEU/chrF (sacrebleu), ROUGE (rouge-score).

Every function takes predictions and references in the same order and returns a score in [0, 100]
for BLEU/chrF (sacrebleu's scale) and in [0, 1] for the others. A reference may be a string or a list
of acceptable strings; EM/F1/ROUGE take the best reference, BLEU/chrF use all of them.
"""

from __future__ import annotations

import collections
import re
import string
from typing import Sequence, Union

Reference = Union[str, Sequence[str]]

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = set(string.punctuation)


def _check_lengths(predictions: Sequence, references: Sequence) -> None:
    if len(predictions) != len(references):
        raise ValueError(f"got {len(predictions)} predictions but {len(references)} references; they must pair up")


def _as_list(reference: Reference) -> list[str]:
    return [reference] if isinstance(reference, str) else list(reference)


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lower case, drop punctuation and articles (a/an/the), squeeze whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def accuracy(predictions: Sequence, references: Sequence) -> float:
    """Fraction of predictions equal to their reference (labels, choice indices)."""
    _check_lengths(predictions, references)
    if not predictions:
        return 0.0
    return sum(p == r for p, r in zip(predictions, references)) / len(predictions)


def _exact(prediction: str, reference: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(reference))


def _token_f1(prediction: str, reference: str) -> float:
    pred_tokens = normalize_answer(prediction).split()
    ref_tokens = normalize_answer(reference).split()
    if not pred_tokens or not ref_tokens:
        # SQuAD convention: two empty answers agree, one empty answer scores zero.
        return float(pred_tokens == ref_tokens)
    common = collections.Counter(pred_tokens) & collections.Counter(ref_tokens)
    overlap = sum(common.values())
    if overlap == 0:
        return 0.0
    precision, recall = overlap / len(pred_tokens), overlap / len(ref_tokens)
    return 2 * precision * recall / (precision + recall)


def exact_match(predictions: Sequence[str], references: Sequence[Reference]) -> float:
    """Mean SQuAD exact match (after normalisation), best over each example's references."""
    _check_lengths(predictions, references)
    if not predictions:
        return 0.0
    return sum(max(_exact(p, r) for r in _as_list(refs)) for p, refs in zip(predictions, references)) / len(predictions)


def token_f1(predictions: Sequence[str], references: Sequence[Reference]) -> float:
    """Mean SQuAD token-level F1 (bag of normalised words), best over each example's references."""
    _check_lengths(predictions, references)
    if not predictions:
        return 0.0
    return sum(max(_token_f1(p, r) for r in _as_list(refs)) for p, refs in zip(predictions, references)) / len(predictions)


def _reference_streams(references: Sequence[Reference]) -> list[list[str]]:
    """sacrebleu wants one stream per reference slot; examples with fewer references are padded with None."""
    refs = [_as_list(r) for r in references]
    width = max((len(r) for r in refs), default=1)
    return [[r[i] if i < len(r) else None for r in refs] for i in range(width)]  # type: ignore[misc]


def bleu(predictions: Sequence[str], references: Sequence[Reference]) -> float:
    """Corpus BLEU (sacrebleu defaults: 13a tokenisation, exponential smoothing), 0-100."""
    import sacrebleu

    _check_lengths(predictions, references)
    if not predictions:
        return 0.0
    return float(sacrebleu.corpus_bleu(list(predictions), _reference_streams(references)).score)


def chrf(predictions: Sequence[str], references: Sequence[Reference]) -> float:
    """Corpus chrF (character 6-grams, beta 2; sacrebleu defaults), 0-100."""
    import sacrebleu

    _check_lengths(predictions, references)
    if not predictions:
        return 0.0
    return float(sacrebleu.corpus_chrf(list(predictions), _reference_streams(references)).score)


ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


def rouge(predictions: Sequence[str], references: Sequence[Reference], *,
          use_stemmer: bool = True) -> dict[str, float]:
    """Mean ROUGE-1/2/L F-measure (rouge-score, Porter stemming), best over each example's references."""
    from rouge_score import rouge_scorer

    _check_lengths(predictions, references)
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=use_stemmer)
    totals = dict.fromkeys(ROUGE_TYPES, 0.0)
    for prediction, refs in zip(predictions, references):
        scores = scorer.score_multi(_as_list(refs), prediction)
        for name in ROUGE_TYPES:
            totals[name] += scores[name].fmeasure
    n = max(len(predictions), 1)
    return {name: total / n for name, total in totals.items()}


def generation_metrics(predictions: Sequence[str], references: Sequence[Reference],
                       names: Sequence[str]) -> dict[str, float]:
    """The named metrics (exact_match, f1, bleu, chrf, rouge1, rouge2, rougeL) of generated texts."""
    unknown = [n for n in names if n not in GENERATION_METRICS]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; expected some of {sorted(GENERATION_METRICS)}")
    out: dict[str, float] = {}
    if any(n in ROUGE_TYPES for n in names):
        scores = rouge(predictions, references)
        out.update({n: scores[n] for n in names if n in ROUGE_TYPES})
    single = {"exact_match": exact_match, "f1": token_f1, "bleu": bleu, "chrf": chrf}
    for name in names:
        if name in single:
            out[name] = single[name](predictions, references)
    return {n: out[n] for n in names}


GENERATION_METRICS = ("exact_match", "f1", "bleu", "chrf") + ROUGE_TYPES
