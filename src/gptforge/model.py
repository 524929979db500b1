"""The Transformer: one decoder-only implementation for every supported family, with a KV cache.

GPT-2 and Llama are the two base shapes; the other families switch on mechanisms in `Config`, each a
no-op when off: QK-norm (Qwen3, Gemma 3, OLMo 2), sandwich and post norms (Gemma, OLMo 2), (1 + w)
RMSNorm, embedding scaling and soft-capping (Gemma), per-layer sliding windows and RoPE bases (Gemma,
Qwen3), partial rotary and LongRoPE (Phi-3/4), fused gate|up (Phi-3), and sparse mixture-of-experts
MLPs (Mixtral, Qwen3-MoE, OLMoE). docs/models.md lists what each family uses.

Pure compute: no file or network I/O, and no import of the package but `gptforge.config`. Loading and
saving live in `gptforge.loading` (`load(path) -> (model, tokenizer)`), decoding in `gptforge.generate`.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import Config


# ---- position encodings ---------------------------------------------------------------------

def rope_inv_freq(config: Config, *, local: bool = False, long: bool = False) -> torch.Tensor:
    """Inverse frequencies (rotary_dim/2,) for RoPE, with HF-compatible 'linear', 'llama3' and 'longrope' scaling.

    `local` gives Gemma 3's sliding-window base (`rope_local_theta`, unscaled); `long` LongRoPE's long factors.
    """
    dim = config.rotary_dim
    theta = config.rope_local_theta if local else config.rope_theta
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    scaling = {} if local else (config.rope_scaling or {})
    kind = "default" if local else config.rope_type
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
    elif kind == "longrope":
        factors = scaling["long_factor" if long else "short_factor"]
        inv_freq = inv_freq / torch.tensor(factors, dtype=torch.float64)
    elif kind != "default":
        raise ValueError(f"config field 'rope_scaling': unsupported rope_type {kind!r} "
                         "(supported: linear, llama3, longrope)")
    return inv_freq.float()


def longrope_attention_factor(config: Config) -> float:
    """LongRoPE's cos/sin multiplier: given, or sqrt(1 + ln(s) / ln(original)) for the extension ratio s (as HF)."""
    scaling = config.rope_scaling or {}
    if scaling.get("attention_factor") is not None:
        return float(scaling["attention_factor"])
    original = scaling["original_max_position_embeddings"]
    factor = scaling.get("factor") or config.block_size / original
    return 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))


