"""API keys: gathered from flags, `GPTFORGE_API_KEYS` and a file; kept only as SHA-256 digests.

A presented key is hashed and compared with every stored digest by `hmac.compare_digest`, without
early exit, so neither the key's content nor which key matched leaks through timing. Keys never
reach a log: callers get a short, non-reversible key id (a digest prefix) to log and rate-limit by.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from pathlib import Path
from typing import Iterable, Optional

ENV_VAR = "GPTFORGE_API_KEYS"


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


def read_keys_file(path: str | Path) -> list[str]:
    """One key per line; blank lines and `#` comments are skipped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--api-keys-file: no such file: {path}")
    keys = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keys.append(line)
    if not keys:
        raise ValueError(f"--api-keys-file {path}: no keys found (one key per line expected)")
    return keys


def collect_keys(flag_keys: Iterable[str] = (), keys_file: Optional[str | Path] = None,
                 environ: Optional[dict[str, str]] = None) -> list[str]:
    """All configured keys: flags + comma-separated env var + file."""
    environ = os.environ if environ is None else environ
    keys = [k.strip() for k in flag_keys if k and k.strip()]
    keys += [k.strip() for k in environ.get(ENV_VAR, "").split(",") if k.strip()]
    if keys_file:
        keys += read_keys_file(keys_file)
    return keys


class APIKeyChecker:
    """Holds key digests; `check(presented)` returns the key id or None."""

    def __init__(self, keys: Iterable[str]) -> None:
        self._digests = sorted({_digest(k) for k in keys})

    @property
    def enabled(self) -> bool:
        return bool(self._digests)

    def check(self, presented: Optional[str]) -> Optional[str]:
        """Key id (first 12 hex chars of the digest) when `presented` is a configured key, else None."""
        if not presented:
            return None
        digest = _digest(presented)
        matched = False
        for stored in self._digests:  # no early exit: time does not depend on which key matched
            matched |= hmac.compare_digest(stored, digest)
        return digest.hex()[:12] if matched else None


def key_from_headers(authorization: Optional[str], x_api_key: Optional[str]) -> Optional[str]:
    """The key from `Authorization: Bearer KEY` (or the `X-API-Key` header)."""
    if authorization:
        scheme, _, value = authorization.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
    if x_api_key:
        return x_api_key.strip()
    return None
