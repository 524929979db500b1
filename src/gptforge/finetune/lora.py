"""LoRA (Hu et al., 2021): low-rank adapters on `nn.Linear` layers, saved in the PEFT layout, merged on demand.

A `LoRALinear` *is* an `nn.Linear` (same `weight`/`bias` names) plus `lora_A` (r, in) and `lora_B` (out, r):
y = x W^T + b + scaling * dropout(x) A^T B^T with scaling = alpha / r. `lora_B` starts at zero, so a fresh
adapter leaves the model unchanged.

Adapters are written as `adapter_config.json` + `adapter_model.safetensors` under Hugging Face module names,
so `peft.PeftModel.from_pretrained` loads them on the HF export of the base model. Our fused `attn.qkv`
becomes `c_attn` for GPT-2 and `qkv_proj` for Phi-3 (one module each), and `q_proj`/`k_proj`/`v_proj` for the
other families: the three share our `lora_A` and split `lora_B` by rows, which is exact because (B A) split
by rows is (B_q A; B_k A; B_v A). Phi-3's fused `mlp.gate_up` is `gate_up_proj`. In mixture-of-experts
models only attention is a target: PEFT maps MLP target names of such a model onto its fused expert weights.
"""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
import torch.nn as nn

from ..atomic import atomic_write_text, read_json
from ..checkpoint import CheckpointError, load_tensors, save_tensors
from ..config import ConfigError
from ..model import GPT

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
# Our per-block linears that LoRA may wrap.
LORA_TARGETS = ("attn.qkv", "attn.out", "mlp.gate", "mlp.up", "mlp.down", "mlp.gate_up")
# Our module suffix -> HF module suffixes (one per part of a fused weight, in row order).
HF_MODULES = {
    "gpt2": {"attn.qkv": ["attn.c_attn"], "attn.out": ["attn.c_proj"], "mlp.up": ["mlp.c_fc"],
             "mlp.down": ["mlp.c_proj"]},
    "llama": {"attn.qkv": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
              "attn.out": ["self_attn.o_proj"], "mlp.gate": ["mlp.gate_proj"], "mlp.up": ["mlp.up_proj"],
              "mlp.down": ["mlp.down_proj"]},
    "phi3": {"attn.qkv": ["self_attn.qkv_proj"], "attn.out": ["self_attn.o_proj"],
             "mlp.gate_up": ["mlp.gate_up_proj"], "mlp.down": ["mlp.down_proj"]},
}


@dataclass
class LoRAConfig:
    """Adapter shape: rank, scaling numerator, dropout on the adapter input, and which linears to wrap."""

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["attn.qkv", "attn.out"])

    def validate(self) -> None:
        """Raise ConfigError naming the field when a value is out of range."""
        if not isinstance(self.r, int) or self.r <= 0:
            raise ConfigError(f"lora field 'r' must be a positive integer, got {self.r!r}")
        if not isinstance(self.alpha, (int, float)) or self.alpha <= 0:
            raise ConfigError(f"lora field 'alpha' must be a positive number, got {self.alpha!r}")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ConfigError(f"lora field 'dropout' must be in [0, 1), got {self.dropout!r}")
        if not self.target_modules:
            raise ConfigError("lora field 'target_modules' must name at least one module")
        for name in self.target_modules:
            if name not in LORA_TARGETS:
                raise ConfigError(f"lora field 'target_modules': unknown module {name!r}; choose from {list(LORA_TARGETS)}")

    @property
    def scaling(self) -> float:
        return float(self.alpha) / self.r


class LoRALinear(nn.Linear):
    """An `nn.Linear` with a trainable low-rank update; the base weight keeps its name and stays frozen."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self.r, self.alpha, self.scaling = r, alpha, float(alpha) / r
        kw = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, **kw))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, **kw))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # PEFT's default: same as nn.Linear
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.adapter_enabled = True  # False: the base layer alone (preference tuning's reference model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = nn.functional.linear(x, self.weight, self.bias)
        if not self.adapter_enabled:
            return result
        update = nn.functional.linear(nn.functional.linear(self.lora_dropout(x), self.lora_A), self.lora_B)
        return result + update * self.scaling

    def delta_weight(self) -> torch.Tensor:
        """The dense update scaling * B A, shaped like `weight` (out, in)."""
        return (self.lora_B.float() @ self.lora_A.float() * self.scaling).to(self.weight.dtype)

    def merged(self) -> nn.Linear:
        """A plain `nn.Linear` whose weight is W + scaling * B A."""
        plain = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        plain.weight = nn.Parameter(self.weight.detach() + self.delta_weight(), requires_grad=False)
        if self.bias is not None:
            plain.bias = nn.Parameter(self.bias.detach().clone(), requires_grad=False)
        return plain


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    """The model's LoRA layers by qualified name (e.g. 'blocks.0.attn.qkv')."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block the model computes as its base model (every LoRA update switched off)."""
    layers = list(lora_modules(model).values())
    for layer in layers:
        layer.adapter_enabled = False
    try:
        yield model
    finally:
        for layer in layers:
            layer.adapter_enabled = True


