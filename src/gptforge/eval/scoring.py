"""Batched log-likelihood of continuations: the one scoring path behind perplexity, tasks and lm-eval.

`gptforge.generate.score_tokens` returns per-token log-probabilities for whole sequences; evaluation
also needs whether each continuation is the greedy one (lm-eval's `is_greedy`) and left truncation of
long contexts, and it sorts requests by length so that right-padded batches waste little compute.
Right padding needs no attention mask: under causal attention a real token never sees the padding after it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Optional, Sequence

import torch

if TYPE_CHECKING:
    from ..model import GPT
    from ..tokenizer import Tokenizer


@dataclass(frozen=True)
class ContinuationScore:
    """Sum of log-probabilities of a continuation, whether greedy decoding would produce it, its length."""

    logprob: float
    is_greedy: bool
    num_tokens: int


def encode_pair(tokenizer: "Tokenizer", context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of (context, continuation), split the way lm-eval splits them.

    Trailing whitespace of the context moves to the continuation, the whole string is encoded once and
    the continuation is what follows the context's tokens, so a word keeps its leading-space token.
    """
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    if not context:
        prefix = prefix_token_id(tokenizer)
        return [prefix], tokenizer.encode(continuation, add_special_tokens=False)
    whole = tokenizer.encode(context + continuation)
    context_ids = tokenizer.encode(context)
    return context_ids, whole[len(context_ids):]


def prefix_token_id(tokenizer: "Tokenizer") -> int:
    """The token that conditions an empty context: BOS if the tokenizer has one, else EOS."""
    for token_id in (tokenizer.bos_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return token_id
    raise ValueError("the tokenizer has neither a BOS nor an EOS token to condition an empty context on")


def context_length(model: "GPT", max_length: Optional[int] = None) -> int:
    """Longest input the model is evaluated on: `max_length` if given (checked), else its block size."""
    block = model.config.block_size
    if max_length is None:
        return block
    if not 1 <= max_length <= block:
        raise ValueError(f"max_length must be between 1 and the model's block_size ({block}), got {max_length}")
    return max_length


@torch.inference_mode()
def score_continuations(model: "GPT", pairs: Sequence[tuple[Sequence[int], Sequence[int]]], *,
                        batch_size: int = 16, max_length: Optional[int] = None,
                        on_batch: Optional[Callable[[int, int], None]] = None) -> list[ContinuationScore]:
    """Log-likelihood of each continuation given its context, in batches, contexts truncated from the left.

    Like lm-eval, the model sees the last `max_length` tokens of context + continuation minus the final
    token; a continuation longer than `max_length` cannot be scored and raises ValueError.
    `on_batch(num_requests, num_tokens)` is called after each batch (progress bars).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    limit = context_length(model, max_length)
    inputs: list[list[int]] = []
    for index, (context, continuation) in enumerate(pairs):
        if not continuation:
            raise ValueError(f"request {index}: the continuation is empty (nothing to score)")
        if len(continuation) > limit:
            raise ValueError(f"request {index}: the continuation has {len(continuation)} tokens, more than the "
                             f"context length {limit}")
        if not context:
            raise ValueError(f"request {index}: the context is empty; condition on a prefix token (BOS/EOS)")
        inputs.append((list(context) + list(continuation))[-(limit + 1):][:-1])

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    results: list[Optional[ContinuationScore]] = [None] * len(inputs)
    # Longest first: the first batch shows at once whether memory suffices, and padding stays small.
    order = sorted(range(len(inputs)), key=lambda i: -len(inputs[i]))
    try:
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            width = len(inputs[rows[0]])
            batch = torch.zeros((len(rows), width), dtype=torch.long)
            for r, i in enumerate(rows):
                batch[r, :len(inputs[i])] = torch.tensor(inputs[i], dtype=torch.long)
            logits = model(batch.to(device))  # (B, T, V)
            for r, i in enumerate(rows):
                targets = torch.tensor(pairs[i][1], dtype=torch.long, device=device)
                end = len(inputs[i])
                # Only the continuation's rows get a float32 log-softmax: (n, V), not (T, V).
                logprobs = torch.log_softmax(logits[r, end - len(targets):end].float(), dim=-1)
                token_logprobs = logprobs.gather(-1, targets[:, None]).squeeze(-1)
                greedy = bool((logprobs.argmax(dim=-1) == targets).all())
                results[i] = ContinuationScore(float(token_logprobs.sum()), greedy, len(targets))
            if on_batch is not None:
                on_batch(len(rows), sum(len(inputs[i]) for i in rows))
    finally:
        model.train(was_training)
    return results  # type: ignore[return-value]
