"""Several LoRA adapters on one base model, chosen per sequence and batched together in one forward.

Each adapted linear becomes a `MultiLoRALinear`: the base linear (untouched, so quantized or re-laid
weights keep their fast path) plus every adapter's A (r, in) and B (out, r), stacked and zero-padded to the
largest rank, with slot 0 all zeros for "no adapter" and each adapter's scaling folded into its B. Before
a forward the engine says which adapter each batch row uses (`AdapterSet.select`); the update is then
y += (x A[rows]^T) B[rows]^T, two batched matmuls over gathered per-row matrices (as S-LoRA / Punica do,
without their custom kernels), so sequences of different adapters share one forward.

Adapters are read with `gptforge.finetune.lora.load_lora` (PEFT layout, as `gptforge finetune --method
lora` writes it, or PEFT's own for the same base), so the name mapping and checks are the ones fine-tuning
uses.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$")


class _Selection:
    """Which adapter each row of the next forward uses: (B,) slot ids, or None (the base model alone)."""

    rows: Optional[torch.Tensor] = None


class MultiLoRALinear(nn.Module):
    """A linear layer plus per-row low-rank updates from a stack of adapters (slot 0: none)."""

    def __init__(self, base: nn.Module, a: torch.Tensor, b: torch.Tensor, selection: _Selection) -> None:
        super().__init__()
        self.base = base
        self.register_buffer("lora_a", a, persistent=False)  # (N + 1, r, in)
        self.register_buffer("lora_b", b, persistent=False)  # (N + 1, out, r), scaling folded in
        self.selection = selection

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def bias(self) -> Optional[torch.Tensor]:
        return self.base.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        rows = self.selection.rows
        if rows is None:
            return y
        a = self.lora_a[rows].to(x.dtype)  # (B, r, in)
        b = self.lora_b[rows].to(x.dtype)  # (B, out, r)
        shape = x.shape
        x3 = x.reshape(shape[0], -1, shape[-1])  # (B, T, in)
        update = torch.bmm(torch.bmm(x3, a.transpose(1, 2)), b.transpose(1, 2))  # (B, T, out)
        return y + update.reshape(*shape[:-1], -1).to(y.dtype)


class AdapterSet:
    """The adapters served beside a base model: names -> slots (1..N), and the switch the engine sets."""

    def __init__(self, names: list[str], selection: _Selection, directories: Optional[dict[str, str]] = None) -> None:
        self.names = names
        self.directories = directories or {}
        self.slots = {name: i + 1 for i, name in enumerate(names)}
        self._selection = selection

    def select(self, slots: Optional[list[int]]) -> None:
        """Adapter slot per batch row for the next forward (None, or all zeros: the base model alone)."""
        self._selection.rows = torch.tensor(slots, dtype=torch.long) if slots and any(slots) else None


def _adapter_tensors(model: nn.Module, directory: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(A, scaling * B) by module name for the adapter in `directory`; the model is left as it was."""
    from ..finetune.lora import LoRALinear, load_lora, lora_modules

    originals = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    grads = {name: p.requires_grad for name, p in model.named_parameters()}
    try:
        load_lora(model, directory)
        return {name: (m.lora_A.detach().clone(), (m.lora_B.detach().float() * m.scaling).to(m.lora_B.dtype))
                for name, m in lora_modules(model).items()}
    finally:  # put the plain linears back: the adapters live in the MultiLoRALinear stacks instead
        for name, module in list(model.named_modules()):
            if isinstance(module, LoRALinear):
                parent_name, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent_name) if parent_name else model, child, originals[name])
        if hasattr(model, "lora_config"):
            del model.lora_config
        for name, p in model.named_parameters():
            p.requires_grad_(grads.get(name, False))


def attach_adapters(model: nn.Module, adapters: dict[str, str | Path]) -> AdapterSet:
    """Load each named adapter directory and wrap the linears they touch in `MultiLoRALinear` (in place)."""
    names = list(adapters)
    per_adapter = [_adapter_tensors(model, Path(adapters[n])) for n in names]
    selection = _Selection()
    for module_name in sorted({m for tensors in per_adapter for m in tensors}):
        base = model.get_submodule(module_name)
        pairs = [tensors.get(module_name) for tensors in per_adapter]
        rank = max(p[0].shape[0] for p in pairs if p is not None)
        out_f, in_f = base.weight.shape
        dtype = next(p[0].dtype for p in pairs if p is not None)
        a = torch.zeros(len(names) + 1, rank, in_f, dtype=dtype)
        b = torch.zeros(len(names) + 1, out_f, rank, dtype=dtype)
        for slot, pair in enumerate(pairs, start=1):
            if pair is not None:  # an adapter that leaves this module alone keeps zeros here
                a[slot, :pair[0].shape[0]] = pair[0]
                b[slot, :, :pair[1].shape[1]] = pair[1]
        parent_name, _, child = module_name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child,
                MultiLoRALinear(base, a.to(base.weight.device), b.to(base.weight.device), selection))
    return AdapterSet(names, selection, {n: str(adapters[n]) for n in names})


def parse_lora_flags(values: list[str], base_name: str) -> dict[str, str]:
    """`--lora NAME=DIR` values as {name: dir}, checked (a one-line error naming the flag)."""
    out: dict[str, str] = {}
    for value in values:
        name, sep, directory = value.partition("=")
        name = name.strip()
        if not sep or not directory:
            raise ValueError(f"--lora {value!r}: expected NAME=DIR (the name clients send as `model`)")
        if not NAME_PATTERN.match(name):
            raise ValueError(f"--lora {value!r}: the name must be letters, digits, '_', '.', ':' or '-' "
                             "(at most 128 characters)")
        if name == base_name or name in out:
            raise ValueError(f"--lora {value!r}: the name {name!r} is already taken"
                             + (" by the base model" if name == base_name else ""))
        if not (Path(directory) / "adapter_config.json").is_file():
            raise FileNotFoundError(f"--lora {value!r}: no adapter_config.json in {directory} "
                                    "(expected a LoRA adapter directory, as `gptforge finetune --method lora` writes)")
        out[name] = directory
    return out


__all__ = ["MultiLoRALinear", "AdapterSet", "attach_adapters", "parse_lora_flags"]
