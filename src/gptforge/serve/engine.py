"""The continuous-batching engine: one scheduler thread owns the model and its KV cache.

Every running sequence holds one row of a preallocated cache (`model.setup_cache(max_batch, ...)`), and
the running sequences always occupy rows [0, n): when one finishes, the last one moves into its row (a
copy of its filled slots, once), so each decode step reads the cache through a view instead of
gathering rows. Between decode steps the scheduler drops cancelled or timed-out sequences, admits
waiting ones (each into a free row; those admitted together are prefilled in one left-padded forward),
then runs ONE forward over all running rows, so requests that arrive mid-generation join the batch at the
next step.

Prefix caching (`prefix_cache.py`): on admission, the longest run of 16-token blocks of the prompt that
an earlier sequence computed is copied from the store into the row, and only the rest is prefilled (the
last prompt token always runs: its logits start the reply). A sequence's blocks are stored after its
prefill (the prompt's) and when it ends (prompt and reply, so the next turn of a chat finds its history).

Prompt lookup (`gptforge.speculative`): while a sequence asking for it decodes alone, a step feeds its
last token plus up to `prompt_lookup_num_tokens` tokens drafted from its own context and keeps the
longest prefix the model agrees with, then the model's own token: the same tokens (greedy) or the same
distribution (sampling) as plain steps, several tokens per forward on text that repeats its context.
With two or more sequences running, steps are plain batched ones (a batch already fills the weights'
reads). Rejected slots lie past the row's length, where the causal mask hides them until overwritten.

LoRA adapters (`multi_lora.py`): each sequence names its adapter slot; every forward tells the adapted
linears which adapter each row uses, so sequences of different adapters share the batch.

Isolation: sampling parameters are per sequence, and an error while prefilling or sampling one
sequence ends that sequence alone (with an OpenAI-shaped error); the others go on. Each sampled token
goes through the sequence's `SequenceEmitter` (gptforge.emitter), the same rules `generate` uses.

Results go back through `sink` callbacks, called on the engine thread once per step per request with
that request's events; the HTTP layer hands them to its asyncio loop.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Protocol

import torch

from ..emitter import SequenceEmitter, TopLogprobs
from ..sampling import SamplingParams, make_generator, process_logits, sample_next_token, token_logprobs
from .errors import APIError
from .metrics import ServerMetrics
from .prefix_cache import KVBlock, PrefixCache
from ..speculative import DraftSchedule, accept_draft, find_draft

DEFAULT_PREFIX_CACHE_BYTES = 256 * 1024 * 1024

log = logging.getLogger("gptforge.serve.engine")


class Constraint(Protocol):
    """Per-sequence constrained decoding (structured outputs, tool calls): which tokens may come next, given a
    token budget."""

    def allowed(self, budget: int) -> torch.Tensor | int:
        """A bool mask (V,) of allowed tokens, a float32 bias (V,) added to the logits (0 allowed, -inf not:
        several times cheaper than a masked fill on a large vocabulary), or one token id that must come next."""

    def advance(self, token: int) -> None:
        """Record the chosen token."""

    @property
    def complete(self) -> bool:
        """True when the output is a complete value (generation stops with finish_reason "stop")."""


@dataclass
class PromptLogprobs:
    """Log-probabilities of the prompt tokens under the model (the first token has none)."""

    token_ids: list[int]
    logprobs: list[Optional[float]]
    top_logprobs: list[Optional[TopLogprobs]]


@dataclass
class SeqEvent:
    """One update for one sequence; the last one of a sequence carries `finish_reason` (or `error`)."""

    index: int
    text: str = ""  # text safe to show (stop strings never appear; held-back text arrives later)
    token_id: Optional[int] = None  # a sampled token (content or end-of-sequence); None for text-only events
    logprob: Optional[float] = None
    top_logprobs: Optional[TopLogprobs] = None
    finish_reason: Optional[str] = None
    prompt_logprobs: Optional[PromptLogprobs] = None
    error: Optional[APIError] = None
    cached_tokens: Optional[int] = None  # on the last event: prompt tokens whose keys/values came from the prefix cache


@dataclass
class SequenceRequest:
    """One sequence to generate (an OpenAI request with n choices and k prompts makes n*k of these)."""

    index: int
    prompt_ids: list[int]
    params: SamplingParams
    max_tokens: int  # may be 0 (echo only); params.max_new_tokens is at least 1
    prompt_logprobs: bool = False
    constraint: Optional[Constraint] = None
    stop_token_ids: tuple[int, ...] = ()  # end-of-sequence ids (ignored under a constraint: it decides the end)
    hidden_prefix: str = ""  # token healing: prompt text the first tokens re-spell, dropped from the output
    healing: bool = False  # the constraint is token healing (a prefix rule, not an end rule)
    adapter: int = 0  # LoRA adapter slot (multi_lora.AdapterSet); 0: the base model


Sink = Callable[[list[SeqEvent]], None]


@dataclass(eq=False)
class _Sequence:
    req: SequenceRequest
    sink: Sink
    deadline: float
    arrived: float
    emitter: SequenceEmitter
    row: int = -1
    cancelled: bool = False
    finished: bool = False
    generator: Optional[torch.Generator] = None
    last_token: int = 0
    last_token_time: float = 0.0
    events: list[SeqEvent] = field(default_factory=list)
    failed: bool = False  # its cache row may hold garbage: nothing of it goes to the prefix cache
    cached_tokens: int = 0
    sampled_ids: list[int] = field(default_factory=list)  # every sampled token, end-of-sequence included
    digests: list[bytes] = field(default_factory=list)  # prefix-cache names of its full blocks so far
    drafts: Optional[DraftSchedule] = None  # prompt lookup: its draft length (made on its first lookup step)

    @property
    def length(self) -> int:
        """Tokens in the cache row once the last sampled token is fed: prompt + generated."""
        return len(self.req.prompt_ids) + self.emitter.sampled


class QueueFullError(APIError):
    def __init__(self, waiting: int, retry_after: int) -> None:
        super().__init__(429, f"server busy: {waiting} requests already waiting; retry in {retry_after}s",
                         code="queue_full", headers={"Retry-After": str(retry_after)})


class RequestHandle:
    """The sequences of one HTTP request; `cancel()` frees their batch rows at the next step."""

    def __init__(self, seqs: list[_Sequence]) -> None:
        self._seqs = seqs

    def cancel(self) -> None:
        """Stop generating (client gone, or the request is done with)."""
        for seq in self._seqs:
            seq.cancelled = True


class Engine:
    """Continuous-batching text generation over one model (see module docstring)."""

    def __init__(self, model: torch.nn.Module, tokenizer, *, max_batch: int = 8, max_queue: int = 64,
                 request_timeout: float = 600.0, metrics: Optional[ServerMetrics] = None,
                 prefix_cache_bytes: int = DEFAULT_PREFIX_CACHE_BYTES, adapters: Any = None) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.block_size = model.config.block_size
        self.vocab_size = model.config.vocab_size
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.request_timeout = request_timeout
        self.metrics = metrics or ServerMetrics()
        self.metrics.queue_capacity.set(max_queue)
        self.metrics.batch_capacity.set(max_batch)
        self.stop_ids = tuple(tokenizer.stop_token_ids())
        self._waiting: deque[_Sequence] = deque()
        self._running: list[_Sequence] = []  # _running[i] holds cache row i
        self._pending: list[_Sequence] = []  # sequences with events to deliver at the end of this step
        self._jobs: deque[tuple[Callable[[], Any], Future]] = deque()  # model work run between steps
        self._cond = threading.Condition()
        self._stopping = False
        self._step_times: deque[float] = deque(maxlen=32)
        self.steps = 0
        model.setup_cache(max_batch, self.block_size)
        self._caches = [block.attn.kv_cache for block in model.blocks]
        self.prefix_cache = PrefixCache(prefix_cache_bytes) if prefix_cache_bytes > 0 else None
        self.adapters = adapters  # a multi_lora.AdapterSet, or None
        self.metrics.prefix_cache_capacity.set(prefix_cache_bytes)
        self._thread = threading.Thread(target=self._loop, name="gptforge-engine", daemon=True)
        self._thread.start()

    # ---- public -----------------------------------------------------------------------------
    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        return len(self._running)

    def submit(self, requests: list[SequenceRequest], sink: Sink, timeout: Optional[float] = None) -> RequestHandle:
        """Queue sequences (all or none); raises QueueFullError (429) when the wait queue is full."""
        now = time.monotonic()
        deadline = now + (timeout if timeout is not None else self.request_timeout)
        seqs = [_Sequence(req=r, sink=sink, deadline=deadline, arrived=now, emitter=self._emitter(r)) for r in requests]
        with self._cond:
            if self._stopping:
                raise APIError(503, "server is shutting down", code="shutting_down")
            if len(self._waiting) + len(seqs) > self.max_queue:
                raise QueueFullError(len(self._waiting), self._retry_after())
            self._waiting.extend(seqs)
            self.metrics.waiting.set(len(self._waiting))
            self._cond.notify()
        return RequestHandle(seqs)

    def run_between_steps(self, fn: Callable[[], Any]) -> Future:
        """Run `fn()` on the engine thread between two decode steps (other work on the model, such as an
        embedding forward, so it never overlaps a step); one job per step, so generation keeps flowing."""
        future: Future = Future()
        with self._cond:
            if self._stopping:
                raise APIError(503, "server is shutting down", code="shutting_down")
            self._jobs.append((fn, future))
            self._cond.notify()
        return future

    def shutdown(self, timeout: float = 30.0) -> None:
        """Refuse new work, let running and queued sequences finish (up to `timeout`), stop the thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join(timeout)

    # ---- scheduler --------------------------------------------------------------------------
    def _emitter(self, req: SequenceRequest) -> SequenceEmitter:
        ends_by_constraint = req.constraint is not None and not req.healing
        return SequenceEmitter(self.tokenizer, req.prompt_ids, max_tokens=max(1, req.max_tokens),
                               stop_strings=req.params.stop_strings,
                               stop_token_ids=() if ends_by_constraint else req.stop_token_ids,
                               skip_special_tokens=True, hidden_prefix=req.hidden_prefix)

    def _retry_after(self) -> int:
        step = sum(self._step_times) / len(self._step_times) if self._step_times else 0.05
        return max(1, int(step * 64 * (1 + len(self._waiting) / max(1, self.max_batch)) + 0.999))

    def _loop(self) -> None:
        with torch.inference_mode():
            while True:
                with self._cond:
                    while not self._waiting and not self._running and not self._jobs and not self._stopping:
                        self._cond.wait()
                    if self._stopping and not self._waiting and not self._running and not self._jobs:
                        return
                    job = self._jobs.popleft() if self._jobs else None
                if job is not None:
                    fn, future = job
                    if future.set_running_or_notify_cancel():
                        try:
                            future.set_result(fn())
                        except BaseException as exc:  # the caller gets it; the engine goes on
                            future.set_exception(exc)
                try:
                    self._step()
                except Exception as exc:  # a bug in a batch-wide step: fail the batch, keep serving
                    log.exception("engine step failed")
                    err = APIError(500, f"generation failed: {type(exc).__name__}", code="engine_error")
                    for seq in list(self._running):
                        self._fail(seq, err)
                finally:
                    self._deliver()
                    self.metrics.running.set(len(self._running))

    def _step(self) -> None:
        now = time.monotonic()
        for seq in list(self._running):
            if seq.cancelled:
                self._release(seq)
            elif now > seq.deadline:
                self._fail(seq, APIError(504, "request timed out", code="timeout"))
        self._admit(now)
        if self._running:
            start = time.perf_counter()
            self._decode()
            self._step_times.append(time.perf_counter() - start)
            self.steps += 1

    def _admit(self, now: float) -> None:
        admitted: list[_Sequence] = []
        while len(self._running) < self.max_batch:
            with self._cond:
                if not self._waiting:
                    break
                seq = self._waiting.popleft()
                self.metrics.waiting.set(len(self._waiting))
            if seq.cancelled:
                continue
            if now > seq.deadline:
                self._event(seq, SeqEvent(seq.req.index, error=APIError(504, "request timed out in the queue",
                                                                        code="timeout")))
                continue
            self.metrics.queue_time.observe(time.monotonic() - seq.arrived)
            seq.row = len(self._running)
            self._running.append(seq)
            admitted.append(seq)
        for seq in admitted:
            try:
                self._start(seq)
            except Exception as exc:  # this sequence alone fails
                log.exception("prefill failed")
                self._fail(seq, APIError(500, f"prefill failed: {type(exc).__name__}", code="engine_error"))
        ready = [seq for seq in admitted if not seq.finished]
        for group in self._prefill_groups(ready):
            if len(group) > 1:
                try:
                    self._prefill_batch(group)
                    continue
                except Exception:  # find the sequence that fails; the others are prefilled alone
                    log.exception("batched prefill failed; prefilling sequences one by one")
            for seq in group:
                if seq.finished or seq.emitter.sampled:  # done by a batch that failed after sampling it
                    continue
                try:
                    self._prefill(seq)
                except Exception as exc:  # this sequence alone fails
                    log.exception("prefill failed")
                    self._fail(seq, APIError(500, f"prefill failed: {type(exc).__name__}", code="engine_error"))

    def _start(self, seq: _Sequence) -> None:
        """A sequence's generator and prefix-cache hit (`cached_tokens`: the prompt tokens its prefill skips)."""
        req = seq.req
        if not req.params.greedy:
            seq.generator = make_generator(req.params.seed if req.params.seed is not None
                                           else int(torch.randint(0, 2**62, ()).item()))
        self.metrics.prompt_tokens.inc(len(req.prompt_ids))
        self._reuse_prefix(seq)

    def _prefill_groups(self, seqs: list[_Sequence]) -> list[list[_Sequence]]:
        """Sequences admitted together, grouped for one padded prefill forward each.

        A burst of requests (a client's concurrent calls, the next wave of a load test) then costs one pass
        over the weights instead of one per request. Groups bound the padding (at most half again the real
        tokens); alone: sequences asking for prompt logprobs (they need every position's logits), those whose
        padded slots would pass the cache, and every sequence of a LongRoPE model (padding positions would
        switch the whole batch to the long factors).
        """
        def todo(s: _Sequence) -> int:
            return len(s.req.prompt_ids) - s.cached_tokens

        alone = [s.req.prompt_logprobs or self.model.longrope_from is not None for s in seqs]
        groups: list[list[_Sequence]] = [[s] for s, one in zip(seqs, alone) if one]
        group: list[_Sequence] = []
        width = real = 0
        # Longest first: a group's width is its first member's length.
        for seq in sorted((s for s, one in zip(seqs, alone) if not one), key=todo, reverse=True):
            fits = group and (len(group) + 1) * width <= 1.5 * (real + todo(seq)) + 16 \
                and seq.cached_tokens + width <= self.block_size
            if not fits:
                if group:
                    groups.append(group)
                group, width, real = [], todo(seq), 0
            group.append(seq)
            real += todo(seq)
        if group:
            groups.append(group)
        for g in groups:  # in row order, so a group of adjacent rows reads the cache through a view
            g.sort(key=lambda s: s.row)
        return groups

    def _prefill(self, seq: _Sequence) -> None:
        req = seq.req
        n, start = len(req.prompt_ids), seq.cached_tokens
        ids = torch.tensor([req.prompt_ids[start:]], dtype=torch.long)
        logits = self._forward([req.adapter], ids, cache_slots=torch.arange(start, n),
                               cache_rows=slice(seq.row, seq.row + 1), kv_len=n,
                               last_only=not req.prompt_logprobs)  # (1, n - start or 1, V)
        self._store_prefix(seq, req.prompt_ids)
        if req.prompt_logprobs:
            self._event(seq, SeqEvent(req.index, prompt_logprobs=self._prompt_logprobs(req, logits[0])))
        if req.max_tokens == 0:
            self._finish(seq, "length")
            return
        self._sample([seq], logits[:, -1])

    def _prefill_batch(self, seqs: list[_Sequence]) -> None:
        """Prefill several sequences in one forward, left-padded to the longest.

        Row i's real tokens take slots start_i..n_i-1, so its last one sits in the last column (`last_only`);
        its pad columns write slots n_i.. (past its length: the causal mask hides them from its real tokens,
        and its own decode steps overwrite them), so nothing it needs is touched.
        """
        width = max(len(s.req.prompt_ids) - s.cached_tokens for s in seqs)
        ids, slots = [], []
        for seq in seqs:
            n, start = len(seq.req.prompt_ids), seq.cached_tokens
            pad = width - (n - start)
            ids.append([0] * pad + seq.req.prompt_ids[start:])
            slots.append(list(range(n, n + pad)) + list(range(start, n)))
        rows_list = [s.row for s in seqs]
        rows: slice | torch.Tensor = slice(rows_list[0], rows_list[-1] + 1) \
            if rows_list == list(range(rows_list[0], rows_list[-1] + 1)) else torch.tensor(rows_list)
        slot_t = torch.tensor(slots, dtype=torch.long)
        logits = self._forward([s.req.adapter for s in seqs], torch.tensor(ids, dtype=torch.long),
                               cache_slots=slot_t, cache_rows=rows, kv_len=int(slot_t.max()) + 1,
                               last_only=True)[:, -1]  # (B, V)
        for seq in seqs:
            self._store_prefix(seq, seq.req.prompt_ids)
        sample = []
        for i, seq in enumerate(seqs):
            if seq.req.max_tokens == 0:
                self._finish(seq, "length")
            else:
                sample.append(i)
        if sample:
            self._sample([seqs[i] for i in sample], logits[sample])

    def _forward(self, adapters: list[int], *args: Any, **kwargs: Any) -> torch.Tensor:
        """The model's forward with each row's LoRA adapter selected (the base model again afterwards)."""
        if self.adapters is None:
            return self.model(*args, **kwargs)
        self.adapters.select(adapters)
        try:
            return self.model(*args, **kwargs)
        finally:
            self.adapters.select(None)  # other work between steps (embeddings) sees the base model

    # ---- prefix cache -----------------------------------------------------------------------
    def _reuse_prefix(self, seq: _Sequence) -> None:
        """Copy the cached blocks that start the prompt into the sequence's row; `cached_tokens`: how many."""
        cache = self.prefix_cache
        if cache is None:
            return
        ids = seq.req.prompt_ids
        seq.digests = cache.digests(ids, namespace=str(seq.req.adapter))  # each adapter has its own keys/values
        if seq.req.prompt_logprobs:  # every prompt token's logits are needed: nothing may be skipped
            return
        self.metrics.prefix_cache_queries.inc(len(ids))
        hits = cache.lookup(seq.digests[:(len(ids) - 1) // cache.block_tokens])  # the last token always runs
        if not hits:
            return
        t = len(hits) * cache.block_tokens
        k = torch.cat([b.k for b in hits], dim=2)  # (L, Hkv, t, D)
        v = torch.cat([b.v for b in hits], dim=2)
        for layer, kv in enumerate(self._caches):
            kv.k[seq.row, :, :t] = k[layer]
            kv.v[seq.row, :, :t] = v[layer]
        seq.cached_tokens = t
        self.metrics.prefix_cache_hits.inc(t)

    def _store_prefix(self, seq: _Sequence, ids: list[int]) -> None:
        """Put the full blocks of `ids` (tokens whose keys/values fill the row from slot 0) in the cache."""
        cache = self.prefix_cache
        if cache is None:
            return
        try:  # a cache is an optimisation: failing to fill it must not fail the sequence
            seq.digests = cache.digests(ids, seq.digests, namespace=str(seq.req.adapter))
            b = cache.block_tokens
            new = {}
            for i, d in enumerate(seq.digests):
                if d not in cache:
                    s = i * b
                    new[d] = KVBlock(torch.stack([kv.k[seq.row, :, s:s + b] for kv in self._caches]),
                                     torch.stack([kv.v[seq.row, :, s:s + b] for kv in self._caches]))
            cache.insert(seq.digests, new)
            self.metrics.prefix_cache_bytes.set(cache.bytes)
        except Exception:
            log.exception("storing a prefix in the prefix cache failed")

    def _prompt_logprobs(self, req: SequenceRequest, logits: torch.Tensor) -> PromptLogprobs:
        ids = req.prompt_ids
        k = req.params.top_logprobs
        chosen, tops = token_logprobs(logits[:-1], torch.tensor(ids[1:], dtype=torch.long), k) if len(ids) > 1 \
            else ([], [] if k else None)
        if tops is None:
            return PromptLogprobs(list(ids), [None] + chosen, [None] * len(ids))
        for t, top in enumerate(tops):
            if ids[t + 1] not in {i for i, _ in top}:
                top.append((ids[t + 1], chosen[t]))  # OpenAI includes the chosen token in the list
        return PromptLogprobs(list(ids), [None] + chosen, [None] + tops)

    def _decode(self) -> None:
        seqs = self._running
        if len(seqs) == 1 and self._drafts(seqs[0]):
            self._decode_lookup(seqs[0])
            return
        n = len(seqs)
        tokens = torch.tensor([[s.last_token] for s in seqs], dtype=torch.long)  # (n, 1)
        slots = torch.tensor([[s.length - 1] for s in seqs], dtype=torch.long)  # (n, 1)
        kv_len = max(s.length for s in seqs)
        logits = self._forward([s.req.adapter for s in seqs], tokens, cache_slots=slots, cache_rows=slice(0, n),
                               kv_len=kv_len)[:, -1]  # (n, V)
        self._sample(list(seqs), logits)

    @staticmethod
    def _drafts(seq: _Sequence) -> bool:
        """Whether the sequence decodes with prompt lookup (asked for, and no constraint choosing tokens)."""
        constraint = seq.req.constraint
        return seq.req.params.prompt_lookup_num_tokens > 0 and \
            (constraint is None or not getattr(constraint, "active", True))

    def _decode_lookup(self, seq: _Sequence) -> None:
        """One prompt-lookup step of a sequence decoding alone: verify a draft, emit what is kept."""
        req, params = seq.req, seq.req.params
        if seq.drafts is None:
            seq.drafts = DraftSchedule(params.prompt_lookup_num_tokens)
        slot = seq.length - 1  # where the newest token goes; the draft's tokens follow it
        room = min(seq.drafts.room(), req.max_tokens - seq.emitter.sampled - 1, self.block_size - 1 - slot)
        draft = find_draft(req.prompt_ids + seq.emitter.tokens, room, params.max_matching_ngram_size) \
            if room > 0 else []
        ids = torch.tensor([[seq.last_token] + draft], dtype=torch.long)
        logits = self._forward([req.adapter], ids, cache_slots=torch.arange(slot, slot + ids.shape[1]),
                               cache_rows=slice(seq.row, seq.row + 1), kv_len=slot + ids.shape[1])[0]  # (1 + k, V)
        try:
            tokens = accept_draft(logits, draft, params, seq.emitter.tokens, req.prompt_ids, seq.generator)
            chosen: list[Optional[float]] = [None] * len(tokens)
            tops: Optional[list[Any]] = None
            if params.logprobs:  # from the unprocessed logits, as plain steps report them
                chosen, tops = token_logprobs(logits[:len(tokens)], torch.tensor(tokens), params.top_logprobs)
        except Exception as exc:
            log.exception("prompt-lookup sampling failed")
            self._fail(seq, APIError(500, f"sampling failed: {type(exc).__name__}", code="engine_error"))
            return
        seq.drafts.update(len(draft), len(tokens) - 1)
        self.metrics.draft_tokens.inc(len(draft))
        self.metrics.accepted_draft_tokens.inc(len(tokens) - 1)
        now = time.monotonic()
        for i, token in enumerate(tokens):
            self._emit(seq, token, chosen[i], (tops[i] or None) if tops is not None else None, now)
            if seq.finished:  # a stop, the token budget or the context ended it inside the draft
                break

    # ---- sampling ---------------------------------------------------------------------------
    def _sample(self, seqs: list[_Sequence], logits: torch.Tensor) -> None:
        """Pick and emit the next token of each sequence from its logits (B, V); failures stay per sequence."""
        try:
            tokens = self._choose(seqs, logits)
        except Exception:  # find the sequence(s) that cannot be sampled; the others go on
            log.exception("batched sampling failed; sampling sequences one by one")
            tokens = []
            for i, seq in enumerate(seqs):
                try:
                    tokens.append(self._choose([seq], logits[i:i + 1])[0])
                except Exception as exc:
                    self._fail(seq, APIError(500, f"sampling failed: {type(exc).__name__}", code="engine_error"))
                    tokens.append(-1)
        want = [i for i, s in enumerate(seqs) if s.req.params.logprobs and tokens[i] >= 0]
        lps: dict[int, tuple[float, Optional[TopLogprobs]]] = {}
        if want:
            k = max(seqs[i].req.params.top_logprobs for i in want)
            chosen, tops = token_logprobs(logits[want], torch.tensor([tokens[i] for i in want]), k)
            for j, i in enumerate(want):
                top = tops[j][:seqs[i].req.params.top_logprobs] if tops is not None else None
                lps[i] = (chosen[j], top or None)
        now = time.monotonic()
        for i, seq in enumerate(seqs):
            if tokens[i] >= 0 and not seq.finished:
                self._emit(seq, tokens[i], *lps.get(i, (None, None)), now)

    def _choose(self, seqs: list[_Sequence], logits: torch.Tensor) -> list[int]:
        """Token ids for `seqs`: constraints, penalties and filters applied, then argmax or a draw."""
        logits = logits.float()
        forced: dict[int, int] = {}
        constrained = [i for i, s in enumerate(seqs)
                       if s.req.constraint is not None and getattr(s.req.constraint, "active", True)]
        if constrained:
            logits = logits.clone()
            for i in constrained:
                seq = seqs[i]
                allowed = seq.req.constraint.allowed(seq.req.max_tokens - len(seq.emitter.tokens))
                if isinstance(allowed, int):
                    forced[i] = allowed
                elif allowed.dtype == torch.bool:
                    logits[i].masked_fill_(~allowed, float("-inf"))
                else:
                    logits[i].add_(allowed)
        params = [s.req.params for s in seqs]
        processed = process_logits(logits, params, [s.emitter.tokens for s in seqs],
                                   [s.req.prompt_ids for s in seqs])
        tokens = sample_next_token(processed, params, [s.generator for s in seqs]).tolist()
        for i, token in forced.items():
            tokens[i] = token
        return tokens

    def _emit(self, seq: _Sequence, token: int, lp: Optional[float], top: Optional[TopLogprobs],
              now: float) -> None:
        first = seq.emitter.sampled == 0
        out = seq.emitter.push(token, lp, top)
        seq.last_token = token
        seq.sampled_ids.append(token)
        self.metrics.generation_tokens.inc()
        if first:
            self.metrics.ttft.observe(now - seq.arrived)
        else:
            self.metrics.itl.observe(now - seq.last_token_time)
        seq.last_token_time = now
        constraint = seq.req.constraint
        if constraint is not None and out.token_id is not None:
            constraint.advance(token)
            if constraint.complete and not seq.emitter.done:
                end = seq.emitter.finish("stop")
                out.text += end.text
                out.finish_reason = "stop"
        if out.finish_reason is None and seq.length >= self.block_size:
            end = seq.emitter.finish("length")  # the context is full: no slot for the next token
            out.text += end.text
            out.finish_reason = end.finish_reason
        self._event(seq, SeqEvent(seq.req.index, text=out.text, token_id=token, logprob=lp, top_logprobs=top,
                                  finish_reason=out.finish_reason))
        if out.finish_reason is not None:
            self.metrics.e2e.observe(now - seq.arrived)
            self._release(seq)

    # ---- finishing --------------------------------------------------------------------------
    def _event(self, seq: _Sequence, event: SeqEvent) -> None:
        if event.finish_reason is not None:
            event.cached_tokens = seq.cached_tokens
        if not seq.events:
            self._pending.append(seq)
        seq.events.append(event)

    def _deliver(self) -> None:
        """Hand this step's events to their requests' sinks: one call per request and step, not per token."""
        by_sink: dict[int, tuple[Sink, list[SeqEvent]]] = {}
        for seq in self._pending:
            by_sink.setdefault(id(seq.sink), (seq.sink, []))[1].extend(seq.events)
            seq.events = []
        self._pending = []
        for sink, events in by_sink.values():
            try:
                sink(events)
            except Exception:  # a broken consumer must not stop the engine
                log.exception("event sink failed")

    def _finish(self, seq: _Sequence, reason: str) -> None:
        end = seq.emitter.finish(reason)
        self._event(seq, SeqEvent(seq.req.index, text=end.text, finish_reason=reason))
        self._release(seq)

    def _fail(self, seq: _Sequence, error: APIError) -> None:
        seq.failed = True
        self._event(seq, SeqEvent(seq.req.index, error=error))
        self._release(seq)

    def _release(self, seq: _Sequence) -> None:
        """Free the sequence's row; the last running sequence moves into it so rows stay [0, n)."""
        if seq.finished:
            return
        seq.finished = True
        if seq.row < 0 or seq not in self._running:
            return
        if not seq.failed:  # its prompt and reply, for the next turn of a conversation
            filled = seq.length - 1 if seq.sampled_ids else len(seq.req.prompt_ids)  # the last token is never fed
            self._store_prefix(seq, (seq.req.prompt_ids + seq.sampled_ids)[:filled])
        row, last = seq.row, len(self._running) - 1
        moved = self._running[last]
        if row != last:
            length = moved.length
            for cache in self._caches:
                cache.k[row, :, :length] = cache.k[last, :, :length]
                cache.v[row, :, :length] = cache.v[last, :, :length]
            self._running[row] = moved
            moved.row = row
        self._running.pop()
        seq.row = -1


__all__ = ["Engine", "SequenceRequest", "SeqEvent", "PromptLogprobs", "RequestHandle", "QueueFullError",
           "Constraint"]
