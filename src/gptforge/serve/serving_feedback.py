"""POST /v1/feedback, and keeping what the server generated so that feedback can refer to it by id.

After each chat or text completion (streamed or not) the server stores the response's prompt(s) and
choices under the response id for `--feedback-retention` seconds. Feedback then names the response `id`
and the choice: a rating (thumbs up 1 / down -1), a choice between two answers (`chosen_index`, with
`rejected_index` or the other of two), and/or a better answer (`edited`). Clients that keep their own
transcripts send the content instead (`messages` or `prompt`, and `completions`).

Every database call runs on one dedicated thread, never on the event loop: a write that waits for
another process's lock does not stall streams, and in-process order is kept (a response is stored before
feedback that arrives after it is looked up). With masking on (`--redact-pii`), prompts and answers are
masked before they are stored. A feedback row keeps the key id, never the key.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, AsyncIterator, Optional, TypeVar

from ..feedback.store import Feedback, FeedbackDBError, FeedbackStore, Generation
from .errors import APIError, invalid_param
from .pii import mask_pii
from .protocol import FeedbackRequest

log = logging.getLogger("gptforge.serve")
T = TypeVar("T")


class FeedbackServing:
    """The feedback route and the generation log, over one `FeedbackStore`."""

    def __init__(self, store: FeedbackStore, model_name: str, *, mask: bool = False) -> None:
        self.store, self.model_name, self.mask = store, model_name, mask
        self.tokenizer: Any = None  # set when the model has loaded (decodes token-id prompts)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gptforge-feedback")

    async def _db(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def close(self) -> None:
        """Finish queued writes, then release the database."""
        self._pool.shutdown(wait=True)
        self.store.close()

    def _clean(self, value: Any) -> Any:
        """Strings (nested in messages and lists too) masked when masking is on."""
        if not self.mask:
            return value
        if isinstance(value, str):
            return mask_pii(value)
        if isinstance(value, list):
            return [self._clean(v) for v in value]
        if isinstance(value, dict):
            return {k: self._clean(v) for k, v in value.items()}
        return value

    # ---- remembering generations --------------------------------------------------------------
    def remember(self, endpoint: str, body: Any, result: Any, request_id: Optional[str], key_id: str) -> Any:
        """Store a response for later feedback (in the background); returns `result` (a stream is wrapped)."""
        if isinstance(result, dict):
            choices = [{"index": c["index"], "text": _choice_text(endpoint, c)} for c in result.get("choices", [])]
            self._pool.submit(self._store_generation, endpoint, body, result.get("id"), choices, request_id, key_id)
            return result
        return self._remember_stream(endpoint, body, result, request_id, key_id)

    async def _remember_stream(self, endpoint: str, body: Any, stream: AsyncIterator[str],
                               request_id: Optional[str], key_id: str) -> AsyncIterator[str]:
        texts: dict[int, str] = {}
        response_id: Optional[str] = None
        try:
            async for event in stream:
                yield event
                if not event.startswith("data: {"):
                    continue
                try:
                    chunk = json.loads(event[6:])
                except ValueError:
                    continue
                response_id = response_id or chunk.get("id")
                for choice in chunk.get("choices") or []:
                    piece = _delta_text(endpoint, choice)
                    texts[choice["index"]] = texts.get(choice["index"], "") + piece
        finally:  # also when the client stops the stream: what it saw can still be rated
            if response_id and texts:
                choices = [{"index": i, "text": t} for i, t in sorted(texts.items())]
                self._pool.submit(self._store_generation, endpoint, body, response_id, choices, request_id, key_id)

    def _store_generation(self, endpoint: str, body: Any, response_id: Optional[str], choices: list[dict],
                          request_id: Optional[str], key_id: str) -> None:
        """(feedback thread) Resolve each choice's prompt, mask, and store; failures are logged, never raised."""
        if not response_id:
            return
        try:
            prompts = self._prompts(endpoint, body)
            n = max(int(getattr(body, "n", 1) or 1), 1)
            for c in choices:
                c["prompt_index"] = min(c["index"] // n, len(prompts) - 1) if endpoint == "completions" else 0
            self.store.remember(Generation(id=response_id, model=self.model_name, endpoint=endpoint,
                                           prompts=self._clean(prompts), choices=self._clean(choices),
                                           key_id=key_id, request_id=request_id))
        except Exception as exc:  # noqa: BLE001 - feedback storage must never break serving
            log.warning("could not keep response %s for feedback: %s", response_id, exc)

    def _prompts(self, endpoint: str, body: Any) -> list[Any]:
        if endpoint == "chat":
            return [[{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                     for m in body.messages]]
        prompt = body.prompt
        if isinstance(prompt, str):
            return [prompt]
        if prompt and isinstance(prompt[0], int):
            prompt = [prompt]
        return [p if isinstance(p, str) else self._decode(p) for p in prompt]

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids) if self.tokenizer is not None else ""

    # ---- POST /v1/feedback --------------------------------------------------------------------
    async def create(self, body: FeedbackRequest, key_id: str, request_id: Optional[str]) -> dict[str, Any]:
        """Check the feedback, resolve what it is about, store it; the stored record's id."""
        kinds = [k for k, given in (("rating", body.rating is not None), ("comparison", body.chosen_index is not None),
                                    ("edit", body.edited is not None)) if given]
        if not kinds:
            raise invalid_param("rating", "feedback needs a rating (1 or -1), a chosen_index or an edited answer")
        if body.rejected_index is not None and body.chosen_index is None:
            raise invalid_param("chosen_index", "rejected_index needs chosen_index")
        content = [name for name in ("messages", "prompt", "completions") if getattr(body, name) is not None]
        if body.id is not None:
            if content:
                raise invalid_param(content[0], "give either the response id or the content (messages or prompt, "
                                    "and completions), not both")
            generation = await self._db(self._generation, body.id)
            if generation is None or generation.key_id != key_id:
                raise APIError(404, f"no response {body.id[:128]!r} is kept for feedback: the server keeps responses "
                               f"for {self.store.retention_s:.0f} s; after that, send the content (messages or "
                               "prompt, and completions) instead of the id", param="id", code="response_not_found")
            item = self._about_generation(body, generation)
        else:
            item = await self._db(self._about_content, body)
        item.key_id, item.request_id = key_id, (item.request_id or request_id)
        await self._db(self._record, body, item)
        return {"id": item.id, "object": "feedback", "created": int(item.created_at), "response_id": item.response_id,
                "model": item.model, "kinds": kinds}

    def _generation(self, response_id: str) -> Optional[Generation]:
        try:
            return self.store.generation(response_id)
        except FeedbackDBError as exc:
            log.error("feedback database: %s", exc)
            raise APIError(503, "the feedback database is unavailable; try again later", code="feedback_unavailable",
                           headers={"Retry-After": "5"}) from None

    def _record(self, body: FeedbackRequest, item: Feedback) -> None:
        """(feedback thread) Add the judgement (masked when masking is on) and store the row."""
        item.rating, item.edited, item.comment = body.rating, self._clean(body.edited), self._clean(body.comment)
        item.created_at = time.time()
        try:
            self.store.record(item)
        except FeedbackDBError as exc:
            log.error("feedback database: %s", exc)
            raise APIError(503, "the feedback database is unavailable; try again later", code="feedback_unavailable",
                           headers={"Retry-After": "5"}) from None

    def _about_generation(self, body: FeedbackRequest, generation: Generation) -> Feedback:
        by_index = {c["index"]: c for c in generation.choices}
        for name in ("choice_index", "chosen_index", "rejected_index"):
            value = getattr(body, name)
            if value is not None and value not in by_index:
                raise invalid_param(name, f"response {generation.id} has choices {sorted(by_index)}, not {value}")
        prompt_index = by_index[body.chosen_index if body.chosen_index is not None else body.choice_index].get(
            "prompt_index", 0)
        # The answers to the same prompt, in choice order: indexes below refer to them.
        same = [c for c in sorted(by_index.values(), key=lambda c: c["index"]) if c.get("prompt_index", 0) == prompt_index]
        position = {c["index"]: i for i, c in enumerate(same)}
        for name in ("choice_index", "chosen_index", "rejected_index"):
            value = getattr(body, name)
            if value is not None and name != "choice_index" and value not in position:
                raise invalid_param(name, f"choice {value} answers another prompt of response {generation.id}")
        item = Feedback(model=generation.model, endpoint=generation.endpoint, prompt=generation.prompts[prompt_index],
                        completions=[c["text"] for c in same], response_id=generation.id,
                        request_id=generation.request_id)
        item.choice_index = position.get(body.choice_index, 0)
        _resolve_pair(body, item, [position[c["index"]] for c in same], lambda i: position[i])
        return item

    def _about_content(self, body: FeedbackRequest) -> Feedback:
        """(feedback thread) Feedback about content the client sent; masked when masking is on."""
        if body.model is not None and body.model != self.model_name:
            raise APIError(404, f"The model '{body.model[:200]}' does not exist; this server serves "
                           f"'{self.model_name}'", param="model", code="model_not_found")
        if (body.messages is None) == (body.prompt is None):
            raise invalid_param("messages", "without an id, give the conversation (messages) or the prompt, "
                                "not both and not neither")
        if body.completions is None:
            raise invalid_param("completions", "without an id, give the answer(s) the feedback is about")
        prompt: Any = body.prompt
        if body.messages is not None:
            prompt = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                      for m in body.messages]
        count = len(body.completions)
        for name in ("choice_index", "chosen_index", "rejected_index"):
            value = getattr(body, name)
            if value is not None and value >= count:
                raise invalid_param(name, f"{name} {value} is out of range: {count} completion(s) given")
        item = Feedback(model=self.model_name, endpoint="client", prompt=self._clean(prompt),
                        completions=self._clean(list(body.completions)), choice_index=body.choice_index)
        _resolve_pair(body, item, list(range(count)), lambda i: i)
        return item


def _resolve_pair(body: FeedbackRequest, item: Feedback, positions: list[int], position: Any) -> None:
    """Set chosen/rejected texts from the indexes (the rejected one defaults to the other of two)."""
    if body.chosen_index is None:
        return
    chosen = position(body.chosen_index)
    if body.rejected_index is not None:
        rejected = position(body.rejected_index)
    elif len(positions) == 2:
        rejected = 1 - chosen
    else:
        raise invalid_param("rejected_index", f"there are {len(positions)} answers: say which one was worse")
    if rejected == chosen:
        raise invalid_param("rejected_index", "the rejected answer must differ from the chosen one")
    item.chosen, item.rejected = item.completions[chosen], item.completions[rejected]


def _choice_text(endpoint: str, choice: dict[str, Any]) -> str:
    if endpoint == "chat":
        return (choice.get("message") or {}).get("content") or ""
    return choice.get("text") or ""


def _delta_text(endpoint: str, choice: dict[str, Any]) -> str:
    if endpoint == "chat":
        return (choice.get("delta") or {}).get("content") or ""
    return choice.get("text") or ""


__all__ = ["FeedbackServing"]
