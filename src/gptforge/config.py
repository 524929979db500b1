"""Model configuration: one dataclass for every supported family (GPT-2, Llama, Qwen, Gemma, Phi-3, OLMo 2,
mixture-of-experts), named presets, YAML.

This module imports no torch so that CLIs, docs and the server can read configs cheaply.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import math
import re
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, Optional, Sequence

import yaml

PosEmbedding = Literal["learned", "sinusoidal", "rope", "none"]
NormKind = Literal["layernorm", "rmsnorm"]
MLPKind = Literal["gelu", "swiglu", "geglu", "relu2"]
NormPlacement = Literal["pre", "post", "sandwich"]
QKNorm = Literal["head", "full"]
LAYER_TYPES = ("full_attention", "sliding_attention")  # HF's names for global and local attention layers
ROPE_TYPES = ("default", "linear", "llama3", "longrope")


from .errors import ConfigError  # noqa: E402  (re-exported: gptforge.config.ConfigError)


@dataclass
class Config:
    """Architecture of a decoder-only Transformer. Field names follow nanoGPT/litgpt.

    The fields from `norm_placement` on switch on other families' mechanisms; each is off by default
    and a no-op when off (docs/models.md lists which family uses which).
    """

    name: str = "custom"
    # HF architecture this config maps to when saved ("gpt2", "llama", "qwen2", "qwen3", "mistral", "gemma2",
    # "gemma3", "phi3", "olmo2", "mixtral", "qwen3_moe", "olmoe"); see docs/models.md.
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
    rope_scaling: Optional[dict] = None  # HF rope_scaling dict; "linear", "llama3" and "longrope" (Phi-3) are supported
    norm: NormKind = "layernorm"
    norm_eps: float = 1e-5
    mlp: MLPKind = "gelu"  # "swiglu": silu(gate) * up; "geglu": gelu(gate) * up (Gemma); "relu2": relu(x)^2 (Primer)
    gelu_approximate: str = "tanh"  # GPT-2's "gelu_new" and Gemma's "gelu_pytorch_tanh" are the tanh approximation
    bias: bool = True  # biases in every Linear and LayerNorm (GPT-2)
    attn_qkv_bias: Optional[bool] = None  # Qwen2: bias on q/k/v only; None means `bias`
    tie_embeddings: bool = True
    sliding_window: Optional[int] = None  # Mistral-style local attention (each query sees this many keys)
    norm_placement: NormPlacement = "pre"  # "pre": x + f(norm(x)); "post": x + norm(f(x)) (OLMo 2); "sandwich": both (Gemma)
    norm_unit_offset: bool = False  # RMSNorm scales by (1 + weight), weights stored around 0 (Gemma)
    qk_norm: Optional[QKNorm] = None  # RMSNorm on q and k: "head" per head (Qwen3, Gemma 3), "full" across heads (OLMo)
    scale_embeddings: bool = False  # multiply token embeddings by sqrt(n_embd) (Gemma)
    query_pre_attn_scalar: Optional[float] = None  # attention scores scale by its -1/2 power; None: head_dim (Gemma)
    attn_softcap: Optional[float] = None  # attention scores -> cap * tanh(scores / cap) (Gemma 2)
    logit_softcap: Optional[float] = None  # final logits -> cap * tanh(logits / cap) (Gemma 2)
    layer_types: Optional[list[str]] = None  # per layer "full_attention" or "sliding_attention"; None: all use sliding_window
    rope_local_theta: Optional[float] = None  # RoPE base of sliding-window layers, unscaled (Gemma 3); None: rope_theta
    partial_rotary_factor: float = 1.0  # fraction of each head's dims that RoPE rotates (Phi-4-mini: 0.75)
    fused_gate_up: bool = False  # gated MLPs hold one gate|up projection (Phi-3)
    clip_qkv: Optional[float] = None  # clamp q, k and v to [-clip_qkv, clip_qkv] (OLMoE)
    n_expert: int = 0  # mixture of experts: experts per MoE layer; 0 means dense MLPs everywhere
    n_expert_per_token: int = 2  # top-k: experts each token is routed to
    moe_intermediate_size: Optional[int] = None  # hidden width of each expert; None means the dense ffn width
    moe_norm_topk: bool = True  # renormalise the top-k routing weights to sum to 1 (Mixtral; Qwen3-MoE norm_topk_prob)
    moe_dense_layers: Optional[list[int]] = None  # layers that keep a dense MLP in an MoE model (Qwen3-MoE mlp_only_layers)
    router_aux_loss_coef: float = 0.001  # weight of the load-balancing loss the model reports as `aux_loss` when training
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

    @property
    def expert_dim(self) -> int:
        """Hidden width of one expert MLP."""
        return self.moe_intermediate_size or self.ffn_dim

    @property
    def rotary_dim(self) -> int:
        """Dimensions of each head that RoPE rotates (the rest pass through)."""
        return int(self.hdim * self.partial_rotary_factor)

    @property
    def rope_type(self) -> str:
        scaling = self.rope_scaling or {}
        return scaling.get("rope_type", scaling.get("type", "default"))

    def layer_window(self, layer: int) -> Optional[int]:
        """The sliding window of layer `layer`, or None when it attends globally."""
        if self.layer_types is None or self.layer_types[layer] == "sliding_attention":
            return self.sliding_window
        return None

    def layer_uses_local_rope(self, layer: int) -> bool:
        """Whether layer `layer` rotates with `rope_local_theta` (Gemma 3's sliding-window layers)."""
        return self.rope_local_theta is not None and self.layer_window(layer) is not None

    def is_moe_layer(self, layer: int) -> bool:
        """Whether layer `layer` holds a mixture of experts instead of a dense MLP."""
        return self.n_expert > 0 and layer not in (self.moe_dense_layers or ())

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
            "mlp": ("gelu", "swiglu", "geglu", "relu2"),
            "gelu_approximate": ("tanh", "none"),
            "norm_placement": ("pre", "post", "sandwich"),
            "qk_norm": (None, "head", "full"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"config field '{name}' must be one of {allowed}, got {getattr(self, name)!r}")
        for name in ("dropout", "attn_dropout", "embd_dropout"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ConfigError(f"config field '{name}' must be in [0, 1), got {value!r}")
        self._validate_mechanisms()

    def _validate_mechanisms(self) -> None:
        """The family mechanisms: values in range and consistent with each other."""
        for name in ("query_pre_attn_scalar", "attn_softcap", "logit_softcap", "rope_local_theta", "clip_qkv",
                     "sliding_window"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, (int, float)) or value <= 0):
                raise ConfigError(f"config field '{name}' must be a positive number or null, got {value!r}")
        if self.layer_types is not None:
            if len(self.layer_types) != self.n_layer or any(t not in LAYER_TYPES for t in self.layer_types):
                raise ConfigError(f"config field 'layer_types' must list {self.n_layer} entries (one per layer), each "
                                  f"one of {LAYER_TYPES}; got {self.layer_types!r}")
            if "sliding_attention" in self.layer_types and self.sliding_window is None:
                raise ConfigError("config field 'layer_types' names sliding_attention layers but 'sliding_window' "
                                  "is null")
        if not 0.0 < self.partial_rotary_factor <= 1.0:
            raise ConfigError(f"config field 'partial_rotary_factor' must be in (0, 1], got "
                              f"{self.partial_rotary_factor!r}")
        if self.pos_embedding == "rope" and (self.rotary_dim < 2 or self.rotary_dim % 2):
            raise ConfigError(f"config field 'partial_rotary_factor' ({self.partial_rotary_factor}) leaves "
                              f"{self.rotary_dim} rotary dimensions of head_dim {self.hdim}; RoPE needs an even "
                              "number >= 2")
        if self.rope_type not in ROPE_TYPES:
            raise ConfigError(f"config field 'rope_scaling': unsupported rope_type {self.rope_type!r} "
                              f"(supported: {', '.join(ROPE_TYPES[1:])})")
        if self.rope_type == "longrope":
            scaling = self.rope_scaling or {}
            for key in ("short_factor", "long_factor"):
                factors = scaling.get(key)
                if not isinstance(factors, list) or len(factors) != self.rotary_dim // 2:
                    raise ConfigError(f"config field 'rope_scaling.{key}' must list {self.rotary_dim // 2} numbers "
                                      f"(rotary_dim / 2), got {factors!r}")
            if not isinstance(scaling.get("original_max_position_embeddings"), int):
                raise ConfigError("config field 'rope_scaling.original_max_position_embeddings' must be an integer "
                                  "for longrope")
        if self.fused_gate_up and self.mlp == "gelu":
            raise ConfigError("config field 'fused_gate_up' needs a gated MLP (mlp: swiglu or geglu)")
        if not isinstance(self.n_expert, int) or self.n_expert < 0:
            raise ConfigError(f"config field 'n_expert' must be an integer >= 0, got {self.n_expert!r}")
        if self.n_expert and not 1 <= self.n_expert_per_token <= self.n_expert:
            raise ConfigError(f"config field 'n_expert_per_token' must be in [1, n_expert={self.n_expert}], got "
                              f"{self.n_expert_per_token!r}")
        bad = [i for i in (self.moe_dense_layers or ()) if not isinstance(i, int) or not 0 <= i < self.n_layer]
        if bad:
            raise ConfigError(f"config field 'moe_dense_layers' must hold layer indices in [0, {self.n_layer}), got {bad}")

    # ---- sizes for MFU and reports -------------------------------------------------------
    def num_params(self, non_embedding: bool = False, active: bool = False) -> int:
        """Parameter count computed from the config (matches the built model).

        `active=True` counts the experts a token uses (n_expert_per_token of n_expert) instead of all of them.
        """
        d, h, kv, hd = self.n_embd, self.n_head, self.kv_heads, self.hdim
        attn = d * (h + 2 * kv) * hd + h * hd * d
        if self.qkv_bias:
            attn += (h + 2 * kv) * hd
        if self.bias:
            attn += d
        attn += {"head": 2 * hd, "full": (h + kv) * hd, None: 0}[self.qk_norm]
        norm = d * (2 if self.norm == "layernorm" and self.bias else 1)
        norms_per_layer = 4 if self.norm_placement == "sandwich" else 2
        total = norm  # final norm
        for layer in range(self.n_layer):
            if self.is_moe_layer(layer):
                experts = self.n_expert_per_token if active else self.n_expert
                mlp = self.n_expert * d + experts * self._mlp_params(self.expert_dim)  # router + experts
            else:
                mlp = self._mlp_params(self.ffn_dim)
            total += attn + mlp + norms_per_layer * norm
        embed = self.vocab_size * d
        pos = self.block_size * d if self.pos_embedding == "learned" else 0
        head = 0 if self.tie_embeddings else self.vocab_size * d
        if non_embedding:
            return total + head
        return total + embed + pos + head

    def _mlp_params(self, width: int) -> int:
        d = self.n_embd
        gated = self.mlp in ("swiglu", "geglu")
        params = (3 if gated else 2) * d * width
        if self.bias:
            params += width * (2 if gated else 1) + d
        return params

    def flops_per_token(self, seq_len: Optional[int] = None) -> float:
        """Training FLOPs per token (forward + backward), PaLM appendix B: 6N + 12 L h q T (N: active parameters)."""
        t = seq_len or self.block_size
        n = self.num_params(non_embedding=True, active=True) + (
            0 if not self.tie_embeddings else self.vocab_size * self.n_embd)
        return 6 * n + 12 * self.n_layer * self.n_head * self.hdim * t

    # ---- (de)serialisation ---------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: "str | ConfigSource" = "config", prefix: str = "") -> "Config":
        """Build from a mapping; wrong types, unknown names and inconsistent sizes raise ConfigError naming `source`."""
        return dataclass_from_dict(cls, data, source, prefix)

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


@dataclass
class ConfigSource:
    """Where config values came from, for error messages: a file, and the fields the command line set."""

    file: str
    overrides: dict[str, str] = field(default_factory=dict)  # dotted field -> the override as typed

    def of(self, dotted: str) -> str:
        """The origin of field `dotted` ("recipe.yaml", or "command line (--train.lr=fast)")."""
        parts = dotted.replace("[", ".").replace("]", "").split(".")
        for end in range(len(parts), 0, -1):  # a field, or a section the command line replaced whole
            typed = self.overrides.get(".".join(parts[:end]))
            if typed is not None:
                return f"command line ({typed})"
        for key, typed in self.overrides.items():  # a section that only the command line created
            if key.startswith(".".join(parts) + "."):
                return f"command line ({typed})"
        return self.file

    @classmethod
    def of_file(cls, source: "str | ConfigSource") -> "ConfigSource":
        """`source` itself, or a ConfigSource for the file name `source` (no command-line values)."""
        return source if isinstance(source, ConfigSource) else cls(str(source))


def load_yaml(path: str | Path, kind: str = "config file") -> dict[str, Any]:
    """Load a YAML/JSON mapping; a missing file or a syntax error is a ConfigError naming the file (and line)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{kind} not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
        data = json.loads(text) if path.suffix == ".json" else yaml.load(text, Loader=_YAMLLoader)
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start})") from exc
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}, line {exc.lineno}, column {exc.colno}: not valid JSON: {exc.msg}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(_yaml_error_message(path, exc)) from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping (field: value lines) at the top level, "
                          f"got {type(data).__name__}")
    return data


def _yaml_error_message(path: Path, exc: yaml.YAMLError) -> str:
    """'file, line N, column M: not valid YAML: problem (context)' from a PyYAML error."""
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    where = f"{path}, line {mark.line + 1}, column {mark.column + 1}" if mark is not None else str(path)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    context, context_mark = getattr(exc, "context", None), getattr(exc, "context_mark", None)
    if context and context_mark is not None and context_mark is not mark:
        problem += f" ({context} that starts at line {context_mark.line + 1})"
    return f"{where}: not valid YAML: {problem}"


def parse_value(text: str) -> Any:
    """Parse a CLI override value with YAML rules ("3" -> 3, "3e-4" -> 0.0003, "true" -> True, "[1,2]" -> list)."""
    try:
        return yaml.load(text, Loader=_YAMLLoader)
    except yaml.YAMLError:
        return text


def apply_overrides(data: dict[str, Any], overrides: list[str],
                    source: Optional[ConfigSource] = None) -> dict[str, Any]:
    """Apply `section.key=value` overrides (leading dashes allowed) to a nested dict, in place.

    With `source`, each overridden dotted name is recorded in `source.overrides`, so errors about it
    name the command line instead of the file.
    """
    for item in overrides:
        typed = item
        item = item.lstrip("-")
        if "=" not in item:
            raise ConfigError(f"command line: override {typed!r} must look like --section.key=value")
        dotted, raw = item.split("=", 1)
        keys = dotted.split(".")
        node = data
        for depth, key in enumerate(keys[:-1]):
            child = node.setdefault(key, {})
            if not isinstance(child, dict):
                raise ConfigError(f"command line ({typed}): {'.'.join(keys[:depth + 1])} is a value, not a section")
            node = child
        node[keys[-1]] = parse_value(raw)
        if source is not None:
            source.overrides[dotted] = typed
    return data


# ---- type checks from the dataclass annotations ----------------------------------------------------

_NUMBER = re.compile(r"^[-+]?(?:\d[\d_]*\.?\d*|\.\d+)(?:[eE][-+]?\d+)?$")


class _Mismatch(Exception):
    """A value does not fit an annotation (internal: turned into a ConfigError naming the field)."""


@functools.lru_cache(maxsize=None)
def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def describe_type(annotation: Any) -> str:
    """What a user must write for `annotation`, in words: "an integer", "one of 'a', 'b'", "a list of strings"."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        options = [describe_type(a) for a in args if a is not type(None)]
        text = " or ".join(options)
        return f"{text} (or null)" if type(None) in args else text
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if annotation in (list, tuple) or origin in (list, tuple):
        return f"a list of {_plural(args[0])}" if args else "a list"
    if annotation is dict or origin is dict:
        return f"a mapping of {_plural(args[0])} to {_plural(args[1])}" if args else "a mapping"
    if dataclasses.is_dataclass(annotation):
        return "a mapping of field: value"
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}
    return names.get(annotation, getattr(annotation, "__name__", str(annotation)))