def rope_cache(config: Config, length: int, device: Optional[torch.device] = None, *, local: bool = False,
               long: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables of shape (length, rotary_dim) in the HF "rotate_half" layout."""
    inv_freq = rope_inv_freq(config, local=local, long=long).to(device)
    t = torch.arange(length, device=device, dtype=torch.float32)
    freqs = torch.outer(t, inv_freq)  # (length, rotary_dim/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (length, rotary_dim)
    if config.rope_type == "longrope" and not local:
        scale = longrope_attention_factor(config)
        return emb.cos() * scale, emb.sin() * scale
    return emb.cos(), emb.sin()


def position_tables(config: Config, device: Optional[torch.device] = None) -> dict[str, torch.Tensor]:
    """The non-persistent tables a model of `config` holds, by buffer name (derived, never checkpointed)."""
    tables: dict[str, torch.Tensor] = {}
    if config.pos_embedding == "rope":
        tables["rope_cos"], tables["rope_sin"] = rope_cache(config, config.block_size, device)
        if config.rope_type == "longrope":
            tables["rope_long_cos"], tables["rope_long_sin"] = rope_cache(config, config.block_size, device, long=True)
        if config.rope_local_theta is not None:
            tables["rope_local_cos"], tables["rope_local_sin"] = rope_cache(config, config.block_size, device,
                                                                            local=True)
    elif config.pos_embedding == "sinusoidal":
        tables["pos_table"] = sinusoidal_table(config.block_size, config.n_embd).to(device)
    return tables


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, H, T, D) by cos/sin (B, 1, T, R); with R < D (partial rotary) the last D - R dims pass through."""
    rot = cos.shape[-1]
    if rot < x.shape[-1]:
        return torch.cat((apply_rope(x[..., :rot], cos, sin), x[..., rot:]), dim=-1)
    half = rot // 2
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
    """RMSNorm computed in fp32 and cast back, as HF Llama does (keeps bf16 parity).

    With `unit_offset` (Gemma) the scale is (1 + weight), applied in fp32 before the cast, and weights start at 0.
    """

    def __init__(self, dim: int, eps: float, unit_offset: bool = False) -> None:
        super().__init__()
        self.eps = eps
        self.unit_offset = unit_offset
        self.weight = nn.Parameter(torch.zeros(dim) if unit_offset else torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.unit_offset and x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            # The weight applied inside the one call (24 -> 15 us per call measured at decode), same numbers.
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        if self.unit_offset:
            return (normed * (1.0 + self.weight.float())).to(x.dtype)
        return self.weight * normed.to(x.dtype)


def make_norm(config: Config, dim: Optional[int] = None) -> nn.Module:
    dim = dim or config.n_embd
    if config.norm == "rmsnorm":
        return RMSNorm(dim, config.norm_eps, config.norm_unit_offset)
    return nn.LayerNorm(dim, eps=config.norm_eps, bias=config.bias)


class KVCache(nn.Module):
    """Preallocated key/value buffers for one layer: (batch, n_kv_head, max_len, head_dim)."""

    def __init__(self, batch_size: int, n_kv_head: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: Optional[torch.device]) -> None:
        super().__init__()
        shape = (batch_size, n_kv_head, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               rows: Optional[torch.Tensor | slice], kv_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k/v (B, Hkv, T, D) at `slots` ((T,) or (B, T)); return keys/values [:kv_len] of the rows.

        `rows`: None (all rows), a slice of rows (a view: nothing is copied, the serving engine keeps its
        running sequences in rows [0, n)), or a tensor of row indices (gathered, a copy).
        """
        k, v = k.to(self.k.dtype), v.to(self.v.dtype)
        if isinstance(rows, slice):
            cache_k, cache_v = self.k[rows], self.v[rows]  # (B, Hkv, S, D) views
            if slots.dim() == 1:
                cache_k.index_copy_(2, slots, k)
                cache_v.index_copy_(2, slots, v)
            else:
                idx = slots[:, None, :, None].expand(k.shape)
                cache_k.scatter_(2, idx, k)
                cache_v.scatter_(2, idx, v)
            return cache_k[:, :, :kv_len], cache_v[:, :, :kv_len]
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
    """Multi-head attention with grouped-query heads, RoPE and the optional per-family mechanisms.

    `F.scaled_dot_product_attention` is the fast path. `eager` (the scores written out) runs when the
    scores are soft-capped (Gemma 2), which SDPA cannot do, and when `record_weights` is set: then the
    probabilities of the last forward are kept in `weights` (B, H, T, S) for `gptforge.explain`.
    Both paths take the same mask, scale and cap, so the recorded weights are the ones the model used.
    """

    def __init__(self, config: Config, layer: int = 0) -> None:
        super().__init__()
        self.config = config
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.kv_heads, config.hdim
        qkv_out = (self.n_head + 2 * self.n_kv_head) * self.head_dim
        self.qkv = nn.Linear(config.n_embd, qkv_out, bias=config.qkv_bias)  # fused q, k, v
        self.out = nn.Linear(self.n_head * self.head_dim, config.n_embd, bias=config.bias)
        self.kv_cache: Optional[KVCache] = None
        self.window = config.layer_window(layer)  # None: global attention
        self.local_rope = config.layer_uses_local_rope(layer)
        # None keeps SDPA's default 1/sqrt(head_dim); Gemma scales by query_pre_attn_scalar^-1/2 instead.
        self.scale = None if config.query_pre_attn_scalar is None else config.query_pre_attn_scalar ** -0.5
        self.softcap = config.attn_softcap
        self.clip = config.clip_qkv
        self.qk_norm = config.qk_norm
        if config.qk_norm is not None:
            q_dim, k_dim = ((self.head_dim, self.head_dim) if config.qk_norm == "head"
                            else (self.n_head * self.head_dim, self.n_kv_head * self.head_dim))
            self.q_norm = RMSNorm(q_dim, config.norm_eps, config.norm_unit_offset)
            self.k_norm = RMSNorm(k_dim, config.norm_eps, config.norm_unit_offset)
        self.record_weights = False
        self.weights: Optional[torch.Tensor] = None

    def forward(self, x: torch.Tensor, rope: Optional[tuple[torch.Tensor, torch.Tensor]],
                mask: Optional[torch.Tensor], cache_slots: Optional[torch.Tensor],
                cache_rows: Optional[torch.Tensor], kv_len: int) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self.qkv(x).split(
            [self.n_head * self.head_dim, self.n_kv_head * self.head_dim, self.n_kv_head * self.head_dim], dim=-1)
        if self.qk_norm == "full":  # OLMo: one norm across all heads' q (B, T, H*D) and k (B, T, Hkv*D)
            q, k = self.q_norm(q), self.k_norm(k)
        if self.clip is not None:
            q, k, v = q.clamp(-self.clip, self.clip), k.clamp(-self.clip, self.clip), v.clamp(-self.clip, self.clip)
        q = q.view(b, t, self.n_head, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = k.view(b, t, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        v = v.view(b, t, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        if self.qk_norm == "head":  # Qwen3, Gemma 3: one norm over each head's D dims, shared by the heads
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            cos, sin = rope
            q = apply_rope(q, cos, sin).to(v.dtype)
            k = apply_rope(k, cos, sin).to(v.dtype)
        if self.kv_cache is not None and cache_slots is not None:
            k, v = self.kv_cache.update(cache_slots, k, v, cache_rows, kv_len)  # (B, Hkv, S, D)
            k, v = k.to(q.dtype), v.to(q.dtype)
        dropout = self.config.attn_dropout if self.training else 0.0
        if self.softcap is None and not self.record_weights:
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=mask is None and t > 1, scale=self.scale,
                enable_gqa=self.n_kv_head != self.n_head)  # (B, H, T, D)
        else:
            y = self.eager(q, k, v, mask, dropout)
        y = y.transpose(1, 2).reshape(b, t, self.n_head * self.head_dim)
        return self.out(y)

    def eager(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor],
              dropout: float) -> torch.Tensor:
        """softmax(cap(q k^T * scale) + mask) v with the scores materialised: q (B, H, T, D), k/v (B, Hkv, S, D)."""
        t, s = q.shape[-2], k.shape[-2]
        if self.n_kv_head != self.n_head:  # each kv head serves n_head / n_kv_head query heads, as enable_gqa does
            k = k.repeat_interleave(self.n_head // self.n_kv_head, dim=1)  # (B, H, S, D)
            v = v.repeat_interleave(self.n_head // self.n_kv_head, dim=1)
        scale = self.head_dim ** -0.5 if self.scale is None else self.scale
        scores = (q @ k.transpose(-1, -2)).float() * scale  # (B, H, T, S)
        if self.softcap is not None:
            scores = torch.tanh(scores / self.softcap) * self.softcap
        if mask is None and t > 1:  # SDPA's is_causal: query i sees keys j <= i (top-left aligned)
            mask = torch.ones(t, s, dtype=torch.bool, device=q.device).tril()
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        probs = scores.softmax(dim=-1)
        if self.record_weights:
            self.weights = probs.detach()
        if dropout > 0:
            probs = F.dropout(probs, p=dropout)
        return probs.to(v.dtype) @ v  # (B, H, T, D)


class MLP(nn.Module):
    """GELU MLP (GPT-2) or gated MLP: down(act(gate(x)) * up(x)), act silu (SwiGLU) or tanh-GELU (GeGLU)."""

    def __init__(self, config: Config, width: Optional[int] = None) -> None:
        super().__init__()
        self.config = config
        width = width or config.ffn_dim
        self.kind = config.mlp
        self.fused = config.fused_gate_up and self.kind not in ("gelu", "relu2")
        if self.fused:
            self.gate_up = nn.Linear(config.n_embd, 2 * width, bias=config.bias)  # rows: gate | up (Phi-3)
        else:
            if self.kind not in ("gelu", "relu2"):  # gated kinds
                self.gate = nn.Linear(config.n_embd, width, bias=config.bias)
            self.up = nn.Linear(config.n_embd, width, bias=config.bias)
        self.down = nn.Linear(width, config.n_embd, bias=config.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "swiglu" and not self.fused:
            return self.down(F.silu(self.gate(x)) * self.up(x))
        if self.kind == "relu2":
            return self.down(F.relu(self.up(x)).square())
        if self.kind == "gelu":
            return self.down(F.gelu(self.up(x), approximate=self.config.gelu_approximate))
        gate, up = self.gate_up(x).chunk(2, dim=-1) if self.fused else (self.gate(x), self.up(x))
        act = F.silu(gate) if self.kind == "swiglu" else F.gelu(gate, approximate=self.config.gelu_approximate)
        return self.down(act * up)


class MoE(nn.Module):
    """Sparse mixture of gated-MLP experts with top-k routing (Mixtral, Qwen3-MoE, OLMoE).

    The router's softmax runs in fp32 over all experts, the top k are kept and (with `moe_norm_topk`)
    renormalised to sum to 1. Dispatch groups the (token, expert) assignments by expert with one sort,
    so each expert runs once on a contiguous slice of its tokens: a Python loop over experts, none
    over tokens. When training, `router_stats` keeps what the load-balancing loss needs.
    """

    def __init__(self, config: Config) -> None:
        super().__init__()
        self.n_expert, self.top_k, self.norm_topk = config.n_expert, config.n_expert_per_token, config.moe_norm_topk
        self.router = nn.Linear(config.n_embd, config.n_expert, bias=False)
        self.experts = nn.ModuleList(MLP(config, config.expert_dim) for _ in range(config.n_expert))
        self.router_stats: Optional[tuple[torch.Tensor, torch.Tensor]] = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        flat = x.reshape(b * t, c)  # (N, C)
        probs = self.router(flat).float().softmax(dim=-1)  # (N, E)
        weights, chosen = probs.topk(self.top_k, dim=-1)  # (N, K) each
        if self.norm_topk:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        self.router_stats = (probs, chosen) if self.training else None
        if torch.compiler.is_compiling():
            out = self._dense(flat, chosen, weights)
        elif flat.shape[0] == 1:
            out = self._single(flat, chosen, weights)
        else:
            out = self._grouped(flat, chosen, weights)
        return out.view(b, t, c)

    def _single(self, flat: torch.Tensor, chosen: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """One token (batch-1 decode): its k experts in turn, without the sort and scatter of `_grouped`."""
        out = None
        for expert, weight in zip(chosen[0].tolist(), weights[0].to(flat.dtype)):
            y = self.experts[expert](flat) * weight  # (1, C)
            out = y if out is None else out + y
        return out

    def _grouped(self, flat: torch.Tensor, chosen: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Each expert on its own tokens: one sort of the N*K assignments, one host read of the counts."""
        expert_of = chosen.reshape(-1)  # (N*K,) expert of each assignment, token-major
        order = expert_of.argsort(stable=True)  # assignments grouped by expert, token order kept within
        token_of = order // self.top_k  # (N*K,) the token of each grouped assignment
        counts = torch.bincount(expert_of, minlength=self.n_expert).tolist()
        xs = flat.index_select(0, token_of)  # (N*K, C)
        outputs, start = [], 0
        for expert, count in zip(self.experts, counts):
            if count:
                outputs.append(expert(xs[start:start + count]))  # (count, C)
            start += count
        ys = torch.cat(outputs) * weights.reshape(-1)[order, None].to(flat.dtype)  # (N*K, C)
        return torch.zeros_like(flat).index_add_(0, token_of, ys)  # sum each token's k expert outputs

    def _dense(self, flat: torch.Tensor, chosen: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Every expert on every token, weighted by its (mostly zero) routing weight: no data-dependent shapes,
        so a compiled decode step needs no host sync. Costs n_expert / top_k times the grouped FLOPs."""
        gates = torch.zeros(flat.shape[0], self.n_expert, dtype=weights.dtype, device=flat.device)
        gates = gates.scatter(1, chosen, weights).to(flat.dtype)  # (N, E)
        out = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):
            out = out + expert(flat) * gates[:, e:e + 1]
        return out


def load_balancing_loss(stats: list[tuple[torch.Tensor, torch.Tensor]], n_expert: int) -> torch.Tensor:
    """Switch-Transformer auxiliary loss over all MoE layers, as HF computes it (counts and probabilities are
    pooled over the layers' rows): n_expert * sum_e (share of assignments to e) * (mean router probability of e)."""
    counts = sum(torch.bincount(chosen.reshape(-1), minlength=n_expert).float() for _, chosen in stats)  # (E,)
    prob_sum = sum(probs.sum(dim=0) for probs, _ in stats)  # (E,)
    rows = sum(probs.shape[0] for probs, _ in stats)
    return n_expert * torch.sum((counts / rows) * (prob_sum / rows))


class Block(nn.Module):
    """Residual block. Pre-norm: x + attn(norm1(x)), then x + mlp(norm2(x)); "post" norms the sublayer's
    output instead (OLMo 2), "sandwich" does both (Gemma)."""

    def __init__(self, config: Config, layer: int = 0) -> None:
        super().__init__()
        pre, post = config.norm_placement in ("pre", "sandwich"), config.norm_placement in ("post", "sandwich")
        self.norm1 = make_norm(config) if pre else None
        self.attn = Attention(config, layer)
        self.post_attn_norm = make_norm(config) if post else None
        self.norm2 = make_norm(config) if pre else None
        self.mlp = MoE(config) if config.is_moe_layer(layer) else MLP(config)
        self.post_mlp_norm = make_norm(config) if post else None
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, rope, mask, cache_slots, cache_rows, kv_len) -> torch.Tensor:
        h = self.attn(x if self.norm1 is None else self.norm1(x), rope, mask, cache_slots, cache_rows, kv_len)
        if self.post_attn_norm is not None:
            h = self.post_attn_norm(h)
        x = x + self.drop(h)
        h = self.mlp(x if self.norm2 is None else self.norm2(x))
        if self.post_mlp_norm is not None:
            h = self.post_mlp_norm(h)
        return x + self.drop(h)


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
        self.blocks = nn.ModuleList(Block(config, layer) for layer in range(config.n_layer))
        self.norm_f = make_norm(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        # Tables are non-persistent buffers: derived from the config, never stored in checkpoints.
        for name, table in position_tables(config).items():
            self.register_buffer(name, table, persistent=False)
        # LongRoPE switches every position to the long factors once any position reaches this (as HF does).
        self.longrope_from = (config.rope_scaling["original_max_position_embeddings"]
                              if config.rope_type == "longrope" else None)
        self.embed_scale = math.sqrt(config.n_embd) if config.scale_embeddings else None
        self.moe_layers = [block.mlp for block in self.blocks if isinstance(block.mlp, MoE)]
        # Per layer, fixed at build time: (whether it uses the local RoPE table, its window).
        self.layer_plan = [(block.attn.local_rope, block.attn.window) for block in self.blocks]
        self.windows = tuple(dict.fromkeys(window for _, window in self.layer_plan))  # distinct, in layer order
        # The load-balancing loss of the last training forward (router_aux_loss_coef included), or None.
        self.aux_loss: Optional[torch.Tensor] = None
        self.cache_batch_size = 0
        self.cache_max_len = 0
        self.apply(self._init_weights)
        for name, param in self.named_parameters():
            if name.endswith("attn.out.weight") or name.endswith(".down.weight"):
                # GPT-2's scaled init of residual projections keeps the residual stream's variance flat.
                nn.init.normal_(param, mean=0.0, std=config.init_std / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.init_std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.init_std)

    # ---- construction ---------------------------------------------------------------
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

    def reset_tables(self, device: Optional[torch.device] = None) -> None:
        """Recompute the non-persistent position tables (e.g. after building on the meta device)."""
        for name, table in position_tables(self.config, device).items():
            setattr(self, name, table)

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
                cache_slots: Optional[torch.Tensor] = None, cache_rows: Optional[torch.Tensor | slice] = None,
                key_mask: Optional[torch.Tensor] = None, kv_len: Optional[int] = None,
                last_only: bool = False) -> torch.Tensor:
        """Logits (B, T, V), or (B, 1, V) with `last_only`.

        Without a cache: causal attention over `input_ids`; `key_mask` (B, T) marks real tokens
        (False for padding). With a cache (see `setup_cache`): K/V are written at `cache_slots`
        ((T,) or (B, T)) of cache rows `cache_rows` (default: all rows, B == cache batch; a slice of rows
        or a tensor of row indices), and each
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
        if self.embed_scale is not None:  # Gemma: sqrt(n_embd), rounded to the activation dtype as HF does
            x = x * x.new_tensor(self.embed_scale)
        if self.config.pos_embedding == "learned":
            x = x + self.wpe(positions)
        elif self.config.pos_embedding == "sinusoidal":
            x = x + self.pos_table[positions].to(x.dtype)
        x = self.drop(x)

        rope = rope_local = None
        if self.config.pos_embedding == "rope":
            pos2d = positions if positions.dim() == 2 else positions[None, :]
            cos, sin = self.rope_cos[pos2d], self.rope_sin[pos2d]  # (B or 1, T, R)
            if self.longrope_from is not None:  # a tensor comparison: no host sync, so it compiles
                long = positions.max() >= self.longrope_from
                cos = torch.where(long, self.rope_long_cos[pos2d], cos)
                sin = torch.where(long, self.rope_long_sin[pos2d], sin)
            rope = (cos[:, None].to(x.dtype), sin[:, None].to(x.dtype))
            if self.config.rope_local_theta is not None:
                rope_local = (self.rope_local_cos[pos2d][:, None].to(x.dtype),
                              self.rope_local_sin[pos2d][:, None].to(x.dtype))

        # One mask per distinct window among the layers (None: global attention).
        windows = self.windows
        if use_cache:
            slots2d = cache_slots if cache_slots.dim() == 2 else cache_slots[None, :].expand(b, t)
            if kv_len is None:
                kv_len = int(slots2d.max()) + 1
            masks = {w: self._cache_mask(slots2d, positions, key_mask, kv_len, w) for w in windows if w is not None}
            if None in windows:
                if (t == 1 and key_mask is None and not torch.compiler.is_compiling()
                        and int(slots2d.min()) >= kv_len - 1):
                    masks[None] = None  # one query at the newest slot sees every slot: SDPA's unmasked path is cheaper
                else:
                    masks[None] = self._cache_mask(slots2d, positions, key_mask, kv_len, None)
        else:
            kv_len = t
            masks = {w: self._full_mask(t, key_mask, device, w) for w in windows}

        slots = cache_slots if use_cache else None
        for block, (local_rope, window) in zip(self.blocks, self.layer_plan):
            x = block(x, rope_local if local_rope else rope, masks[window], slots, cache_rows, kv_len)
        if self.moe_layers:
            self._collect_aux_loss()
        if last_only:
            x = x[:, -1:]
        logits = self.lm_head(self.norm_f(x))
        if self.config.logit_softcap is not None:
            cap = self.config.logit_softcap
            logits = torch.tanh(logits / cap) * cap
        return logits

    def _collect_aux_loss(self) -> None:
        """Set `aux_loss` from the routers of this forward (training only) and drop their statistics."""
        stats = [moe.router_stats for moe in self.moe_layers if moe.router_stats is not None]
        self.aux_loss = None
        if stats:
            self.aux_loss = self.config.router_aux_loss_coef * load_balancing_loss(stats, self.config.n_expert)
        for moe in self.moe_layers:
            moe.router_stats = None

    def _full_mask(self, t: int, key_mask: Optional[torch.Tensor], device: torch.device,
                   window: Optional[int]) -> Optional[torch.Tensor]:
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
                    kv_len: int, window: Optional[int]) -> torch.Tensor:
        j = torch.arange(kv_len, device=slots.device)
        mask = j[None, None, :] <= slots[:, :, None]  # (B, T, S)
        if window is not None:
            mask = mask & (slots[:, :, None] - j[None, None, :] < window)
        if key_mask is not None:
            mask = mask & key_mask[:, None, :kv_len].bool()
            mask = mask | (j[None, None, :] == slots[:, :, None])  # a query always sees itself
        return mask[:, None]  # (B, 1, T, S)


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Mean next-token cross-entropy; `labels` are already shifted (labels[t] is the target of t)."""
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), labels.reshape(-1),
                           ignore_index=ignore_index)


__all__ = ["GPT", "KVCache", "Block", "Attention", "MLP", "MoE", "RMSNorm", "causal_lm_loss", "apply_rope",
           "rope_cache", "rope_inv_freq", "position_tables", "sinusoidal_table", "load_balancing_loss"]
