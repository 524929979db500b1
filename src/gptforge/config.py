"""Model configuration: one dataclass for the GPT-2 and Llama families, named presets, YAML.

This module imports no torch so that CLIs, docs and the server can read configs cheaply.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

PosEmbedding = Literal["learned", "sinusoidal", "rope", "none"]
NormKind = Literal["layernorm", "rmsnorm"]
MLPKind = Literal["gelu", "swiglu", "relu2"]


from .errors import ConfigError  # noqa: E402  (re-exported: gptforge.config.ConfigError)


@dataclass
class Config:
    """Architecture of a decoder-only Transformer. Field names follow nanoGPT/litgpt."""

    name: str = "custom"
    # HF architecture this config maps to when saved ("gpt2", "llama", "qwen2", "mistral").
    family: str = "gpt2"
    vocab_size: int = 50257
    block_size: int = 1024  # maximum context length (HF: max_position_embeddings / n_positions)
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    n_kv_head: Optional[int] = None  # grouped-query attention; None means n_head
    head_dim: Optional[int] = None  # None means n_embd // n_head
    intermediate_size: Optional[int] = None  # None means 4 * n_embd (gelu, relu2) or the Llama rule (swiglu)
    pos_embedding: PosEmbedding = "learned"
    rope_theta: float = 10000.0
    rope_scaling: Optional[dict] = None  # HF rope_scaling dict; "llama3" and "linear" are supported
    norm: NormKind = "layernorm"
    norm_eps: float = 1e-5
    mlp: MLPKind = "gelu"  # GELU MLP (GPT-2), SwiGLU gated MLP (Llama) or ReLU(x)^2 MLP (relu2: Primer, speedruns)
    gelu_approximate: str = "tanh"  # GPT-2's "gelu_new" is the tanh approximation
    bias: bool = True  # biases in every Linear and LayerNorm (GPT-2)
    attn_qkv_bias: Optional[bool] = None  # Qwen2: bias on q/k/v only; None means `bias`
    tie_embeddings: bool = True
    sliding_window: Optional[int] = None  # Mistral-style local attention
    dropout: float = 0.0  # residual and MLP dropout
    attn_dropout: float = 0.0
    embd_dropout: float = 0.0
    init_std: float = 0.02
    bos_token_id: Optional[int] = None
    eos_token_id: Optional[int] = None
    pad_token_id: Optional[int] = None

    def __post_init__(self) -> None:
        self.validate()

    # ---- derived sizes -------------------------------------------------------------------
    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def hdim(self) -> int:
        return self.head_dim or self.n_embd // self.n_head

    @property
    def ffn_dim(self) -> int:
        if self.intermediate_size:
            return self.intermediate_size
        if self.mlp in ("gelu", "relu2"):
            return 4 * self.n_embd
        # Llama rule: 2/3 of 4d, rounded up to a multiple of 256 (64 for tiny models).
        hidden = int(2 * 4 * self.n_embd / 3)
        multiple = 256 if self.n_embd >= 1024 else 64
        return multiple * math.ceil(hidden / multiple)

    @property
    def qkv_bias(self) -> bool:
        return self.bias if self.attn_qkv_bias is None else self.attn_qkv_bias

    def validate(self) -> None:
        """Raise ConfigError naming the field when the architecture is inconsistent."""
        positive = ["vocab_size", "block_size", "n_layer", "n_head", "n_embd"]
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"config field '{name}' must be a positive integer, got {value!r}")
        if self.head_dim is None and self.n_embd % self.n_head:
            raise ConfigError(
                f"config field 'n_embd' ({self.n_embd}) must be divisible by 'n_head' ({self.n_head})"
            )
        if self.n_head % self.kv_heads:
            raise ConfigError(
                f"config field 'n_head' ({self.n_head}) must be a multiple of 'n_kv_head' ({self.kv_heads})"
            )
        if self.pos_embedding == "rope" and self.hdim % 2:
            raise ConfigError(f"RoPE needs an even head dimension, got head_dim={self.hdim}")
        choices = {
            "pos_embedding": ("learned", "sinusoidal", "rope", "none"),
            "norm": ("layernorm", "rmsnorm"),
            "mlp": ("gelu", "swiglu", "relu2"),
            "gelu_approximate": ("tanh", "none"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"config field '{name}' must be one of {allowed}, got {getattr(self, name)!r}")
        for name in ("dropout", "attn_dropout", "embd_dropout"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ConfigError(f"config field '{name}' must be in [0, 1), got {value!r}")

    # ---- sizes for MFU and reports -------------------------------------------------------
    def num_params(self, non_embedding: bool = False) -> int:
        """Parameter count computed from the config (matches the built model)."""
        d, h, kv, hd, f = self.n_embd, self.n_head, self.kv_heads, self.hdim, self.ffn_dim
        attn = d * (h + 2 * kv) * hd + h * hd * d
        if self.qkv_bias:
            attn += (h + 2 * kv) * hd
        if self.bias:
            attn += d
        mlp = (3 if self.mlp == "swiglu" else 2) * d * f
        if self.bias:
            mlp += f * (2 if self.mlp == "swiglu" else 1) + d
        norm = d * (2 if self.norm == "layernorm" and self.bias else 1)
        per_layer = attn + mlp + 2 * norm
        total = self.n_layer * per_layer + norm  # final norm
        embed = self.vocab_size * d
        pos = self.block_size * d if self.pos_embedding == "learned" else 0
        head = 0 if self.tie_embeddings else self.vocab_size * d
        if non_embedding:
            return total + head
        return total + embed + pos + head

    def flops_per_token(self, seq_len: Optional[int] = None) -> float:
        """Training FLOPs per token (forward + backward), PaLM appendix B: 6N + 12 L h q T."""
        t = seq_len or self.block_size
        n = self.num_params(non_embedding=True) + (0 if not self.tie_embeddings else self.vocab_size * self.n_embd)
        return 6 * n + 12 * self.n_layer * self.n_head * self.hdim * t

    # ---- (de)serialisation ---------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> "Config":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"{source}: unknown model config field(s) {unknown}; known fields: {sorted(known)}")
        return cls(**data)

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> "Config":
        """A named preset (see `PRESETS`), optionally with fields overridden."""
        if name not in PRESETS:
            raise ConfigError(f"unknown model preset {name!r}; available: {sorted(PRESETS)}")
        data = {**PRESETS[name], "name": name, **overrides}
        return cls.from_dict(data, source=f"preset {name!r}")

    @classmethod
    def from_file(cls, path: str | Path) -> "Config":
        """Read a config from YAML or JSON (a gptforge config, not an HF config.json)."""
        data = load_yaml(path)
        if "model" in data and isinstance(data["model"], dict):
            data = data["model"]
        return cls.from_dict(data, source=str(path))

    def replace(self, **changes: Any) -> "Config":
        return dataclasses.replace(self, **changes)


_GPT2 = dict(family="gpt2", vocab_size=50257, block_size=1024, pos_embedding="learned", norm="layernorm",
             mlp="gelu", bias=True, tie_embeddings=True, norm_eps=1e-5, bos_token_id=50256, eos_token_id=50256)
_LLAMA = dict(family="llama", pos_embedding="rope", norm="rmsnorm", mlp="swiglu", bias=False,
              tie_embeddings=False, norm_eps=1e-5, rope_theta=10000.0)

# Kept to a handful: recipes in configs/ cover the rest, and HF checkpoints bring their own.
PRESETS: dict[str, dict[str, Any]] = {
    "gpt2": {**_GPT2, "n_layer": 12, "n_head": 12, "n_embd": 768},
    "gpt2-medium": {**_GPT2, "n_layer": 24, "n_head": 16, "n_embd": 1024},
    "gpt2-large": {**_GPT2, "n_layer": 36, "n_head": 20, "n_embd": 1280},
    "gpt2-xl": {**_GPT2, "n_layer": 48, "n_head": 25, "n_embd": 1600},
    # CPU-sized models for tests, demos and the char-level speedrun.
    "nano": {**_GPT2, "vocab_size": 512, "block_size": 256, "n_layer": 2, "n_head": 2, "n_embd": 64,
             "bos_token_id": None, "eos_token_id": None},
    "micro": {**_GPT2, "vocab_size": 4096, "block_size": 256, "n_layer": 4, "n_head": 4, "n_embd": 128,
              "bos_token_id": None, "eos_token_id": None},
    "llama-nano": {**_LLAMA, "vocab_size": 512, "block_size": 256, "n_layer": 2, "n_head": 4, "n_kv_head": 2,
                   "n_embd": 64},
    "llama-micro": {**_LLAMA, "vocab_size": 4096, "block_size": 512, "n_layer": 4, "n_head": 4, "n_kv_head": 2,
                    "n_embd": 192, "tie_embeddings": True},
    "llama-small": {**_LLAMA, "vocab_size": 8192, "block_size": 1024, "n_layer": 8, "n_head": 8, "n_kv_head": 4,
                    "n_embd": 512},
}


# ---- YAML and dotted overrides: the one config scheme of every command ------------------------

class _YAMLLoader(yaml.SafeLoader):
    """SafeLoader that also reads `3e-4` and `1E5` as floats (YAML 1.1 wants a dot: `3.0e-4`)."""


_YAMLLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"))


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Load a YAML/JSON mapping, with a clear error naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
        data = json.loads(text) if path.suffix == ".json" else yaml.load(text, Loader=_YAMLLoader)
    except (yaml.YAMLError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid YAML/JSON: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def parse_value(text: str) -> Any:
    """Parse a CLI override value with YAML rules ("3" -> 3, "3e-4" -> 0.0003, "true" -> True, "[1,2]" -> list)."""
    try:
        return yaml.load(text, Loader=_YAMLLoader)
    except yaml.YAMLError:
        return text


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `section.key=value` overrides (leading dashes allowed) to a nested dict, in place."""
    for item in overrides:
        item = item.lstrip("-")
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        dotted, raw = item.split("=", 1)
        keys = dotted.split(".")
        node = data
        for key in keys[:-1]:
            child = node.setdefault(key, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {dotted!r}: {key!r} is not a section")
            node = child
        node[keys[-1]] = parse_value(raw)
    return data


def dataclass_from_dict(cls: type, data: dict[str, Any], source: str) -> Any:
    """Build dataclass `cls` from a mapping; unknown keys are an error naming `source` and the key."""
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ConfigError(f"{source}: unknown field(s) {unknown}; known: {sorted(known)}")
    return cls(**data)


__all__ = [
    "Config", "ConfigError", "PRESETS", "load_yaml", "apply_overrides", "parse_value", "dataclass_from_dict",
    "field",
]
