"""Text generation: batched sampling/greedy decoding and beam search over a preallocated KV cache.

`generate(model, prompts, tokenizer, **params)` returns one `GenerationOutput` per prompt (times
`num_return_sequences`); `stream(...)` yields text deltas for one prompt; `score_tokens` gives the
log-probability of every token of given sequences (prompt log-probs, log-likelihood evaluation).

Prompts of different lengths share one batch: they are left-padded, each row's positions start at 0
at its first real token, and `key_mask` hides the padding, so every row decodes exactly as it would alone.
The prompt is run once (prefill) and each new token costs one single-position forward pass.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import torch
import torch.nn.functional as F

from .cpu_features import UPCAST_MIN_ROWS_16BIT, upcast_rows
from .emitter import SequenceEmitter
from .healing import HealedPrompt, heal_prompt
from .sampling import (FILTERED, SamplingParams, StopStringMatcher, make_generator, process_logits,
                       sample_next_token, token_logprobs)
from .speculative import DraftSchedule, accept_draft, find_draft

Prompt = Union[str, Sequence[int]]
Prompts = Union[str, Sequence[str], Sequence[int], Sequence[Sequence[int]]]


@dataclass
class GenerationOutput:
    """One generated continuation."""

    index: int  # which prompt it continues
    text: str  # decoded continuation, cut before any stop string (empty without a tokenizer)
    token_ids: list[int]  # generated tokens, without the final EOS
    finish_reason: str  # "stop" (EOS or stop string) or "length" (max_new_tokens or the context is full)
    prompt_token_ids: list[int] = field(default_factory=list)
    stop_reason: Optional[Union[str, int]] = None  # the stop string or EOS id that ended it
    logprobs: Optional[list[float]] = None  # log p(token) per generated token, from the unprocessed model logits
    top_logprobs: Optional[list[dict[int, float]]] = None  # the most likely alternatives at each step
    prompt_logprobs: Optional[list[Optional[float]]] = None  # with echo: per prompt token (None for the first)
    prompt_top_logprobs: Optional[list[Optional[dict[int, float]]]] = None
    score: Optional[float] = None  # beam search: length-penalised sum of log-probabilities
    draft_tokens: Optional[int] = None  # prompt lookup: tokens drafted from the context and verified
    accepted_draft_tokens: Optional[int] = None  # prompt lookup: drafted tokens the model kept


# ---- inputs --------------------------------------------------------------------------------------

def normalize_prompts(prompts: Prompts, tokenizer: Any) -> list[list[int]]:
    """Token id lists from a string, a list of strings, a list of ids or a list of id lists."""
    if isinstance(prompts, str):
        prompts = [prompts]
    elif isinstance(prompts, torch.Tensor):
        prompts = prompts.tolist() if prompts.dim() == 2 else [prompts.tolist()]
    prompts = list(prompts)
    if not prompts:
        raise ValueError("prompts: expected at least one prompt, got an empty list")
    if all(isinstance(p, int) and not isinstance(p, bool) for p in prompts):
        prompts = [prompts]
    result = []
    for i, prompt in enumerate(prompts):
        if isinstance(prompt, str):
            if tokenizer is None:
                raise ValueError("prompts: text prompts need a tokenizer (pass tokenizer= or load a model "
                                 "directory that has tokenizer.json)")
            ids = tokenizer.encode(prompt)
        elif isinstance(prompt, (list, tuple)) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            ids = list(prompt)
        else:
            raise ValueError(f"prompts[{i}]: expected a string or a list of token ids, got {type(prompt).__name__}")
        if not ids:
            raise ValueError(f"prompts[{i}]: the prompt is empty (it must have at least one token)")
        result.append(ids)
    return result


def _check_ids(model: torch.nn.Module, prompts: list[list[int]]) -> None:
    vocab = model.config.vocab_size
    for i, ids in enumerate(prompts):
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompts[{i}]: token id {bad[0]} is outside the vocabulary [0, {vocab})")


def _fit_context(model: torch.nn.Module, prompts: list[list[int]], truncate_prompt: bool) -> list[list[int]]:
    """Prompts that leave room for at least one new token, or a clear error."""
    block = model.config.block_size
    fitted = []
    for i, ids in enumerate(prompts):
        if len(ids) >= block:
            if not truncate_prompt:
                raise ValueError(f"prompts[{i}] has {len(ids)} tokens but the model context is {block} tokens "
                                 f"(block_size); shorten it or pass truncate_prompt=True to keep its last "
                                 f"{block - 1} tokens")
            ids = ids[len(ids) - (block - 1):]
        fitted.append(ids)
    return fitted


def _default_eos(params: SamplingParams, tokenizer: Any, model: torch.nn.Module) -> list[int]:
    if params.eos_token_id is not None:
        return params.eos_token_ids
    if tokenizer is not None:
        return list(tokenizer.stop_token_ids())
    eos = getattr(model.config, "eos_token_id", None)
    return [eos] if isinstance(eos, int) else list(eos or [])


# ---- cache handling ------------------------------------------------------------------------------

class _BorrowedCache:
    """Sets up a KV cache for one generation and restores whatever cache the model had before."""

    def __init__(self, model: torch.nn.Module, batch_size: int, max_len: int) -> None:
        self.model, self.batch_size, self.max_len = model, batch_size, max_len

    def __enter__(self) -> list[Any]:
        model = self.model
        self.saved = ([b.attn.kv_cache for b in model.blocks], model.cache_batch_size, model.cache_max_len)
        ref = next(model.parameters())
        model.setup_cache(self.batch_size, self.max_len, device=ref.device)
        return [b.attn.kv_cache for b in model.blocks]

    def __exit__(self, *exc: Any) -> None:
        caches, batch, length = self.saved
        for block, cache in zip(self.model.blocks, caches):
            block.attn.kv_cache = cache
        self.model.cache_batch_size, self.model.cache_max_len = batch, length


def _copy_cache_rows(caches: list[Any], rows: torch.Tensor, length: int) -> None:
    """Make cache row i a copy of row rows[i] (slots [:length]): fan-out of prompts and beam reordering."""
    for cache in caches:
        cache.k[:, :, :length] = cache.k[rows, :, :length]
        cache.v[:, :, :length] = cache.v[rows, :, :length]


def _decode_forward(model: torch.nn.Module, input_ids: torch.Tensor, positions: Optional[torch.Tensor],
                    slots: torch.Tensor, key_mask: Optional[torch.Tensor], kv_len: int) -> torch.Tensor:
    """One decode step: logits (B, V) of the next token."""
    return model(input_ids, positions, cache_slots=slots, key_mask=key_mask, kv_len=kv_len, last_only=True)[:, -1]


def _weights_version(model: torch.nn.Module) -> tuple[int, ...]:
    return tuple(p._version for p in model.parameters())


COMPILE_ENV = "GPTFORGE_COMPILE"


def compile_by_default() -> bool:
    """Whether `compile=None` (the default of `generate`/`stream`) compiles the decode step: `GPTFORGE_COMPILE=1`.

    Off unless asked for, because on CPU it pays only for long runs of small models: measured on a 2-core
    AVX2 host, the compiled step decodes llama-small (25M params) up to 1.5x faster than eager (1.35x in
    process) but GPT-2-124M fp32 no faster (its time is in the GEMVs, where Inductor's C++ GEMM matches MKL),
    while the first compile of a model shape costs ~24 s (3-4 s in later processes, from Inductor's
    on-disk cache). A short CLI run or a test would only pay. The server's batch changes every step, and a
    dynamic-shape graph recompiled for each new batch size (100 s + 130 s measured), so the serving engine
    decodes eagerly.
    """
    return os.environ.get(COMPILE_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def decode_step(model: torch.nn.Module, compile: bool) -> Callable[..., torch.Tensor]:
    """The single-token forward pass, eager or `torch.compile`d (compiled once per model and shape)."""
    if not compile:
        return partial(_decode_forward, model)
    version = _weights_version(model)
    cached = getattr(model, "_compiled_decode_step", None)
    if cached is None or cached[0] != version:
        # Static shapes: the cache length is fixed for a whole generation (the mask hides unwritten slots),
        # so one graph serves every step and Inductor can fuse the small per-layer ops. Weights stay graph
        # inputs (no freezing): Inductor's on-disk caches then serve the next process too (llama-small: 24 s
        # cold, 3.7 s warm; frozen weights cost 17-19 s in every process, for the same speed). The version
        # check rebuilds the step when weights change in place, so nothing stale is ever reused.
        step = torch.compile(partial(_decode_forward, model), dynamic=False)
        cached = (version, step)
        model._compiled_decode_step = cached  # dies with the model
    return cached[1]


def _linear_upcasting_rows(module: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """`module(x)`, computed in fp32 when x has many rows and this CPU has no native 16-bit GEMM."""
    weight, bias = module.weight, module.bias
    if weight.dtype in (torch.bfloat16, torch.float16) and upcast_rows(x, weight.dtype, UPCAST_MIN_ROWS_16BIT):
        return F.linear(x.float(), weight.float(), None if bias is None else bias.float()).to(x.dtype)
    return F.linear(x, weight, bias)


def prepare_for_decoding(model: torch.nn.Module) -> torch.nn.Module:
    """Lay a model out for fast CPU decoding, in place (same values, shapes, names and Parameters); returns it.

    - fp32 `nn.Linear` weights are stored column-major: a single-token forward is a matrix-vector product
      per layer, bound by how fast the weights stream, and fp32 `x @ W.T` runs ~1.15-1.3x faster when
      `W.T` is contiguous (MKL's transposed-B path). Only each Parameter's storage changes (`param.data`),
      so tied weights stay tied and an optimizer keeps its parameters; checkpoints are written contiguous.
    - bf16/fp16 weights keep their layout (their column-major GEMV is 10-20x slower on AVX2), and on a CPU
      without native 16-bit GEMM (`gptforge.cpu_features`) their linears compute products of many rows
      (a prefill) in fp32, ~6x faster there, while single-token steps keep reading 16-bit weights.
    `generate`, `stream` and the server call this on every model they run (a no-op once done), so it is
    the default path.
    """
    # Outside inference mode: the new storage must stay usable for training (inference tensors are not).
    with torch.inference_mode(False), torch.no_grad():
        for module in model.modules():
            weight = getattr(module, "weight", None)
            if (type(module) is not torch.nn.Linear or not isinstance(weight, torch.Tensor) or weight.dim() != 2
                    or weight.device.type != "cpu" or min(weight.shape) < 2):
                continue
            if weight.dtype == torch.float32 and weight.is_contiguous():
                weight.data = weight.detach().t().contiguous().t()
            elif weight.dtype in (torch.bfloat16, torch.float16) and "forward" not in module.__dict__:
                module.forward = partial(_linear_upcasting_rows, module)  # decided per call: dtypes may change
    return model


def _compiled_cache_len(needed: int, block_size: int) -> int:
    """Round the cache length up so that nearby lengths share one compiled graph."""
    return min(block_size, -(-needed // 256) * 256)


class _Batch:
    """Left-padded token layout of several prompts in one cache: slots, positions and the key mask."""

    def __init__(self, prompts: list[list[int]], device: torch.device, pad_id: int) -> None:
        self.lengths = [len(p) for p in prompts]
        self.width = max(self.lengths)
        self.pads = torch.tensor([self.width - n for n in self.lengths], device=device)
        self.padded = self.pads.any().item()
        self.input_ids = torch.tensor([[pad_id] * (self.width - len(p)) + p for p in prompts], device=device)
        self.device = device

    def positions(self, slots: torch.Tensor) -> Optional[torch.Tensor]:
        """(B, T) position of each slot in its row (None when no row is padded: positions are the slots)."""
        if not self.padded:
            return None
        return (slots[None, :] - self.pads[:, None]).clamp(min=0)

    def key_mask(self, cache_len: int) -> Optional[torch.Tensor]:
        if not self.padded:
            return None
        return torch.arange(cache_len, device=self.device)[None, :] >= self.pads[:, None]  # (B, S)


# ---- the public API -------------------------------------------------------------------------------

def _heal(prompts: Prompts, token_prompts: list[list[int]], tokenizer: Any,
          enabled: bool) -> list[Optional[HealedPrompt]]:
    """Token healing (gptforge.healing) of the text prompts; token-id prompts are used as given."""
    texts = [prompts] if isinstance(prompts, str) else list(prompts) if isinstance(prompts, (list, tuple)) else []
    is_text = [isinstance(p, str) for p in texts] if len(texts) == len(token_prompts) else [False] * len(token_prompts)
    if not enabled or tokenizer is None:
        return [None] * len(token_prompts)
    return [heal_prompt(tokenizer, ids) if text else None for ids, text in zip(token_prompts, is_text)]


def _infill(model: torch.nn.Module, prompts: Prompts, suffix: str, tokenizer: Any, params: SamplingParams,
            truncate_prompt: bool) -> tuple[list[list[int]], SamplingParams]:
    """FIM prompts (gptforge.fim) for text prompts before a gap and `suffix` after it; FIM markers also stop."""
    from .fim import fim_stop_ids, infill_prompt

    texts = [prompts] if isinstance(prompts, str) else list(prompts) if isinstance(prompts, (list, tuple)) else []
    if tokenizer is None or not texts or not all(isinstance(p, str) for p in texts):
        raise ValueError("suffix: filling in the middle needs text prompts and a tokenizer")
    budget = model.config.block_size - params.max_new_tokens if truncate_prompt else None
    ids = [infill_prompt(tokenizer, text, suffix, max_prompt_tokens=budget).ids for text in texts]
    if params.eos_token_id is None:
        params = params.replace(eos_token_id=sorted({*tokenizer.stop_token_ids(), *fim_stop_ids(tokenizer)}))
    return ids, params


@torch.inference_mode()
def generate(model: torch.nn.Module, prompts: Prompts, tokenizer: Any = None, *,
             params: Optional[SamplingParams] = None, echo: bool = False, truncate_prompt: bool = False,
             skip_special_tokens: bool = True, compile: Optional[bool] = None, token_healing: bool = True,
             suffix: Optional[str] = None, **kwargs: Any) -> list[GenerationOutput]:
    """Continue each prompt; returns len(prompts) * num_return_sequences outputs, grouped by prompt.

    Parameters are `SamplingParams` fields (max_new_tokens, temperature, top_p, stop, num_beams, ...),
    given as keywords or as `params=`. `echo=True` adds the prompt's own log-probabilities.
    `token_healing` (text prompts, sampling and greedy decoding, not with echo) lets the model re-choose
    the prompt's last token (see gptforge.healing); the output text still continues the prompt exactly.
    `compile`: torch.compile the decode step (None: `compile_by_default()`, i.e. `GPTFORGE_COMPILE=1`).
    `suffix`: fill in the middle: each text prompt is the text before the gap and `suffix` the text after
    it (the model needs FIM tokens, gptforge.fim); the outputs are the middles.
    """
    compile = compile_by_default() if compile is None else compile
    params = params.replace(**kwargs) if params is not None else SamplingParams.from_kwargs(**kwargs)
    if suffix is not None:
        prompts, params = _infill(model, prompts, suffix, tokenizer, params, truncate_prompt)
        token_healing = False  # the prompt ends in the <fim_middle> marker: nothing to heal
    if params.stop_strings and tokenizer is None:
        raise ValueError("stop: stop strings need a tokenizer to turn tokens into text")
    token_prompts = normalize_prompts(prompts, tokenizer)
    _check_ids(model, token_prompts)
    token_prompts = _fit_context(model, token_prompts, truncate_prompt)
    prepare_for_decoding(model)  # the decode layout is the default path (a no-op once done)
    was_training = model.training
    model.eval()
    try:
        if params.num_beams > 1:
            outputs = _beam_search(model, token_prompts, params, tokenizer, skip_special_tokens)
        else:
            healed = _heal(prompts, token_prompts, tokenizer, token_healing and not echo)
            outputs = list(_SamplingRun(model, token_prompts, params, tokenizer, skip_special_tokens,
                                        compile=compile, healed=healed).run())
        if echo:
            _attach_prompt_logprobs(model, outputs, token_prompts, params.top_logprobs)
    finally:
        model.train(was_training)
    return outputs


def stream(model: torch.nn.Module, prompt: Prompt, tokenizer: Any = None, *,
           params: Optional[SamplingParams] = None, truncate_prompt: bool = False,
           skip_special_tokens: bool = True, compile: Optional[bool] = None, token_healing: bool = True,
           suffix: Optional[str] = None, **kwargs: Any) -> Iterator[str]:
    """Yield text deltas of one continuation as they are decoded.

    Deltas never split a multi-byte character, and text that may begin a stop string is held back
    until it is known not to (a matched stop string is never yielded).
    """
    params = params.replace(**kwargs) if params is not None else SamplingParams.from_kwargs(**kwargs)
    compile = compile_by_default() if compile is None else compile
    if params.num_beams > 1 or params.num_return_sequences > 1:
        raise ValueError("stream: num_beams and num_return_sequences must be 1 when streaming")
    if tokenizer is None:
        raise ValueError("stream: streaming text needs a tokenizer")
    if not isinstance(prompt, str) and prompt and not isinstance(prompt[0], int):
        raise ValueError("stream: expected one prompt (a string or a list of token ids)")
    if suffix is not None:
        (prompt,), params = _infill(model, [prompt], suffix, tokenizer, params, truncate_prompt)
        token_healing = False
    token_prompts = _fit_context(model, normalize_prompts(prompt, tokenizer), truncate_prompt)
    _check_ids(model, token_prompts)
    prepare_for_decoding(model)
    run = _SamplingRun(model, token_prompts, params, tokenizer, skip_special_tokens, want_deltas=True,
                       compile=compile, healed=_heal(prompt, token_prompts, tokenizer, token_healing))
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for _ in run.steps():
                delta = run.pop_delta(0)
                if delta:
                    yield delta
        tail = run.pop_delta(0)
        if tail:
            yield tail
    finally:
        model.train(was_training)


@torch.inference_mode()
def score_tokens(model: torch.nn.Module, token_id_lists: Sequence[Sequence[int]], *,
                 batch_size: int = 8) -> list[list[Optional[float]]]:
    """log p(token_i | tokens_<i) for every token of every sequence; the first token of each gets None."""
    scores, _ = _score(model, [list(s) for s in token_id_lists], 0, batch_size)
    return scores


def _score(model: torch.nn.Module, seqs: list[list[int]], top_k: int,
           batch_size: int = 8) -> tuple[list[list[Optional[float]]], list[list[Optional[dict[int, float]]]]]:
    block = model.config.block_size
    for i, seq in enumerate(seqs):
        if not seq:
            raise ValueError(f"token_id_lists[{i}] is empty")
        if len(seq) > block:
            raise ValueError(f"token_id_lists[{i}] has {len(seq)} tokens but the model context is {block} tokens")
    _check_ids(model, seqs)
    device = next(model.parameters()).device
    all_scores: list[list[Optional[float]]] = []
    all_tops: list[list[Optional[dict[int, float]]]] = []
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(seqs), batch_size):
            chunk = seqs[start:start + batch_size]
            width = max(len(s) for s in chunk)
            # Right padding: causal attention keeps every real token blind to the padding after it.
            ids = torch.tensor([s + [0] * (width - len(s)) for s in chunk], device=device)
            logits = model(ids)  # (B, T, V)
            for row, seq in enumerate(chunk):
                n = len(seq)
                chosen, tops = token_logprobs(logits[row, :n - 1], ids[row, 1:n], top_k)
                all_scores.append([None] + chosen)
                if top_k:
                    all_tops.append([None] + [dict(t) for t in tops])
    finally:
        model.train(was_training)
    return all_scores, all_tops


def _attach_prompt_logprobs(model: torch.nn.Module, outputs: list[GenerationOutput], prompts: list[list[int]],
                            top_k: int) -> None:
    scores, tops = _score(model, prompts, top_k)
    for out in outputs:
        out.prompt_logprobs = scores[out.index]
        if top_k:
            out.prompt_top_logprobs = tops[out.index]


# ---- sampling / greedy decoding ------------------------------------------------------------------

class _SamplingRun:
    """Greedy or sampled decoding of a batch of prompts (each repeated num_return_sequences times).

    Each output row is a `SequenceEmitter` (gptforge.emitter), the same per-sequence rules the server uses.
    """

    def __init__(self, model: torch.nn.Module, prompts: list[list[int]], params: SamplingParams, tokenizer: Any,
                 skip_special_tokens: bool, want_deltas: bool = False, compile: bool = False,
                 healed: Optional[list[Optional[HealedPrompt]]] = None) -> None:
        healed = healed or [None] * len(prompts)
        prompts = [h.prompt_ids if h is not None else p for p, h in zip(prompts, healed)]
        self.model, self.prompts, self.params, self.tokenizer = model, prompts, params, tokenizer
        self.compile = compile
        eos = _default_eos(params, tokenizer, model)
        self.pad_id = eos[0] if eos else 0
        n = params.num_return_sequences
        self.index = [i for i in range(len(prompts)) for _ in range(n)]
        self.rows = [SequenceEmitter(tokenizer, prompts[i], max_tokens=params.max_new_tokens,
                                     stop_strings=params.stop_strings, stop_token_ids=eos,
                                     min_tokens=params.min_new_tokens, skip_special_tokens=skip_special_tokens,
                                     want_text=want_deltas,
                                     hidden_prefix=healed[i].hidden_text if healed[i] is not None else "")
                     for i in self.index]
        self.constraints = [healed[i].constraint() if healed[i] is not None else None for i in self.index]
        self.read = [0] * len(self.rows)  # how much of each row's text a streaming consumer has taken
        self.drafted = [0] * len(self.rows)  # prompt lookup: tokens drafted and accepted per row
        self.accepted = [0] * len(self.rows)
        # One generator per row: seed, seed+1, ... for a prompt's sequences, so a prompt samples the same
        # tokens whether it runs alone or in a batch. Without a seed the global RNG seeds them.
        self.generators: list[Optional[torch.Generator]] = []
        device = next(model.parameters()).device
        for _ in prompts:
            for j in range(n):
                seed = params.seed + j if params.seed is not None else int(torch.randint(0, 2**62, ()).item())
                self.generators.append(make_generator(seed, device) if not params.greedy else None)

    def pop_delta(self, row: int) -> str:
        """Text of `row` emitted since the last call."""
        text = self.rows[row].text
        delta, self.read[row] = text[self.read[row]:], len(text)
        return delta

    def _prefill(self, batch: "_Batch", caches: list[Any], key_mask: Optional[torch.Tensor]) -> torch.Tensor:
        """Run each distinct prompt once, then fan its cache row out to its num_return_sequences rows."""
        model, n_seq, device = self.model, self.params.num_return_sequences, batch.device
        n_prompts = len(self.prompts)
        slots = torch.arange(batch.width, device=device)
        logits = model(batch.input_ids, batch.positions(slots), cache_slots=slots,
                       cache_rows=torch.arange(n_prompts, device=device) if n_seq > 1 else None,
                       key_mask=key_mask[:n_prompts] if key_mask is not None else None, last_only=True)[:, -1]
        if n_seq > 1:
            fan_out = torch.arange(n_prompts, device=device).repeat_interleave(n_seq)
            _copy_cache_rows(caches, fan_out, batch.width)
            logits = logits[fan_out]
        return logits

    def _sample(self, logits: torch.Tensor) -> None:
        """Pick each row's next token from `logits` (B, V) and push it through the row's emitter."""
        params, rows = self.params, self.rows
        active = [i for i, c in enumerate(self.constraints) if c is not None and c.active]
        constrained = logits.float().clone() if active else logits.float()
        for i in active:  # token healing: the first tokens must spell the removed prompt bytes
            constrained[i].masked_fill_(~self.constraints[i].allowed(0), FILTERED)
        processed = process_logits(constrained, [params] * len(rows), [r.tokens for r in rows],
                                   prompts=[self.prompts[i] for i in self.index])
        tokens = sample_next_token(processed, [params] * len(rows), self.generators)
        for i in active:
            self.constraints[i].advance(int(tokens[i]))
        chosen: list[Optional[float]] = [None] * len(rows)
        tops: Optional[list[Any]] = None
        if params.logprobs or params.top_logprobs:
            chosen, tops = token_logprobs(logits, tokens, params.top_logprobs)
        for i, (row, token) in enumerate(zip(rows, tokens.tolist())):
            row.push(token, chosen[i], tops[i] if tops is not None else None)

    def steps(self) -> Iterator[int]:
        """Run the decode loop, yielding after each step (so `stream` can forward deltas)."""
        if self.params.prompt_lookup_num_tokens:
            yield from self._lookup_steps()
            return
        model, params, rows = self.model, self.params, self.rows
        device = next(model.parameters()).device
        batch = _Batch(self.prompts, device, self.pad_id)
        width, block = batch.width, model.config.block_size
        cache_len = min(width + params.max_new_tokens, block)
        step_fn = decode_step(model, self.compile)
        # Eager attention reads only the filled slots; a compiled step keeps one shape for the whole run.
        fixed_len = _compiled_cache_len(cache_len, block) if self.compile else None
        with _BorrowedCache(model, len(rows), fixed_len or cache_len) as caches:
            key_mask = batch.key_mask(fixed_len or cache_len)
            logits = self._prefill(batch, caches, key_mask)
            n_seq = params.num_return_sequences
            pads = batch.pads.repeat_interleave(n_seq) if batch.padded else None
            if key_mask is not None and n_seq > 1:
                key_mask = key_mask.repeat_interleave(n_seq, dim=0)
            for step in range(params.max_new_tokens):
                self._sample(logits)
                slot = width + step
                if slot >= block:  # the context is full: the new token has no slot to be fed into
                    for row in rows:
                        row.finish("length")
                yield step
                if all(r.done for r in rows):
                    break
                next_ids = torch.tensor([r.tokens[-1] if r.tokens else self.pad_id for r in rows],
                                        device=device)[:, None]
                slot_t = torch.tensor([slot], device=device)
                positions = (slot_t[None, :] - pads[:, None]) if pads is not None else None
                logits = step_fn(next_ids, positions, slot_t, key_mask, fixed_len or slot + 1)

    def _lookup_steps(self) -> Iterator[int]:
        """Prompt-lookup speculative decoding (gptforge.speculative), one output row after the other.

        Each step feeds the newest token plus up to `prompt_lookup_num_tokens` tokens drafted from the
        context in one forward pass and keeps the drafts the model agrees with, then the model's own next
        token (`DraftSchedule` sets the draft length). Rejected drafts need no cache rollback:
        their slots lie past the kept length, so the causal mask hides them (kv_len stops before them)
        until the next pass overwrites them. The pass changes shape every step, so it runs eagerly.
        """
        model, params = self.model, self.params
        device = next(model.parameters()).device
        block = model.config.block_size
        step = 0
        for r, row in enumerate(self.rows):
            prompt = self.prompts[self.index[r]]
            width = len(prompt)
            with _BorrowedCache(model, 1, min(width + params.max_new_tokens, block)):
                logits = model(torch.tensor([prompt], device=device), cache_slots=torch.arange(width, device=device),
                               last_only=True)[0]  # (1, V)
                draft: list[int] = []
                schedule = DraftSchedule(params.prompt_lookup_num_tokens)
                while True:
                    kept = self.accepted[r]
                    self._keep_verified(r, logits, draft, prompt, width)
                    schedule.update(len(draft), self.accepted[r] - kept)
                    yield step
                    step += 1
                    if row.done:
                        break
                    slot = width + row.sampled - 1  # where the newest token goes; verify passes write after it
                    room = min(schedule.room(), params.max_new_tokens - row.sampled - 1, block - 1 - slot)
                    constraint = self.constraints[r]
                    # Token healing restricts the first tokens by their bytes: those are decoded one by one.
                    draft = [] if constraint is not None and constraint.active else \
                        find_draft(list(prompt) + row.tokens, room, params.max_matching_ngram_size)
                    ids = torch.tensor([[row.tokens[-1]] + draft], device=device)
                    logits = model(ids, cache_slots=torch.arange(slot, slot + ids.shape[1], device=device),
                                   kv_len=slot + ids.shape[1])[0]  # (1 + len(draft), V)

    def _keep_verified(self, r: int, logits: torch.Tensor, draft: list[int], prompt: list[int], width: int) -> None:
        """Choose row r's next tokens from one verify pass and push them through its emitter."""
        params, row, constraint = self.params, self.rows[r], self.constraints[r]
        raw = logits.float()
        if constraint is not None and constraint.active:  # only without a draft (see _lookup_steps)
            raw = raw.clone()
            raw[0].masked_fill_(~constraint.allowed(0), FILTERED)
        tokens = accept_draft(raw, draft, params, row.tokens, prompt, self.generators[r])
        if constraint is not None and constraint.active:
            constraint.advance(tokens[0])
        self.drafted[r] += len(draft)
        self.accepted[r] += len(tokens) - 1
        chosen: list[Optional[float]] = [None] * len(tokens)
        tops: Optional[list[Any]] = None
        if params.logprobs or params.top_logprobs:  # from the unprocessed logits, as plain decoding reports them
            chosen, tops = token_logprobs(logits[:len(tokens)], torch.tensor(tokens), params.top_logprobs)
        for i, token in enumerate(tokens):
            row.push(token, chosen[i], tops[i] if tops is not None else None)
            if width + row.sampled - 1 >= self.model.config.block_size:  # the context is full
                row.finish("length")
            if row.done:
                break

    def run(self) -> Iterator[GenerationOutput]:
        for _ in self.steps():
            pass
        for r, (index, row) in enumerate(zip(self.index, self.rows)):
            yield self._output(r, index, row)

    def _output(self, r: int, index: int, row: SequenceEmitter) -> GenerationOutput:
        params = self.params
        want = params.logprobs or params.top_logprobs > 0
        lookup = params.prompt_lookup_num_tokens > 0
        return GenerationOutput(index=index, text=row.final_text(), token_ids=row.tokens,
                                finish_reason=row.finish_reason or "length", prompt_token_ids=row.prompt_ids,
                                stop_reason=row.stop_reason, logprobs=row.logprobs if want else None,
                                top_logprobs=[dict(t) for t in row.top_logprobs] if params.top_logprobs else None,
                                draft_tokens=self.drafted[r] if lookup else None,
                                accepted_draft_tokens=self.accepted[r] if lookup else None)


# ---- beam search -------------------------------------------------------------------------------

def _beam_search(model: torch.nn.Module, prompts: list[list[int]], params: SamplingParams, tokenizer: Any,
                 skip_special_tokens: bool) -> list[GenerationOutput]:
    """Beam search with the scoring, length penalty and early stopping of `transformers` (v4.50+).

    One function on purpose (~90 lines): the running/finished beam tensors update together every step,
    in the order transformers' `_beam_search` does; split up, each part would take and return all of them.
    """
    device = next(model.parameters()).device
    n_prompts, beams = len(prompts), params.num_beams
    eos = _default_eos(params, tokenizer, model)
    eos_t = torch.tensor(eos, dtype=torch.long, device=device)
    pad_id = eos[0] if eos else 0
    batch = _Batch(prompts, device, pad_id)
    width = batch.width
    max_new = min(params.max_new_tokens, model.config.block_size - width)
    cache_len = width + max_new
    keep = max(2, 1 + len(eos)) * beams  # enough candidates that num_beams stay open even if many end
    top_beam_mask = torch.arange(keep, device=device) < beams
    neg = -1.0e9
    lp = params.length_penalty
    running = torch.zeros(n_prompts, beams, max_new, dtype=torch.long, device=device)
    running_scores = torch.zeros(n_prompts, beams, device=device)
    running_scores[:, 1:] = neg  # only the first beam is live at the start, so beams do not duplicate
    finished = torch.zeros(n_prompts, beams, max_new, dtype=torch.long, device=device)
    finished_scores = torch.full((n_prompts, beams), neg, device=device)
    finished_lengths = torch.zeros(n_prompts, beams, dtype=torch.long, device=device)
    finished_eos = torch.zeros(n_prompts, beams, dtype=torch.bool, device=device)
    is_finished = torch.zeros(n_prompts, beams, dtype=torch.bool, device=device)
    improvable = torch.ones(n_prompts, 1, dtype=torch.bool, device=device)
    offsets = (torch.arange(n_prompts, device=device) * beams)[:, None]
    row_params = [params] * (n_prompts * beams)
    row_prompts = [p for p in prompts for _ in range(beams)]
    with _BorrowedCache(model, n_prompts * beams, cache_len) as caches:
        slots = torch.arange(width, device=device)
        key_mask = batch.key_mask(cache_len)
        logits = model(batch.input_ids, batch.positions(slots), cache_slots=slots,
                       cache_rows=torch.arange(n_prompts, device=device), key_mask=key_mask, last_only=True)[:, -1]
        fan_out = torch.arange(n_prompts, device=device).repeat_interleave(beams)
        _copy_cache_rows(caches, fan_out, width)
        logits = logits[fan_out]
        pads = batch.pads.repeat_interleave(beams) if batch.padded else None
        if key_mask is not None:
            key_mask = key_mask.repeat_interleave(beams, dim=0)
        for step in range(max_new):
            logp = logits.float().log_softmax(-1)
            generated = running[:, :, :step].reshape(n_prompts * beams, step).tolist()
            logp = process_logits(logp, row_params, generated, prompts=row_prompts)
            vocab = logp.shape[-1]
            total = (logp.view(n_prompts, beams, vocab) + running_scores[:, :, None]).view(n_prompts, -1)
            top_scores, top_index = total.topk(keep, dim=-1)  # (P, keep)
            source_beam = top_index // vocab
            top_tokens = top_index % vocab
            top_seqs = running.gather(1, source_beam[:, :, None].expand(-1, -1, max_new)).clone()
            top_seqs[:, :, step] = top_tokens
            ends_eos = torch.isin(top_tokens, eos_t) if eos else torch.zeros_like(top_tokens, dtype=torch.bool)
            if step < params.min_new_tokens:
                ends_eos = torch.zeros_like(ends_eos)
            hits = ends_eos | (step + 1 >= max_new)
            # Next running beams: the best candidates that did not just finish.
            open_scores = top_scores + hits.float() * neg
            chosen = open_scores.topk(beams, dim=-1).indices
            running = top_seqs.gather(1, chosen[:, :, None].expand(-1, -1, max_new))
            running_scores = open_scores.gather(1, chosen)
            parent = source_beam.gather(1, chosen)
            # Finished hypotheses: only candidates ranked within the top num_beams may enter.
            just_done = hits & top_beam_mask[None, :]
            done_scores = top_scores / ((step + 1) ** lp)
            full = is_finished.all(-1, keepdim=True) & (params.early_stopping is True)
            done_scores = done_scores + full.float() * neg + (~improvable).float() * neg + (~just_done).float() * neg
            merged_scores = torch.cat((finished_scores, done_scores), 1)
            pick = merged_scores.topk(beams, dim=-1).indices
            finished = torch.cat((finished, top_seqs), 1).gather(1, pick[:, :, None].expand(-1, -1, max_new))
            finished_scores = merged_scores.gather(1, pick)
            new_lengths = torch.full_like(top_tokens, step + 1) - ends_eos.long()  # length without the EOS
            finished_lengths = torch.cat((finished_lengths, new_lengths), 1).gather(1, pick)
            finished_eos = torch.cat((finished_eos, ends_eos), 1).gather(1, pick)
            is_finished = torch.cat((is_finished, just_done), 1).gather(1, pick)
            # Early stopping: can any open beam still beat the worst finished one?
            if params.early_stopping == "never" and lp > 0.0:
                best_length = max_new
            else:
                best_length = step + 1
            best_possible = running_scores[:, :1] / (best_length ** lp)
            worst_done = torch.where(is_finished, finished_scores.min(-1, keepdim=True).values,
                                     torch.full_like(finished_scores, neg))
            improvable = improvable & (best_possible > worst_done).any(-1, keepdim=True)
            all_full = bool(is_finished.all()) and params.early_stopping is True
            if not bool(improvable.any()) or all_full or bool(hits.all()):
                break
            _copy_cache_rows(caches, (parent + offsets).reshape(-1), width + step)
            slot = width + step
            slot_t = torch.tensor([slot], device=device)
            positions = (slot_t[None, :] - pads[:, None]) if pads is not None else None
            next_ids = running[:, :, step].reshape(-1, 1)
            logits = model(next_ids, positions, cache_slots=slot_t, key_mask=key_mask, kv_len=slot + 1,
                           last_only=True)[:, -1]
    return _beam_outputs(prompts, params, tokenizer, skip_special_tokens, finished, finished_scores,
                         finished_lengths, finished_eos)


def _beam_outputs(prompts: list[list[int]], params: SamplingParams, tokenizer: Any, skip_special_tokens: bool,
                  finished: torch.Tensor, scores: torch.Tensor, lengths: torch.Tensor,
                  ended_on_eos: torch.Tensor) -> list[GenerationOutput]:
    """The best `num_return_sequences` finished beams of each prompt, decoded and cut at stop strings."""
    outputs = []
    for p in range(len(prompts)):
        for b in range(params.num_return_sequences):
            n = int(lengths[p, b])
            tokens = finished[p, b, :n].tolist()
            ended_eos = bool(ended_on_eos[p, b])
            text = tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens) if tokenizer is not None else ""
            stop_reason: Optional[Union[str, int]] = int(finished[p, b, n]) if ended_eos else None
            finish_reason = "stop" if ended_eos else "length"
            if params.stop_strings:
                matcher = StopStringMatcher(params.stop_strings)
                cut, stopped = matcher.push(text)
                if stopped:
                    text, finish_reason, stop_reason = cut, "stop", matcher.stop_string
            outputs.append(GenerationOutput(index=p, text=text, token_ids=tokens, finish_reason=finish_reason,
                                            prompt_token_ids=prompts[p], stop_reason=stop_reason,
                                            score=float(scores[p, b])))
    return outputs


__all__ = ["generate", "stream", "score_tokens", "prepare_for_decoding", "compile_by_default", "GenerationOutput", "SamplingParams", "normalize_prompts"]
