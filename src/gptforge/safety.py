"""Moderation: configurable block lists and regex patterns on prompts (input) and generations (output).

A `Moderator` is lexical: it matches words, phrases and regular expressions after Unicode NFKC
normalisation and case folding. It is a policy gate you configure, not a classifier that understands
meaning; see docs/safety.md for what it does not catch. `generate`, `chat` and `serve` take
`--moderation FILE` (a YAML file read by `ModerationConfig.from_file`).
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Literal, Optional

from .config import ConfigError, dataclass_from_dict, load_yaml
from .errors import GptforgeError

Direction = Literal["input", "output"]

DEFAULT_REFUSAL = "I can't help with that request."
CONTENT_FILTER = "content_filter"  # OpenAI's finish_reason for an output cut by moderation


@dataclass
class RuleSet:
    """What to block in one direction: whole words/phrases and regular expressions."""

    blocked_terms: list[str] = field(default_factory=list)  # matched as whole words, case-insensitive by default
    blocked_patterns: list[str] = field(default_factory=list)  # Python regular expressions (re.search)


@dataclass
class ModerationConfig:
    """Moderation policy. Top-level terms/patterns apply to both directions; `input`/`output` add to them."""

    blocked_terms: list[str] = field(default_factory=list)  # both directions
    blocked_patterns: list[str] = field(default_factory=list)  # both directions
    input: RuleSet = field(default_factory=RuleSet)  # prompts and chat messages only
    output: RuleSet = field(default_factory=RuleSet)  # generated text only
    refusal: str = DEFAULT_REFUSAL  # the reply shown instead of a blocked prompt or generation
    case_sensitive: bool = False  # when false, text and terms are compared after Unicode case folding
    check_input: bool = True  # set false to moderate outputs only
    check_output: bool = True  # set false to moderate inputs only

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "moderation config") -> "ModerationConfig":
        """Build from a mapping (as in the YAML file); unknown keys are an error naming them."""
        data = dict(data)
        for direction in ("input", "output"):
            section = data.get(direction)
            if section is None:
                data.pop(direction, None)
            elif isinstance(section, dict):
                data[direction] = dataclass_from_dict(RuleSet, section, source, f"{direction}.")
            elif not isinstance(section, RuleSet):
                raise ConfigError(f"{source}: {direction} must be a mapping with blocked_terms/blocked_patterns, "
                                  f"got {section!r}")
        config = dataclass_from_dict(cls, data, source)
        config.validate(source)
        return config

    @classmethod
    def from_file(cls, path: str | Path) -> "ModerationConfig":
        """Read a YAML (or JSON) moderation policy; errors name the file and the field."""
        return cls.from_dict(load_yaml(path, kind="moderation policy file"), source=str(path))

    def validate(self, source: str = "moderation config") -> None:
        """Raise ConfigError naming the field for wrong types and regexes that do not compile."""
        lists = {"blocked_terms": self.blocked_terms, "blocked_patterns": self.blocked_patterns,
                 "input.blocked_terms": self.input.blocked_terms, "input.blocked_patterns": self.input.blocked_patterns,
                 "output.blocked_terms": self.output.blocked_terms,
                 "output.blocked_patterns": self.output.blocked_patterns}
        for name, values in lists.items():
            if not isinstance(values, list) or not all(isinstance(v, str) and v.strip() for v in values):
                raise ConfigError(f"{source}: '{name}' must be a list of non-empty strings, got {values!r}")
            if name.endswith("patterns"):
                for pattern in values:
                    try:
                        re.compile(pattern)
                    except re.error as exc:
                        raise ConfigError(f"{source}: '{name}' entry {pattern!r} is not a valid regex: {exc}") from exc
        if not isinstance(self.refusal, str) or not self.refusal.strip():
            raise ConfigError(f"{source}: 'refusal' must be a non-empty string")
        for name in ("case_sensitive", "check_input", "check_output"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{source}: '{name}' must be true or false, got {getattr(self, name)!r}")


@dataclass(frozen=True)
class ModerationVerdict:
    """The result of one check: `allowed`, and when blocked, why (`reason`) and which rule (`rule`)."""

    allowed: bool
    direction: Direction
    reason: Optional[str] = None  # human-readable, e.g. "input matched blocked term 'foo'"
    rule: Optional[str] = None  # the term or pattern that matched

    def __bool__(self) -> bool:
        return self.allowed


class ModerationError(GptforgeError, ValueError):
    """Raised by `Moderator.enforce_*` when text is blocked; str() is the refusal message."""

    def __init__(self, verdict: ModerationVerdict, refusal: str) -> None:
        super().__init__(refusal)
        self.verdict = verdict
        self.refusal = refusal


def _normalize(text: str, case_sensitive: bool) -> str:
    # NFKC folds full-width letters, ligatures and similar look-alikes onto plain ones.
    text = unicodedata.normalize("NFKC", text)
    return text if case_sensitive else text.casefold()


def _term_regex(term: str, case_sensitive: bool) -> re.Pattern[str]:
    """Whole-word match of a term; internal whitespace matches any run of whitespace."""
    words = _normalize(term.strip(), case_sensitive).split()
    body = r"\s+".join(re.escape(w) for w in words)
    # \b only where the term starts/ends with a word character ("c++" has no word boundary at its end).
    start = r"\b" if re.match(r"\w", words[0]) else ""
    end = r"\b" if re.search(r"\w$", words[-1]) else ""
    return re.compile(start + body + end)


class _Rules:
    def __init__(self, terms: list[str], patterns: list[str], case_sensitive: bool) -> None:
        flags = 0 if case_sensitive else re.IGNORECASE
        self.terms = [(t, _term_regex(t, case_sensitive)) for t in terms]
        self.patterns = [(p, re.compile(p, flags)) for p in patterns]

    def match(self, normalized: str, raw: str) -> Optional[tuple[str, str]]:
        for term, regex in self.terms:
            if regex.search(normalized):
                return "term", term
        for pattern, regex in self.patterns:
            # Patterns see the normalised text and, so that case-sensitive patterns still work, the raw text.
            if regex.search(normalized) or regex.search(raw):
                return "pattern", pattern
        return None


_COUNTERS: dict[int, Any] = {}


def _blocked_counter(registry: Any = None) -> Any:
    """The `gptforge_moderation_blocked_total` counter in `registry` (default: prometheus' global one)."""
    try:
        from prometheus_client import REGISTRY, Counter
    except ImportError:  # pragma: no cover - prometheus-client is a dependency, but stay usable without it
        return None
    registry = registry if registry is not None else REGISTRY
    key = id(registry)
    if key not in _COUNTERS:
        _COUNTERS[key] = Counter("gptforge_moderation_blocked", "Texts blocked by the moderation policy",
                                 ["direction", "kind"], registry=registry)
    return _COUNTERS[key]


class Moderator:
    """Check prompts and generations against a `ModerationConfig`; blocked checks count in Prometheus."""

    def __init__(self, config: Optional[ModerationConfig] = None, *, registry: Any = None) -> None:
        self.config = config or ModerationConfig()
        self.config.validate()
        c = self.config
        self._rules: dict[str, _Rules] = {
            "input": _Rules(c.blocked_terms + c.input.blocked_terms, c.blocked_patterns + c.input.blocked_patterns,
                            c.case_sensitive),
            "output": _Rules(c.blocked_terms + c.output.blocked_terms, c.blocked_patterns + c.output.blocked_patterns,
                             c.case_sensitive),
        }
        self._counter = _blocked_counter(registry)
        self.blocked_counts: dict[str, int] = {"input": 0, "output": 0}

    @classmethod
    def from_file(cls, path: str | Path, *, registry: Any = None) -> "Moderator":
        """A moderator for the YAML policy at `path`."""
        return cls(ModerationConfig.from_file(path), registry=registry)

    @property
    def refusal(self) -> str:
        return self.config.refusal

    def check_input(self, text: str) -> ModerationVerdict:
        """Verdict for a prompt or user message."""
        return self._check("input", text) if self.config.check_input else ModerationVerdict(True, "input")

    def check_output(self, text: str) -> ModerationVerdict:
        """Verdict for generated text (pass the whole text generated so far when streaming)."""
        return self._check("output", text) if self.config.check_output else ModerationVerdict(True, "output")

    def check_messages(self, messages: list[dict[str, Any]]) -> ModerationVerdict:
        """Verdict for chat messages: every message's string content is checked as input."""
        for message in messages:
            content = message.get("content")
            parts = [content] if isinstance(content, str) else [
                p.get("text", "") for p in content or [] if isinstance(p, dict)]
            for part in parts:
                verdict = self.check_input(part or "")
                if not verdict.allowed:
                    return verdict
        return ModerationVerdict(True, "input")

    def enforce_input(self, text: str) -> None:
        """Raise ModerationError (a ValueError whose message is the refusal) when the input is blocked."""
        verdict = self.check_input(text)
        if not verdict.allowed:
            raise ModerationError(verdict, self.refusal)

    def enforce_output(self, text: str) -> None:
        """Raise ModerationError when the output is blocked."""
        verdict = self.check_output(text)
        if not verdict.allowed:
            raise ModerationError(verdict, self.refusal)

    def stream_guard(self) -> "OutputStreamGuard":
        """A guard for one streamed output: `push(delta)` returns the text that may be shown."""
        return OutputStreamGuard(self)

    def _check(self, direction: Direction, text: str) -> ModerationVerdict:
        if not isinstance(text, str):
            raise TypeError(f"moderation expects text (str), got {type(text).__name__}")
        found = self._rules[direction].match(_normalize(text, self.config.case_sensitive), text)
        if found is None:
            return ModerationVerdict(True, direction)
        kind, rule = found
        self.blocked_counts[direction] += 1
        if self._counter is not None:
            self._counter.labels(direction=direction, kind=kind).inc()
        return ModerationVerdict(False, direction, f"{direction} matched blocked {kind} {rule!r}", rule)


class OutputStreamGuard:
    """Moderates one streamed output: each delta is checked together with all text before it.

    A delta is released only if the text so far, including it, is allowed; after the first blocked
    prefix nothing more is released and `verdict` says why. Text released earlier stays released
    (see the limits in docs/safety.md).
    """

    def __init__(self, moderator: Moderator) -> None:
        self.moderator = moderator
        self.text = ""
        self.verdict: Optional[ModerationVerdict] = None

    @property
    def blocked(self) -> bool:
        return self.verdict is not None

    def push(self, delta: str) -> str:
        """The part of `delta` that may be shown: all of it, or "" once the output is blocked."""
        if self.verdict is not None or not delta:
            return ""
        verdict = self.moderator.check_output(self.text + delta)
        if not verdict.allowed:
            self.verdict = verdict
            return ""
        self.text += delta
        return delta


def moderated_stream(moderator: Optional[Moderator], deltas: Iterable[str]) -> Iterator[tuple[str, bool]]:
    """The deltas of one streamed output that the policy allows, as (text, False) pairs.

    When the text so far becomes blocked, one last (refusal, True) pair follows and the underlying stream
    is closed, so generation stops. Without a moderator every delta passes. The CLI's `generate --stream`
    and `chat` use this; the server applies the same `OutputStreamGuard` per sequence.
    """
    if moderator is None:
        for delta in deltas:
            yield delta, False
        return
    guard = moderator.stream_guard()
    try:
        for delta in deltas:
            shown = guard.push(delta)
            if guard.blocked:
                yield moderator.refusal, True
                return
            if shown:
                yield shown, False
    finally:
        close = getattr(deltas, "close", None)
        if close is not None:
            close()


def load_moderator(path: Optional[str | Path], *, registry: Any = None) -> Optional[Moderator]:
    """The Moderator for a `--moderation FILE` option, or None when no file is given."""
    return Moderator.from_file(path, registry=registry) if path else None


__all__ = ["RuleSet", "ModerationConfig", "ModerationVerdict", "ModerationError", "Moderator", "OutputStreamGuard", "moderated_stream",
           "load_moderator", "CONTENT_FILTER", "DEFAULT_REFUSAL"]
