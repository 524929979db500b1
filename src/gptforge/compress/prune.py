"""Pruning: unstructured (magnitude, Wanda) and structured (attention heads + MLP channels).

Unstructured pruning zeroes weights in place; the tensors stay dense, so it saves neither bytes nor
time by itself (it is the input to sparse kernels or compression). Structured pruning removes whole
KV-head groups and MLP channels, uniformly per layer, and returns a smaller plain `GPT` whose config
has fewer heads (`n_head`, `n_kv_head`, with `head_dim` kept explicit) and a smaller `intermediate_size`.

Scores use input-activation norms from a small calibration set (Wanda, Sun et al. 2023: |W_ij| * ||X_j||_2);
without calibration data structured pruning falls back to weight norms alone.
"""

from __future__ import annotations

from typing import Iterable, Optional, Sequence

import torch
import torch.nn as nn

from ..model import GPT

PRUNE_METHODS = ("magnitude", "wanda", "heads")


def validate_sparsity(sparsity: float) -> float:
    """Return `sparsity` as a float, or raise ValueError unless it lies in [0, 1)."""
    try:
        value = float(sparsity)
    except (TypeError, ValueError):
        raise ValueError(f"sparsity must be a number in [0, 1), got {sparsity!r}") from None
    if not 0.0 <= value < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {value}")
    return value


