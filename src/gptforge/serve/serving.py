"""Request logic of the OpenAI-compatible endpoints: validate, tokenize, submit to the engine, shape replies."""

from __future__ import annotations

import asyncio
import json
import re
import time
import uuid
from dataclasses import dataclass
from typing import Any, AsyncIterator, Optional

from fastapi import Request

from ..safety import CONTENT_FILTER, Moderator, OutputStreamGuard
from ..sampling import SamplingParams
from .engine import Engine, PromptLogprobs, RequestHandle, SeqEvent, SequenceRequest
from .errors import APIError, invalid_param
from .pii import mask_pii
from .protocol import (AssistantMessage, ChatChoice, ChatChunkChoice, ChatCompletionChunk, ChatCompletionRequest,
                       ChatCompletionResponse, ChatTokenLogprob, ChoiceLogprobs, CompletionChoice,
                       CompletionLogprobs, CompletionRequest, CompletionResponse, Delta, DetokenizeRequest,
                       DetokenizeResponse, ModelCard, ModelList, TokenizeRequest, TokenizeResponse, TokenizerInfo,
                       TopLogprob, Usage, to_jsonable)
from .ratelimit import RateLimiter

DISCONNECT_POLL_S = 0.25


@dataclass
class Prepared:
    """A validated request, ready for the engine."""

    prompts: list[list[int]]
    prompt_texts: list[Optional[str]]
    sequences: list[SequenceRequest]
    max_tokens: int
    blocked: bool = False  # the moderation policy refused the input: answer with the refusal, generate nothing


@dataclass
class _Submission:
    handle: RequestHandle
    queue: "asyncio.Queue[SeqEvent]"
    count: int


class StreamRedactor:
    """Masks PII in streamed text: holds text back to a line break (or 256 chars) so patterns are seen whole."""

    def __init__(self) -> None:
        self.pending = ""

    def push(self, text: str) -> str:
        self.pending += text
        cut = self.pending.rfind("\n") + 1
        if cut == 0 and len(self.pending) > 256:
            cut = self.pending.rfind(" ", 0, len(self.pending) - 64) + 1 or len(self.pending)
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return mask_pii(out) if out else ""

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return mask_pii(out) if out else ""


def _param_from_value_error(exc: ValueError) -> str:
    match = re.search(r"parameter (\w+)", str(exc))
    names = {"max_new_tokens": "max_tokens", "num_return_sequences": "n"}
    return names.get(match.group(1), match.group(1)) if match else "body"


