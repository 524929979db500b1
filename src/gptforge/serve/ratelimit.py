"""Per-key rate limits over a sliding 60-second window: requests per minute and tokens per minute."""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from typing import Callable, Optional

from .errors import APIError

WINDOW_S = 60.0


class RateLimiter:
    """`admit(key, tokens)` raises a 429 APIError (with Retry-After) when a key is over its limits."""

    def __init__(self, requests_per_minute: Optional[int] = None, tokens_per_minute: Optional[int] = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.rpm = requests_per_minute
        self.tpm = tokens_per_minute
        self.clock = clock
        self._requests: dict[str, deque[float]] = {}
        self._tokens: dict[str, deque[tuple[float, int]]] = {}
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return bool(self.rpm or self.tpm)

    def _trim(self, key: str, now: float) -> None:
        reqs = self._requests.setdefault(key, deque())
        while reqs and reqs[0] <= now - WINDOW_S:
            reqs.popleft()
        toks = self._tokens.setdefault(key, deque())
        while toks and toks[0][0] <= now - WINDOW_S:
            toks.popleft()

    def admit(self, key: str, tokens: int) -> None:
        """Count one request with `tokens` (prompt + requested completion) against `key`, or raise 429.

        Both limits are checked before either is counted, so a refused request costs nothing."""
        with self._lock:
            now = self._now(key)
            self._check_requests(key, now)
            self._check_tokens(key, tokens, now)
            self._record(key, now, 1, tokens)

    def admit_request(self, key: str) -> None:
        """Count one request against `key`'s requests per minute (checked before any tokenization)."""
        with self._lock:
            now = self._now(key)
            self._check_requests(key, now)
            self._record(key, now, 1, 0)

    def admit_tokens(self, key: str, tokens: int) -> None:
        """Count `tokens` against `key`'s tokens per minute, or raise 429 with Retry-After."""
        with self._lock:
            now = self._now(key)
            self._check_tokens(key, tokens, now)
            self._record(key, now, 0, tokens)

    def _now(self, key: str) -> float:
        now = self.clock()
        self._trim(key, now)
        return now

    def _record(self, key: str, now: float, requests: int, tokens: int) -> None:
        if self.rpm and requests:
            self._requests[key].append(now)
        if self.tpm and tokens:
            self._tokens[key].append((now, tokens))

    def _check_requests(self, key: str, now: float) -> None:
        reqs = self._requests[key]
        if self.rpm and len(reqs) >= self.rpm:
            raise self._error("requests", self.rpm, reqs[0] + WINDOW_S - now)

    def _check_tokens(self, key: str, tokens: int, now: float) -> None:
        if not self.tpm:
            return
        toks = self._tokens[key]
        used = sum(n for _, n in toks)
        if used + tokens <= self.tpm:
            return
        if tokens > self.tpm:  # alone over the limit: waiting never helps, so a 400 without Retry-After
            raise APIError(400, f"request needs {tokens} tokens, more than the limit of {self.tpm} "
                           "tokens per minute", code="rate_limit_exceeded", param="max_tokens")
        # The oldest entries leave the window first: wait until enough of them have.
        excess, retry = used + tokens - self.tpm, WINDOW_S
        for at, n in toks:
            excess -= n
            if excess <= 0:
                retry = at + WINDOW_S - now
                break
        raise self._error("tokens", self.tpm, retry)

    def adjust(self, key: str, estimated: int, actual: int) -> None:
        """Replace an admitted request's token estimate with what it actually used."""
        if not self.tpm or actual == estimated:
            return
        with self._lock:
            self._tokens.setdefault(key, deque()).append((self.clock(), actual - estimated))

    @staticmethod
    def _error(what: str, limit: int, retry_s: float) -> APIError:
        retry = max(1, math.ceil(retry_s))
        return APIError(429, f"rate limit exceeded: {limit} {what} per minute; retry in {retry}s",
                        code="rate_limit_exceeded", headers={"Retry-After": str(retry)})
