"""Evaluation: perplexity, task metrics with few-shot prompts, and the lm-evaluation-harness adapter.

`gptforge.eval.harness` (which imports lm-eval) is loaded only when asked for.
"""

from .metrics import accuracy, bleu, chrf, exact_match, generation_metrics, normalize_answer, rouge, token_f1
from .perplexity import PerplexityResult, perplexity_of_file, perplexity_of_text, perplexity_of_tokens
from .scoring import ContinuationScore, encode_pair, score_continuations
from .tasks import TASK_TYPES, TaskDataError, TaskResult, evaluate_task, load_task

__all__ = [
    "accuracy", "bleu", "chrf", "exact_match", "generation_metrics", "normalize_answer", "rouge", "token_f1",
    "PerplexityResult", "perplexity_of_file", "perplexity_of_text", "perplexity_of_tokens",
    "ContinuationScore", "encode_pair", "score_continuations",
    "TASK_TYPES", "TaskDataError", "TaskResult", "evaluate_task", "load_task",
]