def prunable_linears(model: GPT) -> dict[str, nn.Linear]:
    """The Transformer blocks' linears (embeddings and the LM head are left whole)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear) and name.startswith("blocks.")}


def calibration_batches(token_ids: Sequence[int], seq_len: int, n_samples: int) -> list[torch.Tensor]:
    """Cut a token stream into up to `n_samples` (1, seq_len) windows, spread evenly over it."""
    if seq_len <= 0 or n_samples <= 0:
        raise ValueError(f"calibration seq_len and n_samples must be positive, got {seq_len}, {n_samples}")
    ids = torch.tensor(list(token_ids), dtype=torch.long)
    if ids.numel() < 2:
        raise ValueError("calibration text is empty after tokenization")
    if ids.numel() <= seq_len:
        return [ids[None, :]]
    starts = torch.linspace(0, ids.numel() - seq_len, steps=min(n_samples, ids.numel() // seq_len)).long()
    return [ids[s: s + seq_len][None, :] for s in starts.tolist()]


@torch.no_grad()
def activation_norms(model: GPT, batches: Iterable[torch.Tensor], names: Sequence[str]) -> dict[str, torch.Tensor]:
    """L2 norm over all calibration tokens of each input feature of the named linears: {name: (in_features,)}."""
    sums: dict[str, torch.Tensor] = {}
    hooks = []

    def hook_for(name: str):
        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            x = inputs[0].detach().float().reshape(-1, inputs[0].shape[-1])
            sums[name] = sums.get(name, 0) + (x * x).sum(dim=0)
        return hook

    for name in names:
        hooks.append(model.get_submodule(name).register_forward_pre_hook(hook_for(name)))
    was_training = model.training
    model.eval()
    try:
        seen = 0
        for batch in batches:
            model(batch.to(model.wte.weight.device))
            seen += 1
        if seen == 0:
            raise ValueError("calibration set is empty")
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return {name: sums[name].sqrt() for name in names}


@torch.no_grad()
def magnitude_prune(model: GPT, sparsity: float) -> GPT:
    """Zero the smallest-|W| fraction `sparsity` of each block linear, in place."""
    sparsity = validate_sparsity(sparsity)
    for linear in prunable_linears(model).values():
        w = linear.weight
        k = int(w.numel() * sparsity)
        if k:
            threshold = w.abs().flatten().kthvalue(k).values
            w.masked_fill_(w.abs() <= threshold, 0.0)
    return model


@torch.no_grad()
def wanda_prune(model: GPT, sparsity: float, calibration: Iterable[torch.Tensor]) -> GPT:
    """Wanda: zero, per output row, the fraction `sparsity` of weights with the smallest |W| * ||X||, in place."""
    sparsity = validate_sparsity(sparsity)
    linears = prunable_linears(model)
    norms = activation_norms(model, calibration, list(linears))
    for name, linear in linears.items():
        w = linear.weight  # (out, in)
        k = int(w.shape[1] * sparsity)
        if k:
            score = w.abs() * norms[name][None, :].to(w.dtype)
            drop = score.topk(k, dim=1, largest=False).indices  # (out, k)
            w.scatter_(1, drop, 0.0)
    return model


def _keep_count(total: int, sparsity: float, multiple: int = 1) -> int:
    keep = max(1, round(total * (1.0 - sparsity)))
    if multiple > 1 and total % multiple == 0 and keep >= multiple:
        keep = multiple * round(keep / multiple)  # kernel-friendly widths (int4 groups of 32)
    return min(total, keep)


@torch.no_grad()
def structured_prune(model: GPT, sparsity: float, calibration: Optional[Iterable[torch.Tensor]] = None) -> GPT:
    """Remove the fraction `sparsity` of KV-head groups and of MLP channels in every layer; returns a new, smaller GPT.

    A KV group (one K/V head and the query heads that share it) scores sum_c ||X_c|| * ||W_out[:, c]||
    over its output-projection columns c; an MLP channel j scores ||X_j|| * ||W_down[:, j]||, X being the
    input of `attn.out` / `mlp.down` on the calibration set (1 without one).
    """
    sparsity = validate_sparsity(sparsity)
    cfg = model.config
    hdim, n_kv, group = cfg.hdim, cfg.kv_heads, cfg.n_head // cfg.kv_heads
    keep_kv = _keep_count(n_kv, sparsity)
    keep_ffn = _keep_count(cfg.ffn_dim, sparsity, multiple=32)
    names = [f"blocks.{i}.{part}" for i in range(cfg.n_layer) for part in ("attn.out", "mlp.down")]
    norms = activation_norms(model, calibration, names) if calibration is not None else {}

    new_heads = keep_kv * group
    head_dim = None if cfg.head_dim is None and cfg.n_embd % new_heads == 0 and cfg.n_embd // new_heads == hdim \
        else hdim
    new_cfg = cfg.replace(n_head=new_heads, n_kv_head=None if cfg.n_kv_head is None else keep_kv,
                          head_dim=head_dim, intermediate_size=keep_ffn)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for i, block in enumerate(model.blocks):
        p = f"blocks.{i}."
        out_w = block.attn.out.weight.float()  # (C, H*D)
        x_out = norms.get(p + "attn.out", torch.ones(out_w.shape[1]))
        col_score = out_w.norm(dim=0) * x_out  # (H*D,)
        group_score = col_score.view(n_kv, group * hdim).sum(dim=1)
        kept_groups = group_score.topk(keep_kv).indices.sort().values
        q_heads = (kept_groups[:, None] * group + torch.arange(group)[None, :]).flatten()
        q_idx = (q_heads[:, None] * hdim + torch.arange(hdim)[None, :]).flatten()
        kv_idx = (kept_groups[:, None] * hdim + torch.arange(hdim)[None, :]).flatten()
        q_size, kv_size = cfg.n_head * hdim, n_kv * hdim
        qkv_rows = torch.cat([q_idx, q_size + kv_idx, q_size + kv_size + kv_idx])
        state[p + "attn.qkv.weight"] = state[p + "attn.qkv.weight"][qkv_rows]
        if p + "attn.qkv.bias" in state:
            state[p + "attn.qkv.bias"] = state[p + "attn.qkv.bias"][qkv_rows]
        state[p + "attn.out.weight"] = state[p + "attn.out.weight"][:, q_idx]

        down_w = block.mlp.down.weight.float()  # (C, F)
        x_down = norms.get(p + "mlp.down", torch.ones(down_w.shape[1]))
        kept = (down_w.norm(dim=0) * x_down).topk(keep_ffn).indices.sort().values
        for part in ("up", "gate"):
            for suffix in ("weight", "bias"):
                key = f"{p}mlp.{part}.{suffix}"
                if key in state:
                    state[key] = state[key][kept]
        state[p + "mlp.down.weight"] = state[p + "mlp.down.weight"][:, kept]

    pruned = GPT(new_cfg).to(model.wte.weight.dtype)
    pruned.load_state_dict(state, strict=True)
    if new_cfg.tie_embeddings:
        pruned.lm_head.weight = pruned.wte.weight
    return pruned.eval()


def prune_model(model: GPT, method: str, sparsity: float,
                calibration: Optional[Sequence[torch.Tensor]] = None) -> GPT:
    """Prune with `method` (magnitude | wanda | heads); returns the pruned model (a new one for 'heads')."""
    if method not in PRUNE_METHODS:
        raise ValueError(f"unknown pruning method {method!r}; expected one of {list(PRUNE_METHODS)}")
    validate_sparsity(sparsity)
    from .quantize import is_quantized

    if is_quantized(model):
        raise ValueError("cannot prune a quantized model: prune the float model first, then quantize")
    if method == "magnitude":
        return magnitude_prune(model, sparsity)
    if method == "wanda":
        if not calibration:
            raise ValueError("method 'wanda' needs calibration text (--calibration FILE)")
        return wanda_prune(model, sparsity, calibration)
    return structured_prune(model, sparsity, calibration or None)


class TokenWindows:
    """Random (input, label) windows of one token stream: the batch source of the recovery fine-tune."""

    def __init__(self, token_ids: Sequence[int], batch_size: int, seq_len: int, seed: int = 0) -> None:
        self.ids = torch.tensor(list(token_ids), dtype=torch.long)
        if self.ids.numel() < seq_len + 1:
            raise ValueError(f"recovery text has {self.ids.numel()} tokens; need at least seq_len + 1 = {seq_len + 1}")
        self.batch_size, self.seq_len, self.seed, self.drawn = batch_size, seq_len, seed, 0
        self.generator = torch.Generator().manual_seed(seed)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        starts = torch.randint(0, self.ids.numel() - self.seq_len, (self.batch_size,), generator=self.generator)
        self.drawn += 1
        window = torch.stack([self.ids[s: s + self.seq_len + 1] for s in starts.tolist()])  # (B, T+1)
        return window[:, :-1], window[:, 1:]

    def state_dict(self) -> dict:
        return {"seed": self.seed, "drawn": self.drawn}

    def load_state_dict(self, state: dict) -> None:
        self.seed, self.drawn = int(state["seed"]), 0
        self.generator = torch.Generator().manual_seed(self.seed)
        for _ in range(int(state["drawn"])):
            self.next_batch()


def recover_finetune(model: GPT, token_ids: Sequence[int], out_dir: str, *, steps: int, lr: float = 1e-4,
                     batch_size: int = 8, seq_len: int = 128) -> GPT:
    """Short fine-tune after pruning through the shared training loop; pruned (zero) weights stay zero."""
    from ..train.loop import TrainConfig, train

    if steps <= 0:
        raise ValueError(f"recovery steps must be positive, got {steps}")
    seq_len = min(seq_len, model.config.block_size)
    # Unstructured zeros must stay zero: mask their gradients (AdamW then never moves them either).
    hooks = []
    for linear in prunable_linears(model).values():
        mask = (linear.weight != 0).to(linear.weight.dtype)
        if not bool(mask.all()):
            hooks.append(linear.weight.register_hook(lambda grad, m=mask: grad * m))
    cfg = TrainConfig(max_steps=steps, lr=lr, warmup_steps=0, schedule="constant", weight_decay=0.0,
                      device="cpu", progress=True, save_best=False)
    try:
        model.train()
        train(model, cfg, TokenWindows(token_ids, batch_size, seq_len), out_dir, save_model=lambda m, d: None)
    finally:
        for h in hooks:
            h.remove()
    return model.eval()


def sparsity_of(model: GPT) -> float:
    """Fraction of exactly-zero weights in the block linears."""
    linears = prunable_linears(model).values()
    zeros = sum(int((m.weight == 0).sum()) for m in linears)
    total = sum(m.weight.numel() for m in linears)
    return zeros / max(total, 1)


__all__ = ["PRUNE_METHODS", "prune_model", "magnitude_prune", "wanda_prune", "structured_prune",
           "activation_norms", "calibration_batches", "recover_finetune", "TokenWindows", "sparsity_of", "validate_sparsity", "prunable_linears"]
