"""POST /v1/completions: text and token-id prompts, n choices, echo, log-probs, streaming, structured outputs
(the `structured_outputs` extension)."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, AsyncIterator, Optional

from fastapi import Request

from ..fim import FimError, fim_stop_ids, fim_tokens, infill_prompt, require_fim_tokens
from ..healing import heal_prompt
from .engine import SequenceRequest
from .errors import APIError, invalid_param
from .pii import StreamRedactor, mask_pii
from .protocol import CompletionChoice, CompletionLogprobs, CompletionRequest, CompletionResponse, to_jsonable
from .serving_base import Prepared, SequenceResult, ServingBase, Submission

LogprobEntry = tuple[int, Optional[float], Any]  # (token id, log-prob, top alternatives)


class CompletionServing(ServingBase):
    """The completions endpoint."""

    async def prepare(self, body: CompletionRequest, key_id: str) -> Prepared:
        """Validate (cheap checks first), count the request, tokenize off the loop, build the sequences."""
        adapter = self.check_model(body.model)
        suffix = self._infill_suffix(body)
        if body.best_of is not None and body.best_of != body.n:
            raise invalid_param("best_of", "best_of must equal n (candidates are not re-ranked)")
        raw = self._prompt_list(body.prompt)
        if len(raw) * body.n > self.engine.max_queue:  # could never be queued: not a "retry later"
            raise invalid_param("n", f"this request needs {len(raw) * body.n} sequences (prompts x n); the server "
                                f"queues at most {self.engine.max_queue}")
        for i, p in enumerate(raw):
            if isinstance(p, str):
                self.check_text_size(p, "prompt")
            elif not p:
                raise invalid_param(f"prompt[{i}]", "a token-id prompt must not be empty")
            else:
                self.check_length(len(p), body.max_tokens or 0, "prompt")
                self.check_token_ids(p, "prompt")
        self.rate_limiter.admit_request(key_id)
        spec = await self.run_cpu(self.output_spec, None, body.structured_outputs)
        prompts, texts = await self.run_cpu(self._tokenize_all, raw, suffix)
        max_tokens = self.completion_budget(body.max_tokens, [len(p) for p in prompts], "prompt")
        if max_tokens == 0 and not body.echo:
            raise invalid_param("max_tokens", "max_tokens must be at least 1 (0 is allowed only with echo)")
        params = self.sampling_params(body, max_tokens, body.logprobs or 0, body.logprobs is not None)
        constraints = await self.constraints(spec, len(prompts) * body.n)
        healed = [heal_prompt(self.tokenizer, p) if body.token_healing and spec is None and not body.echo
                  and t is not None and suffix is None else None for p, t in zip(prompts, texts)]
        prompts = [h.prompt_ids if h is not None else p for p, h in zip(prompts, healed)]  # what the model reads
        seqs = []
        for i, p in enumerate(prompts):
            for j in range(body.n):
                seq_params = params if body.seed is None else params.replace(seed=body.seed + j)
                seq = self._sequence(i * body.n + j, p, seq_params, max_tokens,
                                     body.echo and body.logprobs is not None, constraints[i * body.n + j])
                seq.adapter = adapter
                if suffix is not None:  # a FIM marker would start another part: the middle is done
                    seq.stop_token_ids = tuple(sorted({*self.stop_ids, *fim_stop_ids(self.tokenizer)}))
                if healed[i] is not None:
                    seq.prompt_ids, seq.hidden_prefix = healed[i].prompt_ids, healed[i].hidden_text
                    seq.constraint, seq.healing = healed[i].constraint(), True
                seqs.append(seq)
        blocked = self.moderator is not None and any(
            not self.moderator.check_input(t if t is not None else self.tokenizer.decode(p))
            for t, p in zip(texts, prompts))
        return Prepared(prompts, texts, seqs, max_tokens, blocked, model=body.model)

    def _infill_suffix(self, body: CompletionRequest) -> Optional[str]:
        """The `suffix` to fill in before, or None for a plain completion (also for "" on a model without FIM)."""
        if body.suffix is None or (body.suffix == "" and fim_tokens(self.tokenizer) is None):
            return None
        try:
            require_fim_tokens(self.tokenizer, "suffix")
        except FimError as exc:
            raise invalid_param(exc.param, str(exc)) from exc
        if body.echo:
            raise invalid_param("echo", "echo cannot be combined with suffix (the prompt is not continued in place)")
        if not isinstance(body.prompt, str) and not all(isinstance(p, str) for p in body.prompt):
            raise invalid_param("prompt", "with suffix, prompts must be text (the text before the gap)")
        return body.suffix

    @staticmethod
    def _prompt_list(prompt: Any) -> list:
        if isinstance(prompt, str):
            return [prompt]
        if not prompt:
            raise invalid_param("prompt", "prompt must not be empty")
        return [prompt] if isinstance(prompt[0], int) else list(prompt)

    def _tokenize_all(self, raw: list, suffix: Optional[str] = None) -> tuple[list[list[int]], list[Optional[str]]]:
        prompts: list[list[int]] = []
        texts: list[Optional[str]] = []
        for p in raw:
            if suffix is not None:  # fill in the middle: the prompt is the text before the gap
                mask = mask_pii if self.redact_content else (lambda t: t)
                prompts.append(infill_prompt(self.tokenizer, mask(p), mask(suffix)).ids)
                texts.append(mask(p + suffix))
            elif isinstance(p, str):
                prompts.append(self.encode(p))
                texts.append(mask_pii(p) if self.redact_content else p)
            else:
                prompts.append(list(p))  # used as given: no BOS added
                texts.append(None)
        return prompts, texts

    def _sequence(self, index: int, prompt: list[int], params: Any, max_tokens: int,
                  prompt_logprobs: bool, constraint: Any = None) -> SequenceRequest:
        return SequenceRequest(index=index, prompt_ids=prompt, params=params, max_tokens=max_tokens,
                               prompt_logprobs=prompt_logprobs, stop_token_ids=self.stop_ids, constraint=constraint)

    # ---- responses ----------------------------------------------------------------------------
    async def create(self, body: CompletionRequest, request: Request, key_id: str) -> Any:
        """A response dict, or an async iterator of server-sent events when streaming."""
        prep = await self.prepare(body, key_id)
        estimate = self.admit_tokens(key_id, prep)
        request_id, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        sub = self.submit(prep)
        if body.stream:
            return self._stream(body, prep, sub, request, request_id, created, key_id, estimate)
        results = await self.collect(prep, sub, request)
        choices = [self._choice(body, prep, results[seq.index]) for seq in prep.sequences]
        usage = self.usage(prep, sum(len(r.token_ids) for r in results.values()),
                           {i: r.cached_tokens for i, r in results.items()})
        self.account(key_id, estimate, usage, request)
        return to_jsonable(CompletionResponse(id=request_id, choices=choices, created=created,
                                              model=prep.model, usage=usage))

    def _choice(self, body: CompletionRequest, prep: Prepared, res: SequenceResult) -> CompletionChoice:
        prompt_idx = res.index // body.n
        text = self.output_text(res.text)
        logprobs = None
        if body.logprobs is not None:
            entries: list[LogprobEntry] = []
            if body.echo and res.prompt_logprobs is not None:
                pl = res.prompt_logprobs
                entries += list(zip(pl.token_ids, pl.logprobs, pl.top_logprobs))
            entries += list(zip(res.token_ids, res.logprobs, res.top_logprobs))
            logprobs = self.logprobs(entries, 0)
        if body.echo:
            text = self._prompt_text(prep, prompt_idx) + text
        return CompletionChoice(finish_reason=res.finish_reason, index=res.index, logprobs=logprobs, text=text)

    def _prompt_text(self, prep: Prepared, i: int) -> str:
        text = prep.prompt_texts[i]
        return text if text is not None else self.tokenizer.decode(prep.prompts[i])

    def logprobs(self, entries: list[LogprobEntry], offset: int) -> CompletionLogprobs:
        """OpenAI's completions log-prob lists for (token, log-prob, top) entries, text offsets from `offset`."""
        out = CompletionLogprobs()
        for token_id, lp, top in entries:
            s = self.token_str(token_id)
            out.tokens.append(s)
            out.token_logprobs.append(lp)
            out.top_logprobs.append(self._top_dict(top))
            out.text_offset.append(offset)
            offset += len(s)
        return out

    def _top_dict(self, top: Any) -> Optional[dict[str, float]]:
        if top is None:
            return None
        out: dict[str, float] = {}
        for tid, lp in top:
            key = self.token_str(tid)
            out[key] = max(lp, out.get(key, float("-inf")))
        return out

    async def _stream(self, body: CompletionRequest, prep: Prepared, sub: Submission, request: Request,
                      request_id: str, created: int, key_id: str, estimate: int) -> AsyncIterator[str]:
        completion_tokens = 0
        cached: dict[int, int] = {}
        redactors = {s.index: StreamRedactor() for s in prep.sequences} if self.redact_content else {}
        offsets = {s.index: 0 for s in prep.sequences}

        def chunk(index: int, text: str, finish: Optional[str], logprobs: Optional[CompletionLogprobs]) -> str:
            payload = CompletionResponse(id=request_id, created=created, model=prep.model, choices=[
                CompletionChoice(index=index, text=text, finish_reason=finish, logprobs=logprobs)])
            return f"data: {json.dumps(to_jsonable(payload))}\n\n"

        try:
            if body.echo:
                for s in prep.sequences:
                    yield chunk(s.index, self._prompt_text(prep, s.index // body.n), None, None)
            async for ev in self.events(sub, request):
                text = ev.text
                if redactors:
                    text = redactors[ev.index].push(text)
                    if ev.finish_reason is not None:
                        text += redactors[ev.index].flush()
                logprobs = None
                if body.logprobs is not None and (ev.token_id is not None or ev.prompt_logprobs is not None):
                    entries: list[LogprobEntry] = []
                    if ev.prompt_logprobs is not None:
                        pl = ev.prompt_logprobs
                        entries += list(zip(pl.token_ids, pl.logprobs, pl.top_logprobs))
                    if ev.token_id is not None:
                        entries.append((ev.token_id, ev.logprob, ev.top_logprobs))
                    logprobs = self.logprobs(entries, offsets[ev.index])
                    offsets[ev.index] += sum(len(t) for t in logprobs.tokens)
                if ev.token_id is not None:
                    completion_tokens += 1
                if ev.finish_reason is not None:
                    cached[ev.index] = ev.cached_tokens or 0
                if text or ev.finish_reason is not None or logprobs is not None:
                    yield chunk(ev.index, text, ev.finish_reason, logprobs)
            usage = self.usage(prep, completion_tokens, cached)
            self.account(key_id, estimate, usage, request)
            if body.stream_options and body.stream_options.include_usage:
                payload = CompletionResponse(id=request_id, created=created, model=prep.model, choices=[],
                                             usage=usage)
                yield f"data: {json.dumps(to_jsonable(payload))}\n\n"
            yield "data: [DONE]\n\n"
        except APIError as err:
            if err.status != 499:
                yield err.sse()


__all__ = ["CompletionServing"]
