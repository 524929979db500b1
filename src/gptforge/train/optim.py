"""AdamW with decoupled weight decay on matrices only (not on norms, biases or embeddings)."""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.nn as nn


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Split trainable parameters into a decayed group (weight matrices) and a non-decayed one."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay, seen = [], [], set()
    for _, param in model.named_parameters():
        if not param.requires_grad or id(param) in seen:
            continue
        seen.add(id(param))  # tied weights (wte / lm_head) appear once
        # Norm gains and biases are 1-D; embeddings (and the lm_head tied to them) are lookups, not maps.
        if param.dim() < 2 or id(param) in embeddings:
            no_decay.append(param)
        else:
            decay.append(param)
    groups = []
    if decay:
        groups.append({"params": decay, "weight_decay": weight_decay})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def fused_available(device: torch.device) -> bool:
    """Whether torch's fused AdamW kernel runs on `device` (CUDA always; CPU since torch 2.4)."""
    if "fused" not in inspect.signature(torch.optim.AdamW).parameters:
        return False
    if device.type == "cuda":
        return True
    try:  # probe once: CPU support depends on the build
        p = torch.nn.Parameter(torch.zeros(1, device=device))
        p.grad = torch.zeros(1, device=device)
        torch.optim.AdamW([p], fused=True).step()
        return True
    except (RuntimeError, TypeError):
        return False


def build_optimizer(model: nn.Module, lr: float, weight_decay: float = 0.1, betas: tuple[float, float] = (0.9, 0.95),
                    eps: float = 1e-8, fused: bool | None = None) -> torch.optim.AdamW:
    """AdamW over the model's trainable parameters; fused kernel where available."""
    groups = parameter_groups(model, weight_decay)
    if not groups:
        raise ValueError("the model has no trainable parameters (every parameter has requires_grad=False)")
    device = next(p.device for g in groups for p in g["params"])
    use_fused = fused_available(device) if fused is None else fused
    kwargs: dict[str, Any] = {"fused": True} if use_fused else {}
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, **kwargs)


__all__ = ["build_optimizer", "parameter_groups", "fused_available"]
