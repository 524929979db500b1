"""The continuous-batching engine: one scheduler thread owns the model and its KV cache.

Every running sequence holds one row of a preallocated cache (`model.setup_cache(max_batch, ...)`).
Between decode steps the scheduler drops cancelled or timed-out sequences (freeing their rows),
admits waiting ones (prefilling each into a free row), then runs ONE forward over all running rows
with `cache_rows`, so requests that arrive mid-generation join the batch at the next step and
throughput grows with concurrency. Sampling parameters are per sequence inside the batch.

Results go back through `sink` callbacks (called on the engine thread); the HTTP layer hands them
to its asyncio loop.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from ..sampling import (IncrementalDetokenizer, SamplingParams, StopStringMatcher, make_generator,
                        process_logits, sample_next_token)
from .errors import APIError
from .json_grammar import START, DONE_MODE, JSONConstraint, State, token_byte_table
from .metrics import ServerMetrics

log = logging.getLogger("gptforge.serve.engine")

TopLogprobs = list[tuple[int, float]]


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
    token_id: Optional[int] = None
    logprob: Optional[float] = None
    top_logprobs: Optional[TopLogprobs] = None
    finish_reason: Optional[str] = None
    prompt_logprobs: Optional[PromptLogprobs] = None
    error: Optional[APIError] = None


@dataclass
class SequenceRequest:
    """One sequence to generate (an OpenAI request with n choices and k prompts makes n*k of these)."""

    index: int
    prompt_ids: list[int]
    params: SamplingParams
    max_tokens: int  # may be 0 (echo only); params.max_new_tokens is at least 1
    prompt_logprobs: bool = False
    json_mode: bool = False


@dataclass
class _Sequence:
    req: SequenceRequest
    sink: Callable[[SeqEvent], None]
    deadline: float
    arrived: float
    row: int = -1
    generated: list[int] = field(default_factory=list)
    cancelled: bool = False
    finished: bool = False
    generator: Optional[torch.Generator] = None
    detok: Optional[IncrementalDetokenizer] = None
    stopper: Optional[StopStringMatcher] = None
    json_state: Optional[State] = None
    last_token_time: float = 0.0

    @property
    def next_slot(self) -> int:
        """Cache slot of the last generated token (fed to the next decode step)."""
        return len(self.req.prompt_ids) + len(self.generated) - 1


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
                 request_timeout: float = 600.0, metrics: Optional[ServerMetrics] = None) -> None:
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
        self.stop_ids = tokenizer.stop_token_ids()
        self._json: Optional[JSONConstraint] = None
        self._waiting: deque[_Sequence] = deque()
        self._running: list[_Sequence] = []
        self._free_rows = list(range(max_batch))
        self._cond = threading.Condition()
        self._stopping = False
        self._step_times: deque[float] = deque(maxlen=32)
        self.steps = 0
        model.setup_cache(max_batch, self.block_size)
        self._thread = threading.Thread(target=self._loop, name="gptforge-engine", daemon=True)
        self._thread.start()

    # ---- public -----------------------------------------------------------------------------
    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        return len(self._running)

    def submit(self, requests: list[SequenceRequest], sink: Callable[[SeqEvent], None],
               timeout: Optional[float] = None) -> RequestHandle:
        """Queue sequences (all or none); raises QueueFullError (429) when the wait queue is full."""
        now = time.monotonic()
        deadline = now + (timeout if timeout is not None else self.request_timeout)
        seqs = [_Sequence(req=r, sink=sink, deadline=deadline, arrived=now) for r in requests]
        with self._cond:
            if self._stopping:
                raise APIError(503, "server is shutting down", code="shutting_down")
            if len(self._waiting) + len(seqs) > self.max_queue:
                raise QueueFullError(len(self._waiting), self._retry_after())
            self._waiting.extend(seqs)
            self.metrics.waiting.set(len(self._waiting))
            self._cond.notify()
        return RequestHandle(seqs)

    def shutdown(self, timeout: float = 30.0) -> None:
        """Refuse new work, let running and queued sequences finish (up to `timeout`), stop the thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join(timeout)

    def json_constraint(self) -> JSONConstraint:
        """The JSON-object constraint for this vocabulary (built on first use)."""
        if self._json is None:
            self._json = JSONConstraint(token_byte_table(self.tokenizer, self.vocab_size))
        return self._json

    # ---- scheduler --------------------------------------------------------------------------
    def _retry_after(self) -> int:
        step = sum(self._step_times) / len(self._step_times) if self._step_times else 0.05
        return max(1, int(step * 64 * (1 + len(self._waiting) / max(1, self.max_batch)) + 0.999))

    def _loop(self) -> None:
        with torch.inference_mode():
            while True:
                with self._cond:
                    while not self._waiting and not self._running and not self._stopping:
                        self._cond.wait()
                    if self._stopping and not self._waiting and not self._running:
                        return
                try:
                    self._step()
                except Exception as exc:  # a bug must not hang every client: fail the batch, keep serving
                    log.exception("engine step failed")
                    err = APIError(500, f"generation failed: {type(exc).__name__}", code="engine_error")
                    for seq in list(self._running):
                        self._finish(seq, None, error=err)

    def _step(self) -> None:
        now = time.monotonic()
        for seq in list(self._running):
            if seq.cancelled:
                self._release(seq)
            elif now > seq.deadline:
                self._finish(seq, None, error=APIError(504, "request timed out", code="timeout"))
        self._admit(now)
        if self._running:
            start = time.perf_counter()
            self._decode()
            self._step_times.append(time.perf_counter() - start)
            self.steps += 1
        self.metrics.running.set(len(self._running))

    def _admit(self, now: float) -> None:
        while self._free_rows:
            with self._cond:
                if not self._waiting:
                    break
                seq = self._waiting.popleft()
                self.metrics.waiting.set(len(self._waiting))
            if seq.cancelled:
                continue
            if now > seq.deadline:
                seq.sink(SeqEvent(seq.req.index, error=APIError(504, "request timed out in the queue", code="timeout")))
                continue
            seq.row = self._free_rows.pop()
            self.metrics.queue_time.observe(time.monotonic() - seq.arrived)
            try:
                self._prefill(seq)
            except Exception as exc:
                log.exception("prefill failed")
                self._finish(seq, None, error=APIError(500, f"prefill failed: {type(exc).__name__}", code="engine_error"))

    def _setup_sequence(self, seq: _Sequence) -> None:
        req = seq.req
        seq.generator = make_generator(req.params.seed)
        seq.detok = IncrementalDetokenizer(self.tokenizer, req.prompt_ids)
        seq.stopper = StopStringMatcher(req.params.stop_strings)
        seq.json_state = START if req.json_mode else None

    def _prefill(self, seq: _Sequence) -> None:
        req = seq.req
        self._setup_sequence(seq)
        ids = torch.tensor([req.prompt_ids], dtype=torch.long)
        n = ids.shape[1]
        self.metrics.prompt_tokens.inc(n)
        logits = self.model(ids, cache_slots=torch.arange(n), cache_rows=torch.tensor([seq.row]),
                            last_only=not req.prompt_logprobs)  # (1, n or 1, V)
        if req.prompt_logprobs:
            seq.sink(SeqEvent(req.index, prompt_logprobs=self._prompt_logprobs(req, logits[0])))
        self._running.append(seq)
        if req.max_tokens == 0:
            self._finish(seq, "length")
            return
        self._sample([seq], logits[:, -1])

    def _prompt_logprobs(self, req: SequenceRequest, logits: torch.Tensor) -> PromptLogprobs:
        ids = req.prompt_ids
        logp = torch.log_softmax(logits[:-1].float(), dim=-1)  # (n-1, V): row t predicts token t+1
        target = torch.tensor(ids[1:], dtype=torch.long)
        chosen = logp.gather(1, target[:, None])[:, 0].tolist() if len(ids) > 1 else []
        k = req.params.top_logprobs
        tops: list[Optional[TopLogprobs]] = [None]
        if k > 0 and len(ids) > 1:
            values, indices = logp.topk(k, dim=-1)
            for t in range(len(ids) - 1):
                top = list(zip(indices[t].tolist(), values[t].tolist()))
                if ids[t + 1] not in {i for i, _ in top}:
                    top.append((ids[t + 1], chosen[t]))  # OpenAI includes the chosen token in the list
                tops.append(top)
        else:
            tops += [None] * (len(ids) - 1)
        return PromptLogprobs(list(ids), [None] + chosen, tops)

    def _decode(self) -> None:
        seqs = list(self._running)
        rows = torch.tensor([s.row for s in seqs], dtype=torch.long)
        tokens = torch.tensor([[s.generated[-1]] for s in seqs], dtype=torch.long)  # (B, 1)
        slots = torch.tensor([[s.next_slot] for s in seqs], dtype=torch.long)  # (B, 1)
        logits = self.model(tokens, cache_slots=slots, cache_rows=rows)[:, -1]  # (B, V)
        self._sample(seqs, logits)

    def _sample(self, seqs: list[_Sequence], logits: torch.Tensor) -> None:
        """Pick the next token of each sequence from its logits (B, V) and emit it."""
        logits = logits.float()
        want_logprobs = any(s.req.params.logprobs for s in seqs)
        logp = torch.log_softmax(logits, dim=-1) if want_logprobs else None
        forced: dict[int, int] = {}
        if any(s.json_state is not None for s in seqs):
            logits = logits.clone()
            constraint = self.json_constraint()
            for i, s in enumerate(seqs):
                if s.json_state is None:
                    continue
                budget = s.req.max_tokens - len(s.generated)
                force = constraint.forced_token(s.json_state, budget)
                if force is not None:
                    forced[i] = force
                else:
                    allowed = constraint.allowed_within(s.json_state, budget)
                    logits[i].masked_fill_(~allowed, float("-inf"))
        params = [s.req.params for s in seqs]
        processed = process_logits(logits, params, [s.generated for s in seqs],
                                   [s.req.prompt_ids for s in seqs])
        next_tokens = sample_next_token(processed, params, [s.generator for s in seqs]).tolist()
        now = time.monotonic()
        for i, s in enumerate(seqs):
            token = forced.get(i, next_tokens[i])
            lp, top = None, None
            if logp is not None and s.req.params.logprobs:
                lp = float(logp[i, token])
                k = s.req.params.top_logprobs
                if k > 0:
                    values, indices = logp[i].topk(k)
                    top = list(zip(indices.tolist(), values.tolist()))
            self._emit_token(s, token, lp, top, now)

    def _emit_token(self, seq: _Sequence, token: int, lp: Optional[float], top: Optional[TopLogprobs],
                    now: float) -> None:
        req = seq.req
        first = not seq.generated
        seq.generated.append(token)
        self.metrics.generation_tokens.inc()
        if first:
            self.metrics.ttft.observe(now - seq.arrived)
        else:
            self.metrics.itl.observe(now - seq.last_token_time)
        seq.last_token_time = now
        finish: Optional[str] = None
        text = ""
        if token in self.stop_ids and seq.json_state is None:
            finish = "stop"
        else:
            if seq.json_state is not None:
                seq.json_state = self.json_constraint().advance(seq.json_state, token)
            shown, stopped = seq.stopper.push(seq.detok.push(token))
            text = shown
            if stopped:
                finish = "stop"
            elif seq.json_state is not None and seq.json_state[0] == DONE_MODE:
                finish = "stop"
            elif len(seq.generated) >= req.max_tokens or seq.next_slot + 1 >= self.block_size:
                finish = "length"
            elif seq.json_state is None and token in req.params.eos_token_ids:
                finish = "stop"
        if finish is not None and not seq.stopper.stopped:
            text += seq.stopper.push(seq.detok.flush())[0] + seq.stopper.flush()
        seq.sink(SeqEvent(req.index, text=text, token_id=token, logprob=lp, top_logprobs=top,
                          finish_reason=finish))
        if finish is not None:
            self._release(seq)
            self.metrics.e2e.observe(now - seq.arrived)

    def _finish(self, seq: _Sequence, reason: Optional[str], error: Optional[APIError] = None) -> None:
        seq.sink(SeqEvent(seq.req.index, finish_reason=reason, error=error))
        self._release(seq)

    def _release(self, seq: _Sequence) -> None:
        if seq.finished:
            return
        seq.finished = True
        if seq in self._running:
            self._running.remove(seq)
        if seq.row >= 0:
            self._free_rows.append(seq.row)
            seq.row = -1
