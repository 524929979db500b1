"""POST /v1/chat/completions: messages rendered with the tokenizer's chat template, JSON mode, streaming."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, AsyncIterator, Optional

from fastapi import Request

from .engine import SequenceRequest
from .errors import APIError, invalid_param
from .pii import StreamRedactor, mask_pii
from .protocol import (AssistantMessage, ChatChoice, ChatChunkChoice, ChatCompletionChunk, ChatCompletionRequest,
                       ChatCompletionResponse, ChatTokenLogprob, ChoiceLogprobs, Delta, TopLogprob, Usage,
                       to_jsonable)
from .serving_base import Prepared, ServingBase, Submission


def chat_messages(body_messages: list, mask: bool) -> list[dict[str, str]]:
    """Messages as the chat template reads them ("developer" is a system message); masked when asked.

    The request body itself is never changed."""
    out = []
    for m in body_messages:
        text = m.text()
        out.append({"role": "system" if m.role == "developer" else m.role, "content": mask_pii(text) if mask else text})
    return out


class ChatServing(ServingBase):
    """The chat completions endpoint."""

    async def prepare(self, body: ChatCompletionRequest, key_id: str) -> Prepared:
        """Validate (cheap checks first), count the request, render and tokenize off the loop."""
        self.check_model(body.model)
        if body.top_logprobs and not body.logprobs:
            raise invalid_param("top_logprobs", "top_logprobs requires logprobs to be true")
        if body.n > self.engine.max_queue:
            raise invalid_param("n", f"n={body.n} exceeds the {self.engine.max_queue} sequences the server queues")
        for i, m in enumerate(body.messages):
            self.check_text_size(m.text(), f"messages[{i}].content")
        self.rate_limiter.admit_request(key_id)
        messages, text, ids = await self.run_cpu(self._render, body)
        requested = body.max_completion_tokens or body.max_tokens
        max_tokens = self.completion_budget(requested, [len(ids)], "messages")
        json_mode = body.response_format is not None and body.response_format.type == "json_object"
        params = self.sampling_params(body, max_tokens, body.top_logprobs or 0, body.logprobs)
        seqs = [SequenceRequest(index=j, prompt_ids=ids, max_tokens=max_tokens, stop_token_ids=self.stop_ids,
                                constraint=self.json_constraint() if json_mode else None,
                                params=params if body.seed is None else params.replace(seed=body.seed + j))
                for j in range(body.n)]
        blocked = self.moderator is not None and not self.moderator.check_messages(messages)
        return Prepared([ids], [text], seqs, max_tokens, blocked)

    def _render(self, body: ChatCompletionRequest) -> tuple[list[dict[str, str]], str, list[int]]:
        messages = chat_messages(body.messages, self.redact_content)
        text = self.render_chat(messages)
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
            choices.append(ChatChoice(finish_reason=res.finish_reason, index=seq.index, logprobs=logprobs,
                                      message=AssistantMessage(content=self.output_text(res.text))))
        usage = self.usage(prep, sum(len(r.token_ids) for r in results.values()))
        self.account(key_id, estimate, usage, request)
        return to_jsonable(ChatCompletionResponse(id=request_id, choices=choices, created=created,
                                                  model=self.model_name, usage=usage))

    async def _stream(self, body: ChatCompletionRequest, prep: Prepared, sub: Submission, request: Request,
                      request_id: str, created: int, key_id: str, estimate: int) -> AsyncIterator[str]:
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
            async for ev in self.events(sub, request):
                text = ev.text
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
                if ev.finish_reason is not None:
                    yield chunk([ChatChunkChoice(index=ev.index, delta=Delta(), finish_reason=ev.finish_reason)])
            usage = self.usage(prep, completion_tokens)
            self.account(key_id, estimate, usage, request)
            if include_usage:
                yield chunk([], usage)
            yield "data: [DONE]\n\n"
        except APIError as err:
            if err.status != 499:
                yield err.sse()


__all__ = ["ChatServing", "chat_messages"]
