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
        """Count one request with `tokens` (prompt + requested completion) against `key`, or raise 429."""
        if not self.enabled:
            return
        with self._lock:
            now = self.clock()
            self._trim(key, now)
            reqs, toks = self._requests[key], self._tokens[key]
            if self.rpm and len(reqs) >= self.rpm:
                retry = reqs[0] + WINDOW_S - now
                raise self._error("requests", self.rpm, retry)
            used = sum(n for _, n in toks)
            if self.tpm and used + tokens > self.tpm:
                if tokens > self.tpm:
                    raise APIError(429, f"request needs {tokens} tokens, more than the limit of {self.tpm} "
                                   "tokens per minute", code="rate_limit_exceeded", param="max_tokens")
                retry = toks[0][0] + WINDOW_S - now if toks else WINDOW_S
                raise self._error("tokens", self.tpm, retry)
            reqs.append(now)
            toks.append((now, tokens))

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