def _plural(annotation: Any) -> str:
    words = {int: "integers", float: "numbers", bool: "booleans", str: "strings"}
    return words.get(annotation, describe_type(annotation))


def _convert(value: Any, annotation: Any) -> Any:
    """`value` as `annotation` wants it (ints for float fields, "1e-4" strings as floats), or raise _Mismatch."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is Any or annotation is object:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for option in args:
            if option is not type(None):
                try:
                    return _convert(value, option)
                except _Mismatch:
                    continue
        raise _Mismatch
    if origin is Literal:
        # `True == 1`, so compare types as well: `norm: 1` is not `norm: true`.
        if any(value == a and type(value) is type(a) for a in args):
            return value
        raise _Mismatch
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise _Mismatch
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():  # `max_steps: 1e3`
            return int(value)
        raise _Mismatch
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _NUMBER.match(value.strip()):  # YAML 1.1 reads `1e-4` as a string
            return float(value)
        raise _Mismatch
    if annotation is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):  # `out_dir: 2024`, `name: 7`
            return str(value)
        raise _Mismatch
    if annotation in (list, tuple) or origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise _Mismatch
        return [_convert(v, args[0]) for v in value] if args else list(value)
    if annotation is dict or origin is dict:
        if not isinstance(value, dict):
            raise _Mismatch
        return {_convert(k, args[0]): _convert(v, args[1]) for k, v in value.items()} if args else dict(value)
    if isinstance(annotation, type) and dataclasses.is_dataclass(annotation):
        if isinstance(value, annotation):
            return value
        raise _Mismatch
    return value  # an annotation without a rule here (a class the caller builds): checked by its owner


def check_value(value: Any, annotation: Any, source: "str | ConfigSource", dotted: str) -> Any:
    """`value` converted to `annotation`; a ConfigError naming the origin, field, value and expected type if not."""
    try:
        return _convert(value, annotation)
    except _Mismatch:
        origin = ConfigSource.of_file(source).of(dotted)
        raise ConfigError(f"{origin}: {dotted} must be {describe_type(annotation)}, got {value!r}") from None


def unknown_field_message(source: "str | ConfigSource", prefix: str, name: str, known: Sequence[str]) -> str:
    """'file: unknown field model.n_layers; did you mean n_layer?' (or the list of known names)."""
    dotted = f"{prefix}{name}"
    close = difflib.get_close_matches(str(name), list(known), n=1, cutoff=0.6)
    hint = f"did you mean {close[0]}?" if close else f"known fields: {', '.join(sorted(known))}"
    return f"{ConfigSource.of_file(source).of(dotted)}: unknown field {dotted}; {hint}"


def dataclass_from_dict(cls: type, data: Any, source: "str | ConfigSource", prefix: str = "") -> Any:
    """Build dataclass `cls` from a mapping, every value checked against its annotation.

    `source` names the file (a ConfigSource also knows which fields the command line set) and `prefix`
    the section ("train."), so errors read "recipe.yaml: train.max_steps must be an integer, got 'five'"
    and unknown names get the closest known one: "unknown field model.n_layers; did you mean n_layer?".
    """
    if isinstance(data, cls):
        return data
    section = prefix.rstrip(".")
    if not isinstance(data, dict):
        where = f"section {section}" if section else "the top level"
        origin = ConfigSource.of_file(source).of(section)
        raise ConfigError(f"{origin}: {where} must be a mapping of field: value, got {data!r}")
    hints = _field_types(cls)
    known = [f.name for f in fields(cls) if f.init]
    for name in data:
        if name not in known:
            raise ConfigError(unknown_field_message(source, prefix, name, known))
    values = {name: check_value(value, hints[name], source, f"{prefix}{name}") for name, value in data.items()}
    try:
        return cls(**values)
    except ConfigError as exc:  # a check of the class itself (__post_init__): say which file it concerns
        raise ConfigError(f"{ConfigSource.of_file(source).file}: {section + ': ' if section else ''}{exc}") from None


__all__ = [
    "Config", "ConfigError", "ConfigSource", "PRESETS", "load_yaml", "apply_overrides", "parse_value",
    "dataclass_from_dict", "check_value", "describe_type", "unknown_field_message", "field",
]
