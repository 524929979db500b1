"""PII masking: emails, phone numbers, card numbers (Luhn-checked), IP addresses, IBANs, US SSNs.

Used on every log line when `--redact-pii` is on, and, with `--redact-pii=content`, on prompts before
they reach the model and on generated text. Each match becomes a typed placeholder such as `[EMAIL]`.
"""

from __future__ import annotations

import ipaddress
import logging
import re
from typing import Callable

# Every pattern runs in linear time on adversarial input (tests/serve/test_hostile.py checks the scaling):
# a match may only start where a run of its characters starts (a lookbehind), and runs are consumed
# possessively, so the engine never rescans a run from each of its positions.
_EMAIL = re.compile(r"(?<![A-Za-z0-9._%+-])[A-Za-z0-9._%+-]++@(?:[A-Za-z0-9-]++\.)+[A-Za-z]{2,}+\b")
# 13-19 digits, optionally grouped by single spaces or dashes.
_CARD = re.compile(r"(?<![\d-])(?<!\d )\d(?:[ -]?\d){12,18}(?![\d-])")
_IBAN = re.compile(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,4})?\b")
_SSN = re.compile(r"\b\d{3}-\d{2}-\d{4}\b")
_IPV4 = re.compile(r"(?<!\d)(?<!\d\.)(?:\d{1,3}\.){3}\d{1,3}(?!\d|\.\d)")
_IPV6 = re.compile(r"(?<![:\w])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?![:\w])")
# Phone numbers: optional +country code, then 7+ digits with the usual separators.
_PHONE = re.compile(r"(?<![\w+])(?<!\d[ .-])(?:\+\d{1,3}[ .-]?)?(?:\(\d{1,4}\)[ .-]?)?\d{2,4}(?:[ .-]?\d{2,4}){2,4}(?!\w)")


def luhn_valid(digits: str) -> bool:
    """The Luhn checksum used by payment card numbers."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2 == 1:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


def _card(match: re.Match[str]) -> str:
    digits = re.sub(r"\D", "", match.group(0))
    return "[CARD]" if 13 <= len(digits) <= 19 and luhn_valid(digits) else match.group(0)


def _ipv4(match: re.Match[str]) -> str:
    try:
        ipaddress.IPv4Address(match.group(0))
    except ValueError:
        return match.group(0)
    return "[IP]"


def _ipv6(match: re.Match[str]) -> str:
    text = match.group(0)
    if text.count(":") < 2 or not re.search(r"[0-9A-Fa-f]", text):
        return text
    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        return text
    return "[IP]"


def _phone(match: re.Match[str]) -> str:
    text = match.group(0)
    digits = re.sub(r"\D", "", text)
    return "[PHONE]" if 7 <= len(digits) <= 15 else text


# Order matters: the most specific patterns run first so a card is not half-eaten as a phone number.
_RULES: list[tuple[re.Pattern[str], Callable[[re.Match[str]], str] | str]] = [
    (_EMAIL, "[EMAIL]"),
    (_IBAN, "[IBAN]"),
    (_CARD, _card),
    (_SSN, "[SSN]"),
    (_IPV4, _ipv4),
    (_IPV6, _ipv6),
    (_PHONE, _phone),
]


def mask_pii(text: str) -> str:
    """`text` with personal data replaced by typed placeholders."""
    for pattern, repl in _RULES:
        text = pattern.sub(repl, text)
    return text


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


class PIIMaskingFilter(logging.Filter):
    """A logging filter that masks PII in the formatted message (and drops args once applied)."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a bad format string must not kill logging
            return True
        record.msg = mask_pii(message)
        record.args = ()
        return True
