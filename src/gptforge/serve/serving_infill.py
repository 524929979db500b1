"""POST /infill: llama.cpp server's fill-in-the-middle endpoint, so editor plugins that speak it (llama.vscode,
llama.vim) work against gptforge. The prompt comes from gptforge.fim.infill_prompt, like `suffix` on
/v1/completions; the response has llama.cpp's shape (content, stop, tokens, timings, ...)."""

from __future__ import annotations

import json
import time
from contextlib import aclosing
from types import SimpleNamespace
from typing import Any, AsyncIterator, Optional

from fastapi import Request

from ..fim import FimError, cut_at_indent, fim_stop_ids, infill_prompt
from .engine import SequenceRequest
from .errors import APIError, invalid_param
from .protocol import InfillRequest
from .serving_base import Prepared, ServingBase


class IndentLimit:
    """llama.cpp's `n_indent` on a stream of text: what may be shown, and whether the limit ended the text."""

    def __init__(self, n_indent: int) -> None:
        self.n_indent, self.text, self.shown, self.hit = n_indent, "", 0, False

    def push(self, delta: str) -> str:
        """Add generated text; returns the part now known to stay."""
        self.text += delta
        self.text, self.hit = cut_at_indent(self.text, self.n_indent)
        safe = len(self.text)
        if self.n_indent > 0 and not self.hit:  # a new line that is blanks so far may still be cut
            newline = self.text.rfind("\n")
            if newline != -1 and not self.text[newline + 1:].strip(" \t"):
                safe = newline + 1
        out, self.shown = self.text[self.shown:safe], max(self.shown, safe)
        return out

    def flush(self) -> str:
        out, self.shown = self.text[self.shown:], len(self.text)
        return out


def select_fields(payload: dict[str, Any], fields: Optional[list[str]]) -> dict[str, Any]:
    """llama.cpp's `response_fields`: only these paths ("timings/prompt_n"), keyed by the path."""
    if fields is None:
        return payload
    out: dict[str, Any] = {}
    for path in fields:
        value: Any = payload
        for part in path.split("/"):
            value = value.get(part, KeyError) if isinstance(value, dict) else KeyError
        if value is not KeyError:
            out[path] = value
    return out