def _target_of(name: str) -> Optional[str]:
    return next((t for t in LORA_TARGETS if name.endswith("." + t)), None)


def apply_lora(model: GPT, config: LoRAConfig, *, freeze_base: bool = True) -> GPT:
    """Wrap the targeted linears of `model` in place; freeze everything else. Returns the model."""
    config.validate()
    wanted = set(config.target_modules)
    present = {_target_of(n) for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    if model.config.n_expert:  # PEFT reads gate/up/down_proj targets of an MoE model as its experts' weights
        present = {t for t in present if t is None or not t.startswith("mlp.")}
    missing = sorted(wanted - present)
    if missing:
        raise ConfigError(f"lora field 'target_modules': {missing} not in this model (it has "
                          f"{sorted(t for t in present if t)}; mlp.gate/up exist with a gated MLP, mlp.gate_up with "
                          "a fused one (Phi-3), and mixture-of-experts layers offer no MLP targets)")
    if freeze_base:
        for p in model.parameters():
            p.requires_grad_(False)
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and not isinstance(module, LoRALinear) and _target_of(name) in wanted:
            parent, child = _split(model, name)
            setattr(parent, child, LoRALinear(module, config.r, config.alpha, config.dropout))
    model.lora_config = config
    return model


def _split(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    return model.get_submodule(parent_name) if parent_name else model, child


def merge_lora(model: GPT) -> GPT:
    """Fold every adapter into its base weight and restore plain linears (in place). Returns the model."""
    for name, module in lora_modules(model).items():
        parent, child = _split(model, name)
        setattr(parent, child, module.merged())
    if hasattr(model, "lora_config"):
        del model.lora_config
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts, tied weights counted once."""
    seen = {id(p): p for p in model.parameters()}
    return sum(p.numel() for p in seen.values() if p.requires_grad), sum(p.numel() for p in seen.values())


# ---- PEFT layout -------------------------------------------------------------------------------

def _family(model: GPT) -> Optional[str]:
    from ..interop.hf import hf_family

    family = hf_family(model.config)
    if family is None:
        return None
    return family if family in ("gpt2", "phi3") else "llama"  # every other family names modules as Llama does


def _hf_block_prefix(family: str, i: int) -> str:
    return f"transformer.h.{i}." if family == "gpt2" else f"model.layers.{i}."


def _qkv_sizes(model: GPT) -> list[int]:
    c = model.config
    return [c.n_head * c.hdim, c.kv_heads * c.hdim, c.kv_heads * c.hdim]


def lora_state_to_peft(model: GPT) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Adapter tensors under PEFT's names, and the HF target-module suffixes they cover."""
    family = _family(model)
    tensors: dict[str, torch.Tensor] = {}
    targets: set[str] = set()
    for name, module in lora_modules(model).items():
        if family is None:  # an architecture `transformers` cannot load: keep our own names
            tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = module.lora_A
            tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = module.lora_B
            targets.add(_target_of(name))
            continue
        block = int(name.split(".")[1])
        ours = _target_of(name)
        hf_names = HF_MODULES[family][ours]
        parts = module.lora_B.split(_qkv_sizes(model), dim=0) if len(hf_names) == 3 else [module.lora_B]
        for hf_name, part in zip(hf_names, parts):
            key = f"{PEFT_PREFIX}{_hf_block_prefix(family, block)}{hf_name}"
            tensors[f"{key}.lora_A.weight"] = module.lora_A
            tensors[f"{key}.lora_B.weight"] = part
            targets.add(hf_name)
    return tensors, sorted(targets)


def save_lora(model: GPT, directory: str | Path, *, base_model: Optional[str] = None) -> Path:
    """Write `adapter_config.json` + `adapter_model.safetensors` (PEFT layout) atomically."""
    config: Optional[LoRAConfig] = getattr(model, "lora_config", None)
    if config is None or not lora_modules(model):
        raise ValueError("save_lora: the model has no LoRA adapters (call apply_lora first)")
    tensors, targets = lora_state_to_peft(model)
    family = _family(model)
    adapter_config: dict[str, Any] = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": config.r, "lora_alpha": config.alpha, "lora_dropout": config.dropout,
        "target_modules": targets, "bias": "none", "fan_in_fan_out": family == "gpt2",
        "inference_mode": True, "modules_to_save": None, "init_lora_weights": True,
        "use_rslora": False, "use_dora": False, "rank_pattern": {}, "alpha_pattern": {},
    }
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    # Each file is written atomically; the folder may also hold the tokenizer or the loop's own files.
    save_tensors(tensors, directory / ADAPTER_WEIGHTS_NAME, metadata={"format": "pt"})
    atomic_write_text(directory / ADAPTER_CONFIG_NAME, json.dumps(adapter_config, indent=2))
    return directory


def read_adapter_config(directory: str | Path) -> dict[str, Any]:
    """The adapter's JSON config, with errors naming the file and field."""
    file = Path(directory) / ADAPTER_CONFIG_NAME
    data = read_json(file, CheckpointError, f"{directory}: no {ADAPTER_CONFIG_NAME} (expected a LoRA adapter directory)")
    if data.get("peft_type", "LORA") != "LORA":
        raise CheckpointError(f"{file}: field 'peft_type' is {data.get('peft_type')!r}; only 'LORA' is supported")
    for key in ("r", "lora_alpha"):
        if not isinstance(data.get(key), (int, float)):
            raise CheckpointError(f"{file}: field {key!r} must be a number, got {data.get(key)!r}")
    if data.get("use_dora") or data.get("use_rslora") or data.get("rank_pattern") or data.get("alpha_pattern"):
        raise CheckpointError(f"{file}: DoRA, rsLoRA and per-module rank/alpha patterns are not supported")
    return data


def load_lora(model: GPT, directory: str | Path) -> GPT:
    """Attach the adapter in `directory` (ours, or PEFT's for the same base) to `model`, in place."""
    directory = Path(directory)
    data = read_adapter_config(directory)
    tensors = load_tensors(directory / ADAPTER_WEIGHTS_NAME)
    tensors = {k.replace(".default.", "."): v for k, v in tensors.items()}  # PEFT in-memory names
    family = _family(model)
    r, alpha = int(data["r"]), float(data["lora_alpha"])
    found: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    consumed: set[str] = set()

    def take(key: str) -> Optional[torch.Tensor]:
        full = f"{PEFT_PREFIX}{key}"
        if f"{full}.lora_A.weight" not in tensors:
            return None
        consumed.update({f"{full}.lora_A.weight", f"{full}.lora_B.weight"})
        return tensors[f"{full}.lora_A.weight"], tensors[f"{full}.lora_B.weight"]

    for i in range(model.config.n_layer):
        for ours in LORA_TARGETS:
            name = f"blocks.{i}.{ours}"
            if family is None:
                pair = take(name)
                if pair is not None:
                    found[name] = pair
                continue
            hf_names = HF_MODULES[family].get(ours, [])
            pairs = [take(_hf_block_prefix(family, i) + h) for h in hf_names]
            if not hf_names or all(p is None for p in pairs):
                continue
            if any(p is None for p in pairs):
                raise CheckpointError(f"{directory}: adapter covers only some of q/k/v in layer {i}; "
                                      "gptforge needs all three (its q, k, v are one fused linear)")
            found[name] = _fuse_pairs(pairs)
    leftover = sorted(set(tensors) - consumed)
    if leftover:
        raise CheckpointError(f"{directory / ADAPTER_WEIGHTS_NAME}: tensors that match no module of this model: "
                              f"{leftover[:4]}")
    if not found:
        raise CheckpointError(f"{directory / ADAPTER_WEIGHTS_NAME}: no LoRA tensors found")
    targets = sorted({_target_of(n) for n in found})
    config = LoRAConfig(r=r, alpha=alpha, dropout=float(data.get("lora_dropout") or 0.0), target_modules=targets)
    apply_lora(model, config)
    for name, (a, b) in found.items():
        module = model.get_submodule(name)
        if a.shape[0] != module.r:  # a PEFT adapter with separate q/k/v down-projections: rank 3r
            module.r = a.shape[0]
            module.lora_A = nn.Parameter(torch.empty_like(a, dtype=module.weight.dtype))
            module.lora_B = nn.Parameter(torch.empty_like(b, dtype=module.weight.dtype))
        if module.lora_A.shape != a.shape or module.lora_B.shape != b.shape:
            raise CheckpointError(f"{directory}: {name}: adapter shapes A{tuple(a.shape)} B{tuple(b.shape)} do not fit "
                                  f"the model (A{tuple(module.lora_A.shape)} B{tuple(module.lora_B.shape)})")
        with torch.no_grad():
            module.lora_A.copy_(a)
            module.lora_B.copy_(b)
    return model


def _fuse_pairs(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """One (A, B) for a fused linear from per-part (A_i, B_i): shared A when equal, else block-diagonal B."""
    if len(pairs) == 1:
        return pairs[0]
    a0 = pairs[0][0]
    if all(torch.equal(a, a0) for a, _ in pairs):
        return a0, torch.cat([b for _, b in pairs], dim=0)
    # Distinct down-projections: stack them (rank 3r) and place each B on its own rank block.
    a = torch.cat([a for a, _ in pairs], dim=0)
    b = torch.block_diag(*[b for _, b in pairs])
    return a, b


__all__ = ["LoRAConfig", "LoRALinear", "apply_lora", "merge_lora", "save_lora", "load_lora", "lora_modules",
           "trainable_parameters", "lora_state_to_peft", "read_adapter_config", "LORA_TARGETS"]
