"""What every OpenAI endpoint shares: validation, tokenization off the event loop, limits, submission to
the engine, the event stream with moderation, typed per-sequence results and usage accounting.

Nothing CPU-heavy runs on the asyncio loop: tokenizing, rendering chat templates and PII masking go to
a small thread pool, so a multi-megabyte body never stalls `/health` or another client's stream. Cheap
limits (model name, counts, an upper bound on prompt length from its byte size) are checked before any
of that work, and rate limits before tokenization where they can be.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Optional, Sequence, TypeVar

from fastapi import Request

from ..errors import ParameterError
from ..safety import CONTENT_FILTER, Moderator
from ..sampling import SamplingParams
from .engine import Engine, PromptLogprobs, RequestHandle, SeqEvent, SequenceRequest
from .errors import APIError, invalid_param
from .grammar import GrammarConstraint, GrammarEngine, GrammarSpec
from .pii import mask_pii
from .protocol import PromptTokensDetails, Usage
from .ratelimit import RateLimiter

DISCONNECT_POLL_S = 0.25
# SamplingParams names that the OpenAI API calls differently.
PARAM_NAMES = {"max_new_tokens": "max_tokens", "num_return_sequences": "n"}
T = TypeVar("T")

# Tokenizing, template rendering and masking run here, never on the event loop. Two workers: enough to
# overlap with the engine thread on small machines without starving it.
_CPU_POOL = ThreadPoolExecutor(max_workers=2, thread_name_prefix="gptforge-cpu")


@dataclass
class SequenceResult:
    """Everything one generated sequence produced (a choice of the response)."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)  # sampled tokens, end-of-sequence included
    logprobs: list[Optional[float]] = field(default_factory=list)
    top_logprobs: list[Any] = field(default_factory=list)
    finish_reason: Optional[str] = None
    prompt_logprobs: Optional[PromptLogprobs] = None
    cached_tokens: int = 0


@dataclass
class Prepared:
    """A validated request, ready for the engine."""

    prompts: list[list[int]]
    prompt_texts: list[Optional[str]]  # as the model sees them (masked when content masking is on)
    sequences: list[SequenceRequest]
    max_tokens: int
    blocked: bool = False  # the moderation policy refused the input: answer with the refusal, generate nothing
    model: str = ""  # the model the request named (the base model or a LoRA adapter): responses echo it
    tool_names: frozenset[str] = frozenset()  # chat with tools: these calls are parsed out of the output


@dataclass
class Submission:
    handle: RequestHandle
    queue: "asyncio.Queue[SeqEvent]"
    count: int