class OpenAIServing:
    """Everything behind the routes; one instance per server."""

    def __init__(self, engine: Engine, tokenizer, model_name: str, *, redact_content: bool = False,
                 rate_limiter: Optional[RateLimiter] = None, moderator: Optional[Moderator] = None) -> None:
        self.engine = engine
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.block_size = engine.block_size
        self.vocab_size = engine.vocab_size
        self.redact_content = redact_content
        self.rate_limiter = rate_limiter or RateLimiter()
        self.moderator = moderator
        self.stop_ids = tokenizer.stop_token_ids()
        self._token_str_cache: dict[int, str] = {}

    # ---- small endpoints --------------------------------------------------------------------
    def models(self) -> dict[str, Any]:
        return to_jsonable(ModelList(data=[ModelCard(id=self.model_name, max_model_len=self.block_size)]))

    def tokenize(self, req: TokenizeRequest) -> dict[str, Any]:
        self._check_model(req.model, required=False)
        if req.messages is not None:
            text = self._render_chat(req.messages, req.add_generation_prompt)
        elif req.prompt is not None:
            text = req.prompt
        else:
            raise invalid_param("prompt", "give 'prompt' (text) or 'messages' (chat) to tokenize")
        ids = self.tokenizer.encode(text, add_special_tokens=req.add_special_tokens)
        return to_jsonable(TokenizeResponse(count=len(ids), max_model_len=self.block_size, tokens=ids,
                                            token_strs=[self.tokenizer.id_to_token(i) or "" for i in ids]))

    def detokenize(self, req: DetokenizeRequest) -> dict[str, Any]:
        self._check_model(req.model, required=False)
        self._check_token_ids(req.tokens, "tokens")
        return to_jsonable(DetokenizeResponse(prompt=self.tokenizer.decode(req.tokens)))

    def tokenizer_info(self) -> dict[str, Any]:
        from ..tokenizer import CHATML_TEMPLATE

        tok = self.tokenizer
        return to_jsonable(TokenizerInfo(eos_token=tok.eos_token, bos_token=tok.bos_token, pad_token=tok.pad_token,
                                         chat_template=tok.chat_template or CHATML_TEMPLATE,
                                         model_max_length=self.block_size, vocab_size=tok.vocab_size,
                                         add_bos_token=tok.add_bos))

    # ---- validation helpers -----------------------------------------------------------------
    def _check_model(self, model: Optional[str], required: bool = True) -> None:
        if model is None and not required:
            return
        if model != self.model_name:
            raise APIError(404, f"The model '{model}' does not exist; this server serves '{self.model_name}'",
                           param="model", code="model_not_found")

    def _check_token_ids(self, ids: list[int], param: str) -> None:
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise invalid_param(param, f"token id {bad[0]} is out of range (vocabulary size {self.vocab_size})")

    def _check_length(self, prompt_len: int, max_tokens: int, param: str) -> None:
        if prompt_len + max_tokens > self.block_size:
            raise invalid_param(
                param if prompt_len > self.block_size else "max_tokens",
                f"This model's maximum context length is {self.block_size} tokens. However, you requested "
                f"{prompt_len + max_tokens} tokens ({prompt_len} in the prompt, {max_tokens} for the completion). "
                "Please reduce the prompt or the completion length.")

    def _encode(self, text: str) -> list[int]:
        if self.redact_content:
            text = mask_pii(text)
        ids = self.tokenizer.encode(text)
        if not ids:  # an empty prompt still needs one token to condition on
            ids = [self.stop_ids[0] if self.stop_ids else 0]
        return ids

    def _render_chat(self, messages, add_generation_prompt: bool = True) -> str:
        rendered = [{"role": m.role if m.role != "developer" else "system", "content": m.text()} for m in messages]
        try:
            return self.tokenizer.apply_chat_template(rendered, add_generation_prompt=add_generation_prompt)
        except ValueError as exc:
            raise invalid_param("messages", str(exc)) from exc

    def _sampling_params(self, body: Any, max_tokens: int, top_logprobs: int, want_logprobs: bool) -> SamplingParams:
        bias = None
        if body.logit_bias:
            bias = {}
            for key, value in body.logit_bias.items():
                if not key.lstrip("-").isdigit() or not 0 <= int(key) < self.vocab_size:
                    raise invalid_param("logit_bias", f"logit_bias key {key!r} is not a token id "
                                        f"in [0, {self.vocab_size})")
                bias[int(key)] = value
        try:
            return SamplingParams(
                max_new_tokens=max(1, max_tokens), do_sample=body.temperature > 0, temperature=body.temperature,
                top_k=body.top_k, top_p=body.top_p, min_p=body.min_p, repetition_penalty=body.repetition_penalty,
                presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty, logit_bias=bias,
                stop=body.stop or None, eos_token_id=self.stop_ids or None, seed=body.seed,
                logprobs=want_logprobs, top_logprobs=top_logprobs)
        except ValueError as exc:
            raise invalid_param(_param_from_value_error(exc), str(exc)) from exc

    def _rate_limit(self, key_id: str, prep: Prepared) -> int:
        tokens = sum(len(p) for p in prep.prompts) + prep.max_tokens * len(prep.sequences)
        self.rate_limiter.admit(key_id, tokens)
        return tokens

    # ---- completions ------------------------------------------------------------------------
    def prepare_completion(self, body: CompletionRequest) -> Prepared:
        self._check_model(body.model)
        if body.suffix:
            raise invalid_param("suffix", "suffix (insertion) is not supported by this model")
        if body.best_of is not None and body.best_of != body.n:
            raise invalid_param("best_of", "best_of must equal n (candidates are not re-ranked)")
        prompt = body.prompt
        if isinstance(prompt, str):
            raw: list = [prompt]
        elif not prompt:
            raise invalid_param("prompt", "prompt must not be empty")
        elif isinstance(prompt[0], int):
            raw = [prompt]
        else:
            raw = list(prompt)
        prompts: list[list[int]] = []
        texts: list[Optional[str]] = []
        for i, p in enumerate(raw):
            if isinstance(p, str):
                prompts.append(self._encode(p))
                texts.append(mask_pii(p) if self.redact_content else p)
            else:
                if not p:
                    raise invalid_param(f"prompt[{i}]", "a token-id prompt must not be empty")
                self._check_token_ids(p, "prompt")
                prompts.append(list(p))  # used as given: no BOS added
                texts.append(None)
        if body.max_tokens is None:
            max_tokens = self.block_size - max(len(p) for p in prompts)
        else:
            max_tokens = body.max_tokens
        if max_tokens == 0 and not body.echo:
            raise invalid_param("max_tokens", "max_tokens must be at least 1 (0 is allowed only with echo)")
        for p in prompts:
            self._check_length(len(p), max_tokens, "prompt")
        top = body.logprobs or 0
        params = self._sampling_params(body, max_tokens, top, body.logprobs is not None)
        seqs = []
        for i, p in enumerate(prompts):
            for j in range(body.n):
                seq_params = params if body.seed is None else params.replace(seed=body.seed + j)
                seqs.append(SequenceRequest(index=i * body.n + j, prompt_ids=p, params=seq_params,
                                            max_tokens=max_tokens,
                                            prompt_logprobs=body.echo and body.logprobs is not None))
        blocked = self.moderator is not None and any(
            not self.moderator.check_input(t if t is not None else self.tokenizer.decode(p))
            for t, p in zip(texts, prompts))
        return Prepared(prompts, texts, seqs, max_tokens, blocked)

    def _token_str(self, token_id: int) -> str:
        s = self._token_str_cache.get(token_id)
        if s is None:
            s = self.tokenizer.decode([token_id])
            self._token_str_cache[token_id] = s
        return s

    def _top_dict(self, top) -> Optional[dict[str, float]]:
        if top is None:
            return None
        out: dict[str, float] = {}
        for tid, lp in top:
            key = self._token_str(tid)
            out[key] = max(lp, out.get(key, float("-inf")))
        return out

    async def completion(self, body: CompletionRequest, request: Request, key_id: str) -> Any:
        prep = self.prepare_completion(body)
        estimate = self._rate_limit(key_id, prep)
        request_id = f"cmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        sub = self._submit(prep)
        if body.stream:
            return self._stream_completion(body, prep, sub, request, request_id, created, key_id, estimate)
        results = await self._collect(prep, sub, request)
        choices = []
        completion_tokens = 0
        for seq in prep.sequences:
            res = results[seq.index]
            prompt_idx = seq.index // body.n
            completion_tokens += len(res["token_ids"])
            text = self._output_text(res["text"])
            logprobs = None
            if body.logprobs is not None:
                logprobs = self._completion_logprobs(res, body.echo, prep.prompts[prompt_idx])
            if body.echo:
                text = self._prompt_text(prep, prompt_idx) + text
            choices.append(CompletionChoice(finish_reason=res["finish_reason"], index=seq.index, logprobs=logprobs,
                                            text=text))
        usage = self._usage(prep, completion_tokens)
        self._account(key_id, estimate, usage, request)
        return to_jsonable(CompletionResponse(id=request_id, choices=choices, created=created,
                                              model=self.model_name, usage=usage))

    def _prompt_text(self, prep: Prepared, i: int) -> str:
        text = prep.prompt_texts[i]
        return text if text is not None else self.tokenizer.decode(prep.prompts[i])

    def _completion_logprobs(self, res: dict, echo: bool, prompt: list[int]) -> CompletionLogprobs:
        out = CompletionLogprobs()
        offset = 0
        entries: list[tuple[int, Optional[float], Any]] = []
        if echo:
            pl: PromptLogprobs = res["prompt_logprobs"]
            entries += list(zip(pl.token_ids, pl.logprobs, pl.top_logprobs))
        entries += list(zip(res["token_ids"], res["logprobs"], res["top_logprobs"]))
        for tid, lp, top in entries:
            s = self._token_str(tid)
            out.tokens.append(s)
            out.token_logprobs.append(lp)
            out.top_logprobs.append(self._top_dict(top))
            out.text_offset.append(offset)
            offset += len(s)
        return out

    def _usage(self, prep: Prepared, completion_tokens: int) -> Usage:
        prompt_tokens = sum(len(p) for p in prep.prompts)
        return Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                     total_tokens=prompt_tokens + completion_tokens)

    def _account(self, key_id: str, estimate: int, usage: Usage, request: Request) -> None:
        actual = usage.prompt_tokens + usage.completion_tokens
        self.rate_limiter.adjust(key_id, estimate, actual)
        request.state.usage = usage.model_dump()

    def _output_text(self, text: str) -> str:
        return mask_pii(text) if self.redact_content else text

    def _submit(self, prep: Prepared) -> "_Submission":
        """Queue the sequences now (so a full queue is a 429 before any stream starts)."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[SeqEvent] = asyncio.Queue()
        if prep.blocked:  # refused by the moderation policy: the refusal is the whole answer
            for seq in prep.sequences:
                queue.put_nowait(SeqEvent(seq.index, text=self.moderator.refusal, finish_reason=CONTENT_FILTER))
            return _Submission(RequestHandle([]), queue, len(prep.sequences))

        def sink(event: SeqEvent) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, event)
            except RuntimeError:  # loop closed: nobody is listening any more
                pass

        if len(prep.sequences) > self.engine.max_queue:  # could never be queued: not a "retry later"
            raise invalid_param("n", f"this request needs {len(prep.sequences)} sequences (prompts x n); the "
                                f"server queues at most {self.engine.max_queue}")
        handle = self.engine.submit(prep.sequences, sink)
        return _Submission(handle, queue, len(prep.sequences))

    async def _events(self, sub: "_Submission", request: Request) -> AsyncIterator[SeqEvent]:
        """Yield the sequences' events; cancels them if the client goes away or we stop early."""
        remaining = sub.count
        next_check = time.monotonic() + DISCONNECT_POLL_S
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
                yield event
        finally:
            sub.handle.cancel()

    async def _moderated(self, events: AsyncIterator[SeqEvent]) -> AsyncIterator[SeqEvent]:
        """Output moderation: a sequence whose text so far is blocked ends with finish_reason content_filter."""
        guards: dict[int, OutputStreamGuard] = {}
        async for ev in events:
            if self.moderator is None or not ev.text or ev.finish_reason == CONTENT_FILTER:
                if ev.index not in guards or not guards[ev.index].blocked:
                    yield ev
                continue
            guard = guards.setdefault(ev.index, self.moderator.stream_guard())
            if guard.blocked:
                continue  # the engine is still finishing it; nothing more is shown
            shown = guard.push(ev.text)
            if guard.blocked:
                yield SeqEvent(ev.index, token_id=ev.token_id, logprob=ev.logprob, top_logprobs=ev.top_logprobs,
                               finish_reason=CONTENT_FILTER)
            else:
                yield ev if shown == ev.text else SeqEvent(**{**ev.__dict__, "text": shown})

    async def _collect(self, prep: Prepared, sub: "_Submission", request: Request) -> dict[int, dict[str, Any]]:
        results = {s.index: {"text": "", "token_ids": [], "logprobs": [], "top_logprobs": [], "finish_reason": None,
                             "prompt_logprobs": None} for s in prep.sequences}
        async for ev in self._moderated(self._events(sub, request)):
            res = results[ev.index]
            res["text"] += ev.text
            if ev.prompt_logprobs is not None:
                res["prompt_logprobs"] = ev.prompt_logprobs
            if ev.token_id is not None:
                res["token_ids"].append(ev.token_id)
                res["logprobs"].append(ev.logprob)
                res["top_logprobs"].append(ev.top_logprobs)
            if ev.finish_reason is not None:
                res["finish_reason"] = ev.finish_reason
                if ev.finish_reason == CONTENT_FILTER:
                    res["text"] = self.moderator.refusal  # a blocked output is replaced, not truncated
        return results

    async def _stream_completion(self, body: CompletionRequest, prep: Prepared, sub: "_Submission",
                                 request: Request, request_id: str,
                                 created: int, key_id: str, estimate: int) -> AsyncIterator[str]:
        completion_tokens = 0
        redactors = {s.index: StreamRedactor() for s in prep.sequences} if self.redact_content else {}
        offsets = {s.index: 0 for s in prep.sequences}

        def chunk(index: int, text: str, finish: Optional[str], logprobs: Optional[CompletionLogprobs]) -> str:
            payload = CompletionResponse(id=request_id, created=created, model=self.model_name, choices=[
                CompletionChoice(index=index, text=text, finish_reason=finish, logprobs=logprobs)])
            return f"data: {json.dumps(to_jsonable(payload))}\n\n"

        try:
            if body.echo:
                for s in prep.sequences:
                    yield chunk(s.index, self._prompt_text(prep, s.index // body.n), None, None)
            async for ev in self._moderated(self._events(sub, request)):
                text = ev.text
                if redactors:
                    text = redactors[ev.index].push(text)
                    if ev.finish_reason is not None:
                        text += redactors[ev.index].flush()
                logprobs = None
                if body.logprobs is not None and (ev.token_id is not None or ev.prompt_logprobs is not None):
                    res = {"token_ids": [] if ev.token_id is None else [ev.token_id],
                           "logprobs": [] if ev.token_id is None else [ev.logprob],
                           "top_logprobs": [] if ev.token_id is None else [ev.top_logprobs],
                           "prompt_logprobs": ev.prompt_logprobs}
                    logprobs = self._completion_logprobs(res, ev.prompt_logprobs is not None, [])
                    logprobs.text_offset = [o + offsets[ev.index] for o in logprobs.text_offset]
                    offsets[ev.index] += sum(len(t) for t in logprobs.tokens)
                if ev.token_id is not None:
                    completion_tokens += 1
                if text or ev.finish_reason is not None or logprobs is not None:
                    yield chunk(ev.index, text, ev.finish_reason, logprobs)
            usage = self._usage(prep, completion_tokens)
            self._account(key_id, estimate, usage, request)
            if body.stream_options and body.stream_options.include_usage:
                payload = CompletionResponse(id=request_id, created=created, model=self.model_name, choices=[],
                                             usage=usage)
                yield f"data: {json.dumps(to_jsonable(payload))}\n\n"
            yield "data: [DONE]\n\n"
        except APIError as err:
            if err.status != 499:
                yield err.sse()

    # ---- chat -------------------------------------------------------------------------------
    def prepare_chat(self, body: ChatCompletionRequest) -> Prepared:
        self._check_model(body.model)
        if body.top_logprobs and not body.logprobs:
            raise invalid_param("top_logprobs", "top_logprobs requires logprobs to be true")
        if self.redact_content:
            for m in body.messages:
                if isinstance(m.content, str):
                    m.content = mask_pii(m.content)
                elif m.content:
                    for part in m.content:
                        part.text = mask_pii(part.text)
        text = self._render_chat(body.messages)
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        requested = body.max_completion_tokens or body.max_tokens
        if requested is None:
            if len(ids) >= self.block_size:
                self._check_length(len(ids), 1, "messages")
            max_tokens = self.block_size - len(ids)
        else:
            max_tokens = requested
            self._check_length(len(ids), max_tokens, "messages")
        json_mode = body.response_format is not None and body.response_format.type == "json_object"
        params = self._sampling_params(body, max_tokens, body.top_logprobs or 0, body.logprobs)
        seqs = [SequenceRequest(index=j, prompt_ids=ids, max_tokens=max_tokens, json_mode=json_mode,
                                params=params if body.seed is None else params.replace(seed=body.seed + j))
                for j in range(body.n)]
        blocked = self.moderator is not None and not self.moderator.check_messages(
            [{"role": m.role, "content": m.text()} for m in body.messages])
        return Prepared([ids], [text], seqs, max_tokens, blocked)

    def _chat_logprobs(self, token_ids, logprobs, tops) -> ChoiceLogprobs:
        content = []
        for tid, lp, top in zip(token_ids, logprobs, tops):
            s = self._token_str(tid)
            content.append(ChatTokenLogprob(
                token=s, bytes=list(s.encode("utf-8")), logprob=lp,
                top_logprobs=[TopLogprob(token=self._token_str(t), bytes=list(self._token_str(t).encode("utf-8")),
                                         logprob=v) for t, v in (top or [])]))
        return ChoiceLogprobs(content=content)

    async def chat(self, body: ChatCompletionRequest, request: Request, key_id: str) -> Any:
        prep = self.prepare_chat(body)
        estimate = self._rate_limit(key_id, prep)
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        sub = self._submit(prep)
        if body.stream:
            return self._stream_chat(body, prep, sub, request, request_id, created, key_id, estimate)
        results = await self._collect(prep, sub, request)
        choices = []
        completion_tokens = 0
        for seq in prep.sequences:
            res = results[seq.index]
            completion_tokens += len(res["token_ids"])
            logprobs = (self._chat_logprobs(res["token_ids"], res["logprobs"], res["top_logprobs"])
                        if body.logprobs else None)
            choices.append(ChatChoice(finish_reason=res["finish_reason"], index=seq.index, logprobs=logprobs,
                                      message=AssistantMessage(content=self._output_text(res["text"]))))
        usage = self._usage(prep, completion_tokens)
        self._account(key_id, estimate, usage, request)
        return to_jsonable(ChatCompletionResponse(id=request_id, choices=choices, created=created,
                                                  model=self.model_name, usage=usage))

    async def _stream_chat(self, body: ChatCompletionRequest, prep: Prepared, sub: "_Submission",
                                 request: Request, request_id: str,
                           created: int, key_id: str, estimate: int) -> AsyncIterator[str]:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        redactors = {s.index: StreamRedactor() for s in prep.sequences} if self.redact_content else {}

        def chunk(choices: list[ChatChunkChoice], usage: Optional[Usage] = None) -> str:
            payload = ChatCompletionChunk(id=request_id, created=created, model=self.model_name, choices=choices,
                                          usage=usage)
            data = to_jsonable(payload)
            if usage is None and include_usage:
                data["usage"] = None
            return f"data: {json.dumps(data)}\n\n"

        completion_tokens = 0
        try:
            for s in prep.sequences:
                yield chunk([ChatChunkChoice(index=s.index, delta=Delta(role="assistant", content=""))])
            async for ev in self._moderated(self._events(sub, request)):
                text = ev.text
                if redactors:
                    text = redactors[ev.index].push(text)
                    if ev.finish_reason is not None:
                        text += redactors[ev.index].flush()
                logprobs = None
                if ev.token_id is not None:
                    completion_tokens += 1
                    if body.logprobs:
                        logprobs = self._chat_logprobs([ev.token_id], [ev.logprob], [ev.top_logprobs])
                if text or logprobs is not None:
                    yield chunk([ChatChunkChoice(index=ev.index, delta=Delta(content=text), logprobs=logprobs)])
                if ev.finish_reason is not None:
                    yield chunk([ChatChunkChoice(index=ev.index, delta=Delta(), finish_reason=ev.finish_reason)])
            usage = self._usage(prep, completion_tokens)
            self._account(key_id, estimate, usage, request)
            if include_usage:
                yield chunk([], usage)
            yield "data: [DONE]\n\n"
        except APIError as err:
            if err.status != 499:
                yield err.sse()
