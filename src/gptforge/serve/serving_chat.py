"""POST /v1/chat/completions: messages rendered with the tokenizer's chat template, structured outputs,
tool calls, streaming."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, AsyncIterator, Optional

from fastapi import Request

from .engine import SequenceRequest
from .errors import APIError, invalid_param
from .pii import StreamRedactor, mask_pii
from .grammar import GrammarSpec
from .protocol import (AssistantMessage, ChatChoice, ChatChunkChoice, ChatCompletionChunk, ChatCompletionRequest,
                       ChatCompletionResponse, ChatTokenLogprob, ChoiceLogprobs, Delta, DeltaFunctionCall,
                       DeltaToolCall, FunctionCall, ToolCall, TopLogprob, Usage, to_jsonable)
from .serving_base import Prepared, ServingBase, Submission
from .tools import ParsedCall, ToolCallStream, call_grammar, parse_tool_calls, tool_parameters


def chat_messages(body_messages: list, mask: bool) -> list[dict[str, Any]]:
    """Messages as chat templates read them (Hugging Face's conventions: "developer" is a system message, tool
    call arguments are dicts when they parse); masked when asked. The request body itself is never changed."""
    out = []
    for m in body_messages:
        text = m.text()
        message: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role,
                                   "content": mask_pii(text) if mask else text}
        if m.tool_calls:
            message["tool_calls"] = [{"id": c.id, "type": "function", "function": {
                "name": c.function.name, "arguments": _arguments(mask_pii(c.function.arguments) if mask
                                                                 else c.function.arguments)}} for c in m.tool_calls]
        if m.tool_call_id is not None:
            message["tool_call_id"] = m.tool_call_id
        if m.name is not None:
            message["name"] = m.name
        out.append(message)
    return out


def _arguments(text: str) -> Any:
    try:
        value = json.loads(text)
    except ValueError:
        return text
    return value if isinstance(value, dict) else text


class ChatServing(ServingBase):
    """The chat completions endpoint."""

    async def prepare(self, body: ChatCompletionRequest, key_id: str) -> Prepared:
        """Validate (cheap checks first), count the request, render and tokenize off the loop, compile grammars."""
        adapter = self.check_model(body.model)
        if body.top_logprobs and not body.logprobs:
            raise invalid_param("top_logprobs", "top_logprobs requires logprobs to be true")
        if body.n > self.engine.max_queue:
            raise invalid_param("n", f"n={body.n} exceeds the {self.engine.max_queue} sequences the server queues")
        for i, m in enumerate(body.messages):
            self.check_text_size(m.text(), f"messages[{i}].content")
        self.rate_limiter.admit_request(key_id)
        choice, spec, tool_params = await self.run_cpu(self._tool_plan, body)  # schemas may be large: off the loop
        messages, text, ids = await self.run_cpu(self._render, body, choice != "none")
        if tool_params and choice == "auto":  # the schemas are not compiled into this request's grammar: check them
            await self.run_cpu(self._check_schemas, tool_params)
        requested = body.max_completion_tokens or body.max_tokens
        max_tokens = self.completion_budget(requested, [len(ids)], "messages")
        constraints = await self.constraints(spec, body.n)
        params = self.sampling_params(body, max_tokens, body.top_logprobs or 0, body.logprobs)
        seqs = [SequenceRequest(index=j, prompt_ids=ids, max_tokens=max_tokens, stop_token_ids=self.stop_ids,
                                constraint=constraints[j], adapter=adapter,
                                params=params if body.seed is None else params.replace(seed=body.seed + j))
                for j in range(body.n)]
        blocked = self.moderator is not None and not self.moderator.check_messages(messages)
        names = frozenset(t.function.name for t in body.tools) if body.tools and choice != "none" else frozenset()
        return Prepared([ids], [text], seqs, max_tokens, blocked, tool_names=names, model=body.model)

    def _tool_plan(self, body: ChatCompletionRequest) -> tuple[str, Optional[GrammarSpec], list[str]]:
        """(tool choice, the output grammar or None, the tools' parameter schemas) after the cheap checks."""
        tools = body.tools or []
        tool_params = tool_parameters(tools)
        choice = body.tool_choice if body.tool_choice is not None else ("auto" if tools else "none")
        named = None if isinstance(choice, str) else choice.function.name
        if choice not in ("none", "auto") and not tools:
            raise invalid_param("tool_choice", "tool_choice needs tools: give the functions the model may call")
        if named is not None and named not in {t.function.name for t in tools}:
            raise invalid_param("tool_choice", f"no tool is named {named[:64]!r}")
        forced = choice == "required" or named is not None
        if forced and (body.structured_outputs is not None or
                       (body.response_format is not None and body.response_format.type != "text")):
            raise invalid_param("tool_choice", "a required tool call cannot also follow response_format or "
                                "structured_outputs")
        spec = call_grammar(tools, tool_params, named, body.parallel_tool_calls and named is None) if forced \
            else self.output_spec(body.response_format, body.structured_outputs)
        return ("required" if forced else choice), spec, tool_params

    def _check_schemas(self, tool_params: list[str]) -> None:
        for i, params in enumerate(tool_params):
            self.grammars.compile(GrammarSpec("json_schema", params, f"tools[{i}].function.parameters"))

    def _render(self, body: ChatCompletionRequest, with_tools: bool) -> tuple[list[dict[str, Any]], str, list[int]]:
        messages = chat_messages(body.messages, self.redact_content)
        tools = [t.model_dump(exclude_none=True) for t in body.tools] if body.tools and with_tools else None
        text = self.render_chat(messages, tools=tools)
        self.check_text_size(text, "messages")
        return messages, text, self.tokenizer.encode(text, add_special_tokens=False)

    def _logprobs(self, token_ids: list[int], logprobs: list, tops: list) -> ChoiceLogprobs:
        content = []
        for tid, lp, top in zip(token_ids, logprobs, tops):
            s = self.token_str(tid)
            content.append(ChatTokenLogprob(
                token=s, bytes=list(s.encode("utf-8")), logprob=lp,
                top_logprobs=[TopLogprob(token=self.token_str(t), bytes=list(self.token_str(t).encode("utf-8")),
                                         logprob=v) for t, v in (top or [])]))
        return ChoiceLogprobs(content=content)

    async def create(self, body: ChatCompletionRequest, request: Request, key_id: str) -> Any:
        """A response dict, or an async iterator of server-sent events when streaming."""
        prep = await self.prepare(body, key_id)
        estimate = self.admit_tokens(key_id, prep)
        request_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        sub = self.submit(prep)
        if body.stream:
            return self._stream(body, prep, sub, request, request_id, created, key_id, estimate)
        results = await self.collect(prep, sub, request)
        choices = []
        for seq in prep.sequences:
            res = results[seq.index]
            logprobs = self._logprobs(res.token_ids, res.logprobs, res.top_logprobs) if body.logprobs else None
            content, calls = res.text, []
            if prep.tool_names and res.finish_reason != "content_filter":
                content, calls = parse_tool_calls(res.text, set(prep.tool_names))
            message = AssistantMessage(content=self.output_text(content) if content is not None else None,
                                       tool_calls=[self._tool_call(c) for c in calls] or None)
            finish = "tool_calls" if calls and res.finish_reason == "stop" else res.finish_reason
            choices.append(ChatChoice(finish_reason=finish, index=seq.index, logprobs=logprobs, message=message))
        usage = self.usage(prep, sum(len(r.token_ids) for r in results.values()),
                           {i: r.cached_tokens for i, r in results.items()})
        self.account(key_id, estimate, usage, request)
        return to_jsonable(ChatCompletionResponse(id=request_id, choices=choices, created=created,
                                                  model=prep.model, usage=usage))

    def _tool_call(self, call: ParsedCall) -> ToolCall:
        return ToolCall(id=call.id, function=FunctionCall(name=call.name, arguments=self.output_text(call.arguments)))

    async def _stream(self, body: ChatCompletionRequest, prep: Prepared, sub: Submission, request: Request,
                      request_id: str, created: int, key_id: str, estimate: int) -> AsyncIterator[str]:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        redactors = {s.index: StreamRedactor() for s in prep.sequences} if self.redact_content else {}

        def chunk(choices: list[ChatChunkChoice], usage: Optional[Usage] = None) -> str:
            payload = ChatCompletionChunk(id=request_id, created=created, model=prep.model, choices=choices,
                                          usage=usage)
            data = to_jsonable(payload)
            if usage is None and include_usage:
                data["usage"] = None
            return f"data: {json.dumps(data)}\n\n"

        completion_tokens = 0
        cached: dict[int, int] = {}
        parsers = {s.index: ToolCallStream(set(prep.tool_names)) for s in prep.sequences} if prep.tool_names else {}
        calls_made = {s.index: 0 for s in prep.sequences}
        try:
            for s in prep.sequences:
                yield chunk([ChatChunkChoice(index=s.index, delta=Delta(role="assistant", content=""))])
            async for ev in self.events(sub, request):
                text, calls = ev.text, []
                if parsers and ev.finish_reason != "content_filter":
                    text, calls = parsers[ev.index].push(text)
                    if ev.finish_reason is not None:
                        tail, more = parsers[ev.index].flush()
                        text, calls = text + tail, calls + more
                if redactors:
                    text = redactors[ev.index].push(text)
                    if ev.finish_reason is not None:
                        text += redactors[ev.index].flush()
                logprobs = None
                if ev.token_id is not None:
                    completion_tokens += 1
                    if body.logprobs:
                        logprobs = self._logprobs([ev.token_id], [ev.logprob], [ev.top_logprobs])
                if text or logprobs is not None:
                    yield chunk([ChatChunkChoice(index=ev.index, delta=Delta(content=text), logprobs=logprobs)])
                if calls:
                    deltas = []
                    for call in calls:
                        deltas.append(DeltaToolCall(index=calls_made[ev.index], id=call.id, type="function",
                                                    function=DeltaFunctionCall(
                                                        name=call.name, arguments=self.output_text(call.arguments))))
                        calls_made[ev.index] += 1
                    yield chunk([ChatChunkChoice(index=ev.index, delta=Delta(tool_calls=deltas))])
                if ev.finish_reason is not None:
                    cached[ev.index] = ev.cached_tokens or 0
                    finish = "tool_calls" if calls_made[ev.index] and ev.finish_reason == "stop" else ev.finish_reason
                    yield chunk([ChatChunkChoice(index=ev.index, delta=Delta(), finish_reason=finish)])
            usage = self.usage(prep, completion_tokens, cached)
            self.account(key_id, estimate, usage, request)
            if include_usage:
                yield chunk([], usage)
            yield "data: [DONE]\n\n"
        except APIError as err:
            if err.status != 499:
                yield err.sse()


__all__ = ["ChatServing", "chat_messages"]
