"""Automatic prefix caching: the keys and values of token blocks that earlier sequences computed, reused.

A sequence's tokens are cut into fixed blocks (16 tokens); block i is named by a digest of block i-1's
digest and its own tokens, so one name stands for the whole prefix up to the end of that block (a
chain, as in vLLM). The store keeps each block's keys/values for every layer (L, Hkv, B, D), up to a
byte budget, evicting the least recently used block first. A lookup returns the longest run of stored
blocks from the start of a prompt; the engine copies them into the sequence's cache row and prefills
only the rest.

Blocks of a chain are touched deepest first, so a prefix is always more recent than its extensions and
eviction takes leaves before the roots they hang from (a block without its parent could never be hit).
The digest is BLAKE2b over the token ids, so two different prefixes never share a name in practice;
`namespace` separates caches whose keys/values differ for the same tokens (another adapter, say).
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from dataclasses import dataclass
from typing import Sequence

import torch

BLOCK_TOKENS = 16


@dataclass
class KVBlock:
    """Keys and values of one block of tokens for every layer: (L, Hkv, B, D) each."""

    k: torch.Tensor
    v: torch.Tensor

    @property
    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() + self.v.numel() * self.v.element_size()


class PrefixCache:
    """A bounded LRU store of KV blocks named by token-prefix digests (see the module docstring)."""

    def __init__(self, capacity_bytes: int, block_tokens: int = BLOCK_TOKENS) -> None:
        if capacity_bytes < 0:
            raise ValueError(f"prefix cache capacity must be >= 0 bytes, got {capacity_bytes}")
        if block_tokens < 1:
            raise ValueError(f"prefix cache block size must be >= 1 token, got {block_tokens}")
        self.capacity_bytes = capacity_bytes
        self.block_tokens = block_tokens
        self.bytes = 0
        self.evictions = 0
        self._blocks: OrderedDict[bytes, KVBlock] = OrderedDict()

    def __len__(self) -> int:
        return len(self._blocks)

    def digests(self, ids: Sequence[int], known: Sequence[bytes] = (), namespace: str = "") -> list[bytes]:
        """Digests of every full block of `ids`; `known` are those of its first blocks, already computed."""
        out = list(known)
        b = self.block_tokens
        prev = out[-1] if out else namespace.encode("utf-8")
        for start in range(len(out) * b, len(ids) - b + 1, b):
            h = hashlib.blake2b(prev, digest_size=16)
            h.update(array("q", ids[start:start + b]).tobytes())
            prev = h.digest()
            out.append(prev)
        return out

    def lookup(self, digests: Sequence[bytes]) -> list[KVBlock]:
        """The stored blocks of the longest run of `digests` from the first one (touched as used)."""
        hits = []
        for d in digests:
            block = self._blocks.get(d)
            if block is None:
                break
            hits.append(block)
        self._touch(digests[:len(hits)])
        return hits

    def __contains__(self, digest: bytes) -> bool:
        return digest in self._blocks

    def insert(self, chain: Sequence[bytes], new: dict[bytes, KVBlock]) -> None:
        """Store the `new` blocks of `chain` (the digests of one sequence from its first block, `new` in chain
        order), evicting least recently used blocks of other chains to stay within the budget. When only this
        chain is left to evict, its deeper blocks are not kept: a block is useless without its parents."""
        protected = set(chain)
        for d, block in new.items():
            if d in self._blocks:
                continue
            if block.nbytes > self.capacity_bytes:  # could never fit: keep what is there
                break
            while self.bytes + block.nbytes > self.capacity_bytes:
                victim = next((v for v in self._blocks if v not in protected), None)  # usually the first
                if victim is None:
                    self._touch(chain)
                    return
                self.bytes -= self._blocks.pop(victim).nbytes
                self.evictions += 1
            self._blocks[d] = block
            self.bytes += block.nbytes
        self._touch(chain)

    def _touch(self, chain: Sequence[bytes]) -> None:
        for d in reversed(chain):  # deepest first: the root ends up the most recent
            if d in self._blocks:
                self._blocks.move_to_end(d)

    def clear(self) -> None:
        """Drop every block."""
        self._blocks.clear()
        self.bytes = 0


__all__ = ["PrefixCache", "KVBlock", "BLOCK_TOKENS"]