class InfillServing(ServingBase):
    """The /infill endpoint."""

    async def prepare(self, body: InfillRequest, key_id: str) -> tuple[Prepared, bool]:
        """Validate, build the FIM prompt (cut to fit the context), make the sequence; also says if it was cut."""
        for name in ("input_prefix", "input_suffix", "prompt"):
            self.check_text_size(getattr(body, name), name)
        if body.n_predict >= self.block_size:
            raise invalid_param("n_predict", f"n_predict ({body.n_predict}) must be below the model's context "
                                f"of {self.block_size} tokens")
        self.rate_limiter.admit_request(key_id)
        reserve = body.n_predict if body.n_predict > 0 else max(1, self.block_size // 4)
        extra = [(chunk.filename, chunk.text) for chunk in body.input_extra]
        try:
            built = await self.run_cpu(lambda: infill_prompt(
                self.tokenizer, self._masked(body.input_prefix + body.prompt), self._masked(body.input_suffix),
                extra=[(f, self._masked(t)) for f, t in extra], max_prompt_tokens=self.block_size - reserve,
                param="input_suffix"))
        except FimError as exc:
            raise invalid_param(exc.param, str(exc)) from exc
        max_tokens = self.completion_budget(body.n_predict if body.n_predict > 0 else None, [len(built.ids)],
                                            "input_prefix")
        view = SimpleNamespace(temperature=body.temperature, top_k=body.top_k, top_p=body.top_p, min_p=body.min_p,
                               repetition_penalty=body.repeat_penalty, presence_penalty=body.presence_penalty,
                               frequency_penalty=body.frequency_penalty, logit_bias=None, stop=body.stop,
                               seed=None if body.seed < 0 or body.seed == 0xFFFFFFFF else body.seed % 2**63,
                               prompt_lookup_num_tokens=body.prompt_lookup_num_tokens,
                               max_matching_ngram_size=body.max_matching_ngram_size)
        params = self.sampling_params(view, max_tokens, 0, False)
        stops = tuple(sorted({*self.stop_ids, *fim_stop_ids(self.tokenizer)}))
        seq = SequenceRequest(index=0, prompt_ids=built.ids, params=params, max_tokens=max_tokens,
                              stop_token_ids=stops)
        text = body.input_prefix + body.prompt + body.input_suffix
        blocked = self.moderator is not None and not self.moderator.check_input(text)
        return Prepared([built.ids], [text], [seq], max_tokens, blocked), built.truncated

    def _masked(self, text: str) -> str:
        from .pii import mask_pii

        return mask_pii(text) if self.redact_content else text

    def _payload(self, body: InfillRequest, prep: Prepared, truncated: bool, content: str, tokens: list[int],
                 stop_type: str, times: tuple[float, float, float]) -> dict[str, Any]:
        """The final response object, as llama.cpp's server writes it."""
        start, first, end = times
        prompt_n, predicted_n = len(prep.prompts[0]), len(tokens)
        prompt_ms, predicted_ms = (first - start) * 1000, (end - first) * 1000
        return {
            "index": 0, "content": content, "tokens": tokens if body.return_tokens else [], "id_slot": 0,
            "stop": True, "model": self.model_name, "tokens_predicted": predicted_n, "tokens_evaluated": prompt_n,
            "generation_settings": {"n_predict": body.n_predict, "temperature": body.temperature,
                                    "top_k": body.top_k, "top_p": body.top_p, "min_p": body.min_p,
                                    "n_indent": body.n_indent, "stop": _stop_list(body.stop)},
            "prompt": self.tokenizer.decode(prep.prompts[0]), "has_new_line": "\n" in content,
            "truncated": truncated, "stop_type": stop_type, "stopping_word": "",
            "tokens_cached": prompt_n + predicted_n,
            "timings": {"prompt_n": prompt_n, "prompt_ms": prompt_ms,
                        "prompt_per_token_ms": prompt_ms / max(prompt_n, 1),
                        "prompt_per_second": prompt_n / max(first - start, 1e-9),
                        "predicted_n": predicted_n, "predicted_ms": predicted_ms,
                        "predicted_per_token_ms": predicted_ms / max(predicted_n, 1),
                        "predicted_per_second": predicted_n / max(end - first, 1e-9)},
        }

    def _stop_type(self, finish: Optional[str], tokens: list[int], indent_hit: bool) -> str:
        if indent_hit or finish == "length":
            return "limit"
        if finish == "stop":
            ended_by_token = bool(tokens) and (tokens[-1] in self.stop_ids or tokens[-1] in fim_stop_ids(self.tokenizer))
            return "eos" if ended_by_token else "word"
        return "none"

    async def create(self, body: InfillRequest, request: Request, key_id: str) -> Any:
        """A response dict, or an async iterator of server-sent events when streaming."""
        prep, truncated = await self.prepare(body, key_id)
        if body.n_predict == 0:  # editors send this to warm the cache: nothing to generate
            now = time.perf_counter()
            return select_fields(self._payload(body, prep, truncated, "", [], "limit", (now, now, now)),
                                 body.response_fields)
        estimate = self.admit_tokens(key_id, prep)
        start = time.perf_counter()
        sub = self.submit(prep)
        if body.stream:
            return self._stream(body, prep, truncated, sub, request, key_id, estimate, start)
        limit, tokens, finish, first = IndentLimit(body.n_indent), [], None, None
        async with aclosing(self.events(sub, request)) as events:  # closing it early cancels the sequence
            async for ev in events:
                first = first or time.perf_counter()
                limit.push(ev.text)
                if ev.token_id is not None:
                    tokens.append(ev.token_id)
                finish = ev.finish_reason or finish
                if limit.hit or finish is not None:
                    break
        limit.flush()
        end = time.perf_counter()
        content = self.moderator.refusal if finish == "content_filter" else self.output_text(limit.text)
        self.account(key_id, estimate, self.usage(prep, len(tokens)), request)
        payload = self._payload(body, prep, truncated, content, tokens, self._stop_type(finish, tokens, limit.hit),
                                (start, first or end, end))
        return select_fields(payload, body.response_fields)

    async def _stream(self, body: InfillRequest, prep: Prepared, truncated: bool, sub: Any, request: Request,
                      key_id: str, estimate: int, start: float) -> AsyncIterator[str]:
        limit, tokens, finish, first = IndentLimit(body.n_indent), [], None, None

        def event(payload: dict[str, Any]) -> str:
            return f"data: {json.dumps(select_fields(payload, body.response_fields))}\n\n"

        try:
            async with aclosing(self.events(sub, request)) as events:
                async for ev in events:
                    first = first or time.perf_counter()
                    shown = limit.push(ev.text)
                    if ev.token_id is not None:
                        tokens.append(ev.token_id)
                    finish = ev.finish_reason or finish
                    if shown:
                        yield event({"index": 0, "content": self.output_text(shown), "stop": False, "id_slot": 0,
                                     "tokens": [ev.token_id] if ev.token_id is not None else [],
                                     "tokens_predicted": len(tokens), "tokens_evaluated": len(prep.prompts[0])})
                    if limit.hit or finish is not None:
                        break
            tail = limit.flush()
            end = time.perf_counter()
            self.account(key_id, estimate, self.usage(prep, len(tokens)), request)
            final = self._payload(body, prep, truncated, self.output_text(tail), tokens,
                                  self._stop_type(finish, tokens, limit.hit), (start, first or end, end))
            yield event(final)
        except APIError as err:
            if err.status != 499:
                yield err.sse()


def _stop_list(stop: Any) -> list[str]:
    return [] if stop is None else [stop] if isinstance(stop, str) else list(stop)


__all__ = ["InfillServing", "IndentLimit", "select_fields"]
