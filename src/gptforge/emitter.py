"""The one per-sequence token emitter: sampled tokens in; text deltas, log-probs and a finish reason out.

`gptforge.generate` (Python API and CLI) and the server's engine both feed every sampled token of a
sequence through a `SequenceEmitter`, so detokenization, stop strings, end-of-sequence tokens, length
limits and log-probs follow one set of rules everywhere:

- An end-of-sequence token (one of `stop_token_ids`) ends the sequence with finish_reason "stop" and
  `stop_reason` = its id. It is never text and not part of `tokens`; it is counted in `sampled`. Its
  `Emission` carries it as `eos_token_id` with its log-prob: `generate` reports it as `stop_reason`,
  the server (as vLLM does) counts it in usage and lists it among the log-probs.
- A stop string ends the sequence with "stop" and `stop_reason` = the string; the text is cut before
  it and the string itself is never emitted, also not across token boundaries (text that may begin a
  stop string is held back until it is resolved).
- Reaching `max_tokens` (or the end of the context, `finish("length")`) ends it with "length"; the
  held-back text is released.
- Text deltas never split a multi-byte character.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Sequence, Union

from .sampling import IncrementalDetokenizer, StopStringMatcher

TopLogprobs = list[tuple[int, float]]  # (token id, log-prob), most likely first


@dataclass
class Emission:
    """What one pushed token (or a forced finish) produced."""

    text: str = ""  # new text safe to show (may be empty)
    token_id: Optional[int] = None  # the content token it carried (None for EOS and for finish())
    eos_token_id: Optional[int] = None  # the end-of-sequence token that ended it (not content)
    logprob: Optional[float] = None
    top_logprobs: Optional[TopLogprobs] = None
    finish_reason: Optional[str] = None  # "stop" | "length" | another reason given to finish()
    stop_reason: Optional[Union[str, int]] = None  # the stop string or EOS id that ended the sequence


@dataclass
class SequenceEmitter:
    """Decoding state of one output sequence (see the module docstring for the rules).

    `tokenizer` may be None (token ids only); `want_text=False` skips incremental detokenization
    (then `final_text()` decodes once at the end) when nobody reads deltas and there are no stop strings.
    """

    tokenizer: Any
    prompt_ids: Sequence[int]
    max_tokens: int
    stop_strings: Sequence[str] = ()
    stop_token_ids: Sequence[int] = ()
    min_tokens: int = 0
    skip_special_tokens: bool = True
    want_text: bool = True
    hidden_prefix: str = ""  # token healing: text the first tokens repeat from the prompt, never shown
    tokens: list[int] = field(default_factory=list)
    logprobs: list[Optional[float]] = field(default_factory=list)
    top_logprobs: list[Optional[TopLogprobs]] = field(default_factory=list)
    text: str = ""  # all text emitted so far
    sampled: int = 0  # tokens consumed, EOS included
    finish_reason: Optional[str] = None
    stop_reason: Optional[Union[str, int]] = None

    def __post_init__(self) -> None:
        self._stops = frozenset(int(t) for t in self.stop_token_ids)
        if self.stop_strings and self.tokenizer is None:
            raise ValueError("stop: stop strings need a tokenizer to turn tokens into text")
        text = self.tokenizer is not None and (self.want_text or bool(self.stop_strings) or bool(self.hidden_prefix))
        self._hide = len(self.hidden_prefix)
        self._detok = IncrementalDetokenizer(self.tokenizer, self.prompt_ids, self.skip_special_tokens) \
            if text else None
        self._matcher = StopStringMatcher(self.stop_strings) if text else None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def push(self, token_id: int, logprob: Optional[float] = None,
             top_logprobs: Optional[TopLogprobs] = None) -> Emission:
        """Consume one sampled token; returns the text it released and, when it ended the sequence, why."""
        if self.done:
            return Emission()
        self.sampled += 1
        if token_id in self._stops and len(self.tokens) >= self.min_tokens:
            end = self._end("stop", token_id)
            end.eos_token_id, end.logprob, end.top_logprobs = token_id, logprob, top_logprobs
            return end
        self.tokens.append(token_id)
        self.logprobs.append(logprob)
        self.top_logprobs.append(top_logprobs)
        shown = ""
        if self._detok is not None:
            shown, stopped = self._matcher.push(self._unhide(self._detok.push(token_id)))
            self.text += shown
            if stopped:
                self.finish_reason, self.stop_reason = "stop", self._matcher.stop_string
                return Emission(shown, token_id=token_id, logprob=logprob, top_logprobs=top_logprobs,
                                finish_reason="stop", stop_reason=self.stop_reason)
        if len(self.tokens) >= self.max_tokens:
            end = self._end("length")
            return Emission(shown + end.text, token_id=token_id, logprob=logprob, top_logprobs=top_logprobs,
                            finish_reason="length")
        return Emission(shown, token_id=token_id, logprob=logprob, top_logprobs=top_logprobs)

    def finish(self, reason: str, stop_reason: Optional[Union[str, int]] = None) -> Emission:
        """End the sequence for a reason decided outside (context full, grammar complete, cancelled...)."""
        if self.done:
            return Emission()
        return self._end(reason, stop_reason)

    def _end(self, reason: str, stop_reason: Optional[Union[str, int]] = None) -> Emission:
        text = ""
        if self._detok is not None:
            # Release the held-back text; it may itself complete a stop string.
            text, stopped = self._matcher.push(self._unhide(self._detok.flush()))
            if stopped:
                reason, stop_reason = "stop", self._matcher.stop_string
            else:
                text += self._matcher.flush()
            self.text += text
        self.finish_reason, self.stop_reason = reason, stop_reason
        return Emission(text, finish_reason=reason, stop_reason=stop_reason)

    def _unhide(self, delta: str) -> str:
        """Drop the healed prompt text from the start of the output (it is the prompt's, already shown)."""
        if self._hide and delta:
            cut = min(self._hide, len(delta))
            delta, self._hide = delta[cut:], self._hide - cut
        return delta

    def final_text(self) -> str:
        """The whole text: the emitted deltas, or one decode of the tokens when deltas were skipped."""
        if self._detok is not None or self.tokenizer is None:
            return self.text
        return self.tokenizer.decode(self.tokens, skip_special_tokens=self.skip_special_tokens)


__all__ = ["SequenceEmitter", "Emission", "TopLogprobs"]
