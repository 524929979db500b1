"""The Transformer: one decoder-only implementation for the GPT-2 and Llama families, with a KV cache.

Pure compute: no file or network I/O here. `GPT.from_pretrained`, `save_pretrained` and `generate`
are thin façades that import the I/O and decoding modules lazily, so `gptforge.model` itself
depends on `gptforge.config` alone.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import Config

if TYPE_CHECKING:  # pragma: no cover
    from .tokenizer import Tokenizer


# ---- position encodings ---------------------------------------------------------------------

def rope_inv_freq(config: Config) -> torch.Tensor:
    """Inverse frequencies for RoPE, with HF-compatible 'linear' and 'llama3' scaling."""
    dim = config.hdim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    scaling = config.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "linear":
        inv_freq = inv_freq / float(scaling["factor"])
    elif kind == "llama3":
        factor = float(scaling["factor"])
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        old_len = float(scaling["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        inv_freq = torch.where(medium, smoothed, scaled)
    elif kind != "default":
        raise ValueError(f"config field 'rope_scaling': unsupported rope_type {kind!r} (supported: linear, llama3)")
    return inv_freq.float()


def rope_cache(config: Config, length: int, device: Optional[torch.device] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables of shape (length, head_dim) in the HF "rotate_half" layout."""
    inv_freq = rope_inv_freq(config).to(device)
    t = torch.arange(length, device=device, dtype=torch.float32)
    freqs = torch.outer(t, inv_freq)  # (length, head_dim/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (length, head_dim)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, H, T, D) by cos/sin (B, 1, T, D)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def sinusoidal_table(length: int, dim: int) -> torch.Tensor:
    """The fixed encoding of Vaswani et al. (2017): sin on even, cos on odd channels."""
    pos = torch.arange(length, dtype=torch.float32)[:, None]
    div = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(length, dim)
    table[:, 0::2] = torch.sin(pos * div)
    table[:, 1::2] = torch.cos(pos * div)[:, : dim // 2]
    return table


# ---- building blocks ------------------------------------------------------------------------

class RMSNorm(nn.Module):
    """RMSNorm computed in fp32 and cast back, as HF Llama does (keeps bf16 parity)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return self.weight * normed.to(x.dtype)


def make_norm(config: Config) -> nn.Module:
    if config.norm == "rmsnorm":
        return RMSNorm(config.n_embd, config.norm_eps)
    return nn.LayerNorm(config.n_embd, eps=config.norm_eps, bias=config.bias)


class KVCache(nn.Module):
    """Preallocated key/value buffers for one layer: (batch, n_kv_head, max_len, head_dim)."""

    def __init__(self, batch_size: int, n_kv_head: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: Optional[torch.device]) -> None:
        super().__init__()
        shape = (batch_size, n_kv_head, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               rows: Optional[torch.Tensor], kv_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k/v (B, Hkv, T, D) at `slots` ((T,) or (B, T)); return keys/values [:kv_len] of the rows."""
        k, v = k.to(self.k.dtype), v.to(self.v.dtype)
        if rows is None and slots.dim() == 1:
            self.k.index_copy_(2, slots, k)
            self.v.index_copy_(2, slots, v)
            return self.k[:, :, :kv_len], self.v[:, :, :kv_len]
        b, h, t, d = k.shape
        if slots.dim() == 1:
            slots = slots.expand(b, t)
        if rows is None:
            idx = slots[:, None, :, None].expand(b, h, t, d)
            self.k.scatter_(2, idx, k)
            self.v.scatter_(2, idx, v)
            return self.k[:, :, :kv_len], self.v[:, :, :kv_len]
        # A subset of rows (continuous batching): advanced indexing writes and gathers per row.
        r = rows[:, None].expand(b, t)
        self.k[r, :, slots] = k.transpose(1, 2)
        self.v[r, :, slots] = v.transpose(1, 2)
        return self.k[rows, :, :kv_len], self.v[rows, :, :kv_len]


class Attention(nn.Module):
    def __init__(self, config: Config) -> None:
        super().__init__()
        self.config = config
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.kv_heads, config.hdim
        qkv_out = (self.n_head + 2 * self.n_kv_head) * self.head_dim
        self.qkv = nn.Linear(config.n_embd, qkv_out, bias=config.qkv_bias)  # fused q, k, v
        self.out = nn.Linear(self.n_head * self.head_dim, config.n_embd, bias=config.bias)
        self.kv_cache: Optional[KVCache] = None

    def forward(self, x: torch.Tensor, rope: Optional[tuple[torch.Tensor, torch.Tensor]],
                mask: Optional[torch.Tensor], cache_slots: Optional[torch.Tensor],
                cache_rows: Optional[torch.Tensor], kv_len: int) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self.qkv(x).split(
            [self.n_head * self.head_dim, self.n_kv_head * self.head_dim, self.n_kv_head * self.head_dim], dim=-1)
        q = q.view(b, t, self.n_head, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = k.view(b, t, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        v = v.view(b, t, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        if rope is not None:
            cos, sin = rope
            q = apply_rope(q, cos, sin).to(v.dtype)
            k = apply_rope(k, cos, sin).to(v.dtype)
        if self.kv_cache is not None and cache_slots is not None:
            k, v = self.kv_cache.update(cache_slots, k, v, cache_rows, kv_len)  # (B, Hkv, S, D)
            k, v = k.to(q.dtype), v.to(q.dtype)
        dropout = self.config.attn_dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=mask is None and t > 1,
            enable_gqa=self.n_kv_head != self.n_head)  # (B, H, T, D)
        y = y.transpose(1, 2).reshape(b, t, self.n_head * self.head_dim)
        return self.out(y)


class MLP(nn.Module):
    def __init__(self, config: Config) -> None:
        super().__init__()
        self.config = config
        self.swiglu = config.mlp == "swiglu"
        if self.swiglu:
            self.gate = nn.Linear(config.n_embd, config.ffn_dim, bias=config.bias)
        self.up = nn.Linear(config.n_embd, config.ffn_dim, bias=config.bias)
        self.down = nn.Linear(config.ffn_dim, config.n_embd, bias=config.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.swiglu:
            return self.down(F.silu(self.gate(x)) * self.up(x))
        if self.config.mlp == "relu2":
            return self.down(F.relu(self.up(x)).square())
        return self.down(F.gelu(self.up(x), approximate=self.config.gelu_approximate))


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: Config) -> None:
        super().__init__()
        self.norm1 = make_norm(config)
        self.attn = Attention(config)
        self.norm2 = make_norm(config)
        self.mlp = MLP(config)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, rope, mask, cache_slots, cache_rows, kv_len) -> torch.Tensor:
        x = x + self.drop(self.attn(self.norm1(x), rope, mask, cache_slots, cache_rows, kv_len))
        return x + self.drop(self.mlp(self.norm2(x)))


# ---- the model ------------------------------------------------------------------------------

class GPT(nn.Module):
    """Decoder-only Transformer. `model(input_ids)` returns logits of shape (batch, seq, vocab)."""

    def __init__(self, config: Config) -> None:
        super().__init__()
        config.validate()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        if config.pos_embedding == "learned":
            self.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.drop = nn.Dropout(config.embd_dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.norm_f = make_norm(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        # Tables are non-persistent buffers: derived from the config, never stored in checkpoints.
        if config.pos_embedding == "rope":
            cos, sin = rope_cache(config, config.block_size)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        elif config.pos_embedding == "sinusoidal":
            self.register_buffer("pos_table", sinusoidal_table(config.block_size, config.n_embd), persistent=False)
        self.cache_batch_size = 0
        self.cache_max_len = 0
        self.apply(self._init_weights)
        for name, param in self.named_parameters():
            if name.endswith("attn.out.weight") or name.endswith("mlp.down.weight"):
                # GPT-2's scaled init of residual projections keeps the residual stream's variance flat.
                nn.init.normal_(param, mean=0.0, std=config.init_std / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.init_std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.init_std)

    # ---- construction façades ---------------------------------------------------------------
    @classmethod
    def from_config(cls, config: Config | str | dict, **overrides: Any) -> "GPT":
        """Randomly initialised model from a Config, a preset name or a dict."""
        if isinstance(config, str):
            config = Config.from_name(config, **overrides)
        elif isinstance(config, dict):
            config = Config.from_dict({**config, **overrides})
        elif overrides:
            config = config.replace(**overrides)
        return cls(config)

    @classmethod
    def from_pretrained(cls, path: str | Path, *, dtype: Optional[torch.dtype] = None,
                        device: str | torch.device = "cpu") -> "GPT":
        """Load a Hugging Face-format directory (config.json + safetensors) written by us or by HF."""
        from .interop.hf import load_pretrained

        return load_pretrained(path, dtype=dtype, device=device)

    def save_pretrained(self, path: str | Path, tokenizer: Optional["Tokenizer"] = None) -> Path:
        """Write a directory that `transformers.AutoModelForCausalLM.from_pretrained` loads."""
        from .interop.hf import save_pretrained

        return save_pretrained(self, path, tokenizer=tokenizer or getattr(self, "tokenizer", None))

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """See `gptforge.generate.generate`."""
        from .generate import generate

        return generate(self, *args, **kwargs)

    # ---- sizes ------------------------------------------------------------------------------
    def num_params(self, non_embedding: bool = False) -> int:
        """Number of distinct parameters (tied weights counted once)."""
        seen = {id(p): p for p in self.parameters()}
        n = sum(p.numel() for p in seen.values())
        if non_embedding:
            n -= self.wte.weight.numel()
            if hasattr(self, "wpe"):
                n -= self.wpe.weight.numel()
        return n

    # ---- KV cache ---------------------------------------------------------------------------
    def setup_cache(self, batch_size: int, max_len: Optional[int] = None, *,
                    dtype: Optional[torch.dtype] = None, device: Optional[torch.device] = None) -> None:
        """Allocate per-layer KV buffers; afterwards `forward` with `cache_slots` decodes incrementally."""
        max_len = max_len or self.config.block_size
        if max_len > self.config.block_size:
            raise ValueError(f"max_len {max_len} exceeds the model context (block_size={self.config.block_size})")
        ref = self.wte.weight
        dtype = dtype or (ref.dtype if ref.dtype.is_floating_point else torch.float32)
        for block in self.blocks:
            block.attn.kv_cache = KVCache(batch_size, self.config.kv_heads, max_len, self.config.hdim,
                                          dtype, device or ref.device)
        self.cache_batch_size, self.cache_max_len = batch_size, max_len

    def clear_cache(self) -> None:
        """Free the KV buffers; `forward` goes back to full-sequence attention."""
        for block in self.blocks:
            block.attn.kv_cache = None
        self.cache_batch_size = self.cache_max_len = 0

    @property
    def has_cache(self) -> bool:
        return self.cache_max_len > 0

    # ---- forward ----------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, positions: Optional[torch.Tensor] = None, *,
                cache_slots: Optional[torch.Tensor] = None, cache_rows: Optional[torch.Tensor] = None,
                key_mask: Optional[torch.Tensor] = None, kv_len: Optional[int] = None,
                last_only: bool = False) -> torch.Tensor:
        """Logits (B, T, V), or (B, 1, V) with `last_only`.

        Without a cache: causal attention over `input_ids`; `key_mask` (B, T) marks real tokens
        (False for padding). With a cache (see `setup_cache`): K/V are written at `cache_slots`
        ((T,) or (B, T)) of cache rows `cache_rows` (default: all rows, B == cache batch), and each
        query attends to the slots <= its own that `key_mask` (B, S) marks as real. `positions`
        default to the slots and drive the position encoding.
        """
        b, t = input_ids.shape
        device = input_ids.device
        use_cache = self.has_cache and cache_slots is not None
        if positions is None:
            positions = cache_slots if use_cache else torch.arange(t, device=device)
        # The check reads a value back to the host; a compiled decode step (gptforge.generate) skips it
        # because its caller has already bounded the positions, and a graph break would recompile per step.
        max_pos = int(positions.max()) if positions.numel() and not torch.compiler.is_compiling() else 0
        if max_pos >= self.config.block_size:
            raise ValueError(f"sequence position {max_pos} exceeds the model context "
                             f"(block_size={self.config.block_size}); shorten the input")

        x = self.wte(input_ids)  # (B, T, C)
        if self.config.pos_embedding == "learned":
            x = x + self.wpe(positions)
        elif self.config.pos_embedding == "sinusoidal":
            x = x + self.pos_table[positions].to(x.dtype)
        x = self.drop(x)

        rope = None
        if self.config.pos_embedding == "rope":
            pos2d = positions if positions.dim() == 2 else positions[None, :]
            rope = (self.rope_cos[pos2d][:, None].to(x.dtype), self.rope_sin[pos2d][:, None].to(x.dtype))

        if use_cache:
            slots2d = cache_slots if cache_slots.dim() == 2 else cache_slots[None, :].expand(b, t)
            if kv_len is None:
                kv_len = int(slots2d.max()) + 1
            if (t == 1 and key_mask is None and self.config.sliding_window is None
                    and not torch.compiler.is_compiling() and int(slots2d.min()) >= kv_len - 1):
                mask = None  # one query at the newest slot sees every slot: SDPA's unmasked path is cheaper
            else:
                mask = self._cache_mask(slots2d, positions, key_mask, kv_len)
        else:
            kv_len = t
            mask = self._full_mask(t, key_mask, device)

        for block in self.blocks:
            x = block(x, rope, mask, cache_slots if use_cache else None, cache_rows, kv_len)
        if last_only:
            x = x[:, -1:]
        return self.lm_head(self.norm_f(x))

    def _full_mask(self, t: int, key_mask: Optional[torch.Tensor], device: torch.device) -> Optional[torch.Tensor]:
        window = self.config.sliding_window
        if key_mask is None and (window is None or t <= window):
            return None  # SDPA's is_causal fast path
        i = torch.arange(t, device=device)
        mask = i[None, :] <= i[:, None]  # (T, T) causal
        if window is not None:
            mask = mask & (i[:, None] - i[None, :] < window)
        mask = mask[None, None]  # (1, 1, T, T)
        if key_mask is not None:
            mask = mask & key_mask[:, None, None, :].bool()
            mask = mask | torch.eye(t, dtype=torch.bool, device=device)  # no empty rows (they give NaN)
        return mask

    def _cache_mask(self, slots: torch.Tensor, positions: torch.Tensor, key_mask: Optional[torch.Tensor],
                    kv_len: int) -> torch.Tensor:
        j = torch.arange(kv_len, device=slots.device)
        mask = j[None, None, :] <= slots[:, :, None]  # (B, T, S)
        if self.config.sliding_window is not None:
            mask = mask & (slots[:, :, None] - j[None, None, :] < self.config.sliding_window)
        if key_mask is not None:
            mask = mask & key_mask[:, None, :kv_len].bool()
            mask = mask | (j[None, None, :] == slots[:, :, None])  # a query always sees itself
        return mask[:, None]  # (B, 1, T, S)


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Mean next-token cross-entropy; `labels` are already shifted (labels[t] is the target of t)."""
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), labels.reshape(-1),
                           ignore_index=ignore_index)


__all__ = ["GPT", "KVCache", "Block", "Attention", "MLP", "RMSNorm", "causal_lm_loss", "apply_rope",
           "rope_cache", "sinusoidal_table"]