class ServingBase:
    """State and helpers shared by the endpoint classes; one instance of each endpoint per server."""

    def __init__(self, engine: Engine, tokenizer: Any, model_name: str, *, redact_content: bool = False,
                 rate_limiter: Optional[RateLimiter] = None, moderator: Optional[Moderator] = None,
                 grammars: Optional[GrammarEngine] = None, prompt_lookup: tuple[int, int] = (0, 2)) -> None:
        self.engine = engine
        self.prompt_lookup = prompt_lookup  # the server's (draft tokens, n-gram) when a request names none
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.block_size = engine.block_size
        self.vocab_size = engine.vocab_size
        self.redact_content = redact_content
        self.rate_limiter = rate_limiter or RateLimiter()
        self.moderator = moderator
        self.stop_ids = tuple(tokenizer.stop_token_ids())
        table = tokenizer.token_bytes()
        # A prompt of more bytes than this cannot fit the context (no token is longer): refuse it untokenized.
        longest = max((len(b) for b in table if b), default=1) if table is not None else None
        self.max_prompt_bytes = self.block_size * longest if longest else None
        self._token_str_cache: dict[int, str] = {}
        self._grammars = grammars

    # ---- checks -------------------------------------------------------------------------------
    @property
    def adapter_slots(self) -> dict[str, int]:
        """LoRA adapters served beside the base model, by name (`gptforge serve --lora NAME=DIR`)."""
        adapters = getattr(self.engine, "adapters", None)
        return adapters.slots if adapters is not None else {}

    def check_model(self, model: Optional[str], required: bool = True, adapters: bool = True) -> int:
        """The adapter slot `model` names (0: the served model itself); 404 when it names neither (None
        passes when not required); with `adapters` False only the base model is accepted."""
        if model is None and not required:
            return 0
        if model == self.model_name:
            return 0
        slot = self.adapter_slots.get(model) if adapters else None
        if slot is None:
            others = f" and the LoRA adapters {sorted(self.adapter_slots)}" if self.adapter_slots else ""
            where = "" if adapters or not self.adapter_slots else " (this endpoint uses the base model alone)"
            raise APIError(404, f"The model '{model}' does not exist{where}; this server serves "
                           f"'{self.model_name}'{others}", param="model", code="model_not_found")
        return slot

    def check_token_ids(self, ids: Sequence[int], param: str, within_context: bool = True) -> None:
        if within_context and len(ids) > self.block_size:
            raise invalid_param(param, f"{len(ids)} tokens exceed the model's context of {self.block_size}")
        bad = next((i for i in ids if not 0 <= i < self.vocab_size), None)
        if bad is not None:
            raise invalid_param(param, f"token id {bad} is out of range (vocabulary size {self.vocab_size})")

    def check_text_size(self, text: str, param: str) -> None:
        """Refuse, before tokenizing, a text too long to fit the context whatever its tokens."""
        if self.max_prompt_bytes is not None and len(text) > self.max_prompt_bytes // 4 and \
                len(text.encode("utf-8")) > self.max_prompt_bytes:
            raise invalid_param(param, f"the text ({len(text):,} characters) cannot fit the model's context of "
                                f"{self.block_size} tokens")

    def check_length(self, prompt_len: int, max_tokens: int, param: str) -> None:
        if prompt_len + max_tokens > self.block_size:
            raise invalid_param(
                param if prompt_len >= self.block_size else "max_tokens",
                f"This model's maximum context length is {self.block_size} tokens. However, you requested "
                f"{prompt_len + max_tokens} tokens ({prompt_len} in the prompt, {max_tokens} for the completion). "
                "Please reduce the prompt or the completion length.")

    def completion_budget(self, requested: Optional[int], prompt_lens: Sequence[int], param: str) -> int:
        """`requested` checked against the context, or (None) what is left after the longest prompt."""
        longest = max(prompt_lens)
        if requested is None:
            if longest >= self.block_size:  # nothing left to generate into
                self.check_length(longest, 1, param)
            return self.block_size - longest
        for n in prompt_lens:
            self.check_length(n, requested, param)
        return requested

    # ---- CPU work off the event loop ----------------------------------------------------------
    @staticmethod
    async def run_cpu(fn: Callable[..., T], *args: Any) -> T:
        """Run `fn(*args)` in the CPU pool so the event loop keeps serving other requests."""
        return await asyncio.get_running_loop().run_in_executor(_CPU_POOL, fn, *args)

    def encode(self, text: str) -> list[int]:
        """Token ids of a text prompt (masked first when content masking is on); never empty."""
        if self.redact_content:
            text = mask_pii(text)
        ids = self.tokenizer.encode(text)
        return ids or [self.stop_ids[0] if self.stop_ids else 0]  # an empty prompt still needs one token

    def render_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                    tools: Optional[list[dict[str, Any]]] = None) -> str:
        """The conversation (and tools) as the chat template renders it; 400 `messages` when it cannot."""
        try:
            return self.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                                      tools=tools)
        except ValueError as exc:
            raise invalid_param("messages", str(exc)) from exc

    # ---- parameters ---------------------------------------------------------------------------
    def sampling_params(self, body: Any, max_tokens: int, top_logprobs: int, want_logprobs: bool) -> SamplingParams:
        bias = None
        if body.logit_bias:
            bias = {}
            for key, value in body.logit_bias.items():
                if not key.lstrip("-").isdigit() or not 0 <= int(key) < self.vocab_size:
                    raise invalid_param("logit_bias", f"logit_bias key {key[:32]!r} is not a token id "
                                        f"in [0, {self.vocab_size})")
                bias[int(key)] = value
        try:
            return SamplingParams(
                max_new_tokens=max(1, max_tokens), do_sample=body.temperature > 0, temperature=body.temperature,
                top_k=body.top_k, top_p=body.top_p, min_p=body.min_p, repetition_penalty=body.repetition_penalty,
                presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty, logit_bias=bias,
                stop=body.stop or None, eos_token_id=list(self.stop_ids) or None, seed=body.seed,
                logprobs=want_logprobs, top_logprobs=top_logprobs,
                prompt_lookup_num_tokens=_given(body, "prompt_lookup_num_tokens", self.prompt_lookup[0]),
                max_matching_ngram_size=_given(body, "max_matching_ngram_size", self.prompt_lookup[1]))
        except ParameterError as exc:
            raise invalid_param(PARAM_NAMES.get(exc.param, exc.param), str(exc)) from exc

    @property
    def grammars(self) -> GrammarEngine:
        """The server's grammar engine (built on first use when the app did not hand one over)."""
        if self._grammars is None:
            self._grammars = GrammarEngine(self.tokenizer, self.vocab_size, self.stop_ids)
        return self._grammars

    @staticmethod
    def output_spec(response_format: Any, structured: Any) -> Optional[GrammarSpec]:
        """The grammar asked for by `response_format` and/or the `structured_outputs` extension (not both)."""
        spec = None
        if response_format is not None and response_format.type == "json_object":
            spec = GrammarSpec.json_object()
        elif response_format is not None and response_format.type == "json_schema":
            fmt = response_format.json_schema
            if fmt is None or fmt.schema_ is None:
                raise invalid_param("response_format.json_schema.schema", "give the JSON schema the reply must match")
            spec = GrammarSpec.json_schema(fmt.schema_, "response_format.json_schema.schema")
        if structured is None:
            return spec
        given = [k for k in ("json_", "regex", "choice", "grammar") if getattr(structured, k) is not None]
        if len(given) != 1:
            raise invalid_param("structured_outputs", "give exactly one of json, regex, choice or grammar")
        if spec is not None:
            raise invalid_param("structured_outputs", "use either response_format or structured_outputs, not both")
        kind = given[0]
        value = getattr(structured, kind)
        if kind == "json_":
            return GrammarSpec.json_schema(value, "structured_outputs.json")
        if kind == "regex":
            return GrammarSpec.regex(value, "structured_outputs.regex")
        if kind == "choice":
            return GrammarSpec.choice(value, "structured_outputs.choice")
        return GrammarSpec.lark(value, "structured_outputs.grammar")

    async def constraints(self, spec: Optional[GrammarSpec], count: int) -> list[Optional[GrammarConstraint]]:
        """`count` fresh constraints for `spec` (compiled off the event loop, cached), or Nones without one."""
        if spec is None:
            return [None] * count
        compiled = await self.run_cpu(self.grammars.compile, spec)
        return [self.grammars.constraint(compiled) for _ in range(count)]

    # ---- rate limits and usage ----------------------------------------------------------------
    def admit_tokens(self, key_id: str, prep: Prepared) -> int:
        tokens = sum(len(p) for p in prep.prompts) + prep.max_tokens * len(prep.sequences)
        limit = self.rate_limiter.tpm
        if limit and tokens > limit:  # can never succeed: not a "retry later"
            raise invalid_param("max_tokens", f"this request needs {tokens} tokens (prompt + max_tokens x choices), "
                                f"more than this key's limit of {limit} tokens per minute")
        self.rate_limiter.admit_tokens(key_id, tokens)
        return tokens

    def usage(self, prep: Prepared, completion_tokens: int, cached: Optional[dict[int, int]] = None) -> Usage:
        """Usage of a request; `cached`: prefix-cache tokens by sequence index (a prompt counts its first
        choice's, the one admitted first, as its choices share the prompt)."""
        prompt_tokens = sum(len(p) for p in prep.prompts)
        per_prompt = max(1, len(prep.sequences) // max(1, len(prep.prompts)))
        cached_tokens = sum((cached or {}).get(p * per_prompt, 0) for p in range(len(prep.prompts)))
        return Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                     total_tokens=prompt_tokens + completion_tokens,
                     prompt_tokens_details=PromptTokensDetails(cached_tokens=cached_tokens))

    def account(self, key_id: str, estimate: int, usage: Usage, request: Request) -> None:
        self.rate_limiter.adjust(key_id, estimate, usage.prompt_tokens + usage.completion_tokens)
        request.state.usage = usage.model_dump()

    def output_text(self, text: str) -> str:
        return mask_pii(text) if self.redact_content else text

    def token_str(self, token_id: int) -> str:
        s = self._token_str_cache.get(token_id)
        if s is None:
            s = self.tokenizer.decode([token_id])
            self._token_str_cache[token_id] = s
        return s

    # ---- the engine -------------------------------------------------------------------------------
    def submit(self, prep: Prepared) -> Submission:
        """Queue the sequences now (so a full queue is a 429 before any stream starts)."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[SeqEvent] = asyncio.Queue()
        if prep.blocked:  # refused by the moderation policy: the refusal is the whole answer
            for seq in prep.sequences:
                queue.put_nowait(SeqEvent(seq.index, text=self.moderator.refusal, finish_reason=CONTENT_FILTER))
            return Submission(RequestHandle([]), queue, len(prep.sequences))

        def put_all(events: list[SeqEvent]) -> None:
            for event in events:
                queue.put_nowait(event)

        def sink(events: list[SeqEvent]) -> None:  # called on the engine thread, once per step
            try:
                loop.call_soon_threadsafe(put_all, events)
            except RuntimeError:  # loop closed: nobody is listening any more
                pass

        handle = self.engine.submit(prep.sequences, sink)
        return Submission(handle, queue, len(prep.sequences))

    async def events(self, sub: Submission, request: Request) -> AsyncIterator[SeqEvent]:
        """The sequences' events, moderated; cancels them if the client goes away or we stop early."""
        remaining = sub.count
        next_check = time.monotonic() + DISCONNECT_POLL_S
        guards: dict[int, Any] = {}
        try:
            while remaining:
                try:
                    event = await asyncio.wait_for(sub.queue.get(), DISCONNECT_POLL_S)
                except asyncio.TimeoutError:
                    event = None
                if time.monotonic() >= next_check:  # events may flow steadily: check on a clock, not on idle
                    next_check = time.monotonic() + DISCONNECT_POLL_S
                    if await request.is_disconnected():
                        raise APIError(499, "client disconnected", code="client_disconnected")
                if event is None:
                    continue
                if event.error is not None:
                    raise event.error
                if event.finish_reason is not None:
                    remaining -= 1
                event = self._moderate(event, guards)
                if event is not None:
                    yield event
        finally:
            sub.handle.cancel()

    def _moderate(self, event: SeqEvent, guards: dict[int, Any]) -> Optional[SeqEvent]:
        """Output moderation: a sequence whose text so far is blocked ends with finish_reason content_filter."""
        if self.moderator is None or event.finish_reason == CONTENT_FILTER:
            return event
        guard = guards.setdefault(event.index, self.moderator.stream_guard())
        if guard.blocked:  # the engine is still finishing it; only its end is reported (already)
            return None
        shown = guard.push(event.text) if event.text else ""
        if guard.blocked:
            return SeqEvent(event.index, token_id=event.token_id, logprob=event.logprob,
                            top_logprobs=event.top_logprobs, finish_reason=CONTENT_FILTER)
        if shown != event.text:
            event = SeqEvent(**{**event.__dict__, "text": shown})
        return event

    async def collect(self, prep: Prepared, sub: Submission, request: Request) -> dict[int, SequenceResult]:
        """Wait for every sequence to finish; their results by index."""
        results = {s.index: SequenceResult(s.index) for s in prep.sequences}
        async for ev in self.events(sub, request):
            res = results[ev.index]
            res.text += ev.text
            if ev.prompt_logprobs is not None:
                res.prompt_logprobs = ev.prompt_logprobs
            if ev.token_id is not None:
                res.token_ids.append(ev.token_id)
                res.logprobs.append(ev.logprob)
                res.top_logprobs.append(ev.top_logprobs)
            if ev.finish_reason is not None:
                res.finish_reason = ev.finish_reason
                res.cached_tokens = ev.cached_tokens or 0
                if ev.finish_reason == CONTENT_FILTER:
                    res.text = self.moderator.refusal  # a blocked output is replaced, not truncated
        return results


__all__ = ["ServingBase", "SequenceResult", "Prepared", "Submission", "PARAM_NAMES"]


def _given(body: Any, name: str, default: int) -> int:
    """A request's extension field, or the server's default where the request leaves it out."""
    value = getattr(body, name, None)
    return default if value is None else value
