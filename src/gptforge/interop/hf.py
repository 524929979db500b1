"""Hugging Face checkpoint format: the mapping of configs and weight names (no file I/O here).

`gptforge.loading` reads and writes the directories (config.json + safetensors + tokenizer files) and
uses these functions to translate; `transformers` is only the test-time peer.

Supported architectures: GPT2LMHeadModel, LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM,
Qwen3ForCausalLM, Gemma2ForCausalLM, Gemma3ForCausalLM (text), Phi3ForCausalLM (Phi-3, Phi-3.5-mini,
Phi-4-mini), Olmo2ForCausalLM, MixtralForCausalLM, Qwen3MoeForCausalLM and OlmoeForCausalLM; docs/models.md
says what works for each. A config that none of them can express (e.g. sinusoidal positions) is saved with the architecture
"GPTForgeForCausalLM": gptforge loads it, `transformers` does not.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch

from ..config import Config
from ..errors import CheckpointError, ConfigError

SUPPORTED_ARCHITECTURES = {
    "GPT2LMHeadModel": "gpt2",
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "Gemma2ForCausalLM": "gemma2",
    "Gemma3ForCausalLM": "gemma3",
    "Phi3ForCausalLM": "phi3",
    "Olmo2ForCausalLM": "olmo2",
    "MixtralForCausalLM": "mixtral",
    "Qwen3MoeForCausalLM": "qwen3_moe",
    "OlmoeForCausalLM": "olmoe",
}
ARCHITECTURE_OF = {family: arch for arch, family in SUPPORTED_ARCHITECTURES.items()}
MODEL_TYPE_OF = {**{f: f for f in ARCHITECTURE_OF}, "gemma3": "gemma3_text"}
NATIVE_ARCHITECTURE = "GPTForgeForCausalLM"
# Architectures people meet that gptforge does not read, with what to do instead.
UNSUPPORTED_HINTS = {
    "Gemma3ForConditionalGeneration": "this is the multimodal Gemma 3 (4B and up); gptforge reads the text-only "
                                      "Gemma3ForCausalLM checkpoints (gemma-3-1b, gemma-3-270m)",
    "Qwen2MoeForCausalLM": "Qwen1.5/2-MoE has shared experts, which gptforge does not implement; Qwen3-MoE works",
    "PhiMoEForCausalLM": "Phi-3.5-MoE is not supported; Phi-3/Phi-3.5-mini/Phi-4-mini (Phi3ForCausalLM) are",
}

# ---- which family expresses a config ----------------------------------------------------------

ANY = object()  # "set to some value" in a family's requirements
# Mechanism fields and their "off" value. A family either requires a field (a value, or ANY), allows it
# (any value), or needs it off; see `_mismatch`.
_MECHANISMS: dict[str, Any] = {
    "qk_norm": None, "norm_placement": "pre", "norm_unit_offset": False, "scale_embeddings": False,
    "query_pre_attn_scalar": None, "attn_softcap": None, "logit_softcap": None, "layer_types": None,
    "rope_local_theta": None, "partial_rotary_factor": 1.0, "fused_gate_up": False, "clip_qkv": None,
    "n_expert": 0, "sliding_window": None,
}
_GEMMA = {"norm_placement": "sandwich", "norm_unit_offset": True, "scale_embeddings": True}
_GEMMA_FREE = {"query_pre_attn_scalar", "logit_softcap", "layer_types", "sliding_window"}
# family: (required mechanisms, allowed mechanisms, MLP kind, rope scaling types HF reads for it)
_FAMILY_RULES: dict[str, tuple[dict[str, Any], set[str], str, tuple[str, ...]]] = {
    "llama": ({}, set(), "swiglu", ("default", "linear", "llama3")),
    "mistral": ({}, {"sliding_window"}, "swiglu", ("default", "linear", "llama3")),
    "qwen2": ({}, {"sliding_window", "layer_types"}, "swiglu", ("default", "linear", "llama3")),
    "qwen3": ({"qk_norm": "head"}, {"sliding_window", "layer_types"}, "swiglu", ("default", "linear", "llama3")),
    "gemma2": (_GEMMA, _GEMMA_FREE | {"attn_softcap"}, "geglu", ("default", "linear", "llama3")),
    "gemma3": ({**_GEMMA, "qk_norm": "head", "rope_local_theta": ANY}, _GEMMA_FREE, "geglu",
               ("default", "linear", "llama3")),
    "phi3": ({"fused_gate_up": True}, {"partial_rotary_factor", "sliding_window"}, "swiglu", ("default", "longrope")),
    "olmo2": ({"norm_placement": "post", "qk_norm": "full"}, set(), "swiglu", ("default", "linear", "llama3")),
    "mixtral": ({"n_expert": ANY}, {"sliding_window"}, "swiglu", ("default", "linear", "llama3")),
    "qwen3_moe": ({"qk_norm": "head", "n_expert": ANY}, {"sliding_window"}, "swiglu", ("default", "linear", "llama3")),
    "olmoe": ({"qk_norm": "full", "n_expert": ANY}, {"clip_qkv"}, "swiglu", ("default", "linear", "llama3")),
}
_PREFERENCE = ["gpt2", *_FAMILY_RULES]


def _mismatch(c: Config, family: str) -> Optional[str]:
    """Why `family` cannot express config `c` exactly, or None when it can."""
    if family == "gpt2":
        ok = (c.pos_embedding == "learned" and c.norm == "layernorm" and c.mlp == "gelu" and c.bias and c.qkv_bias
              and c.kv_heads == c.n_head and c.head_dim in (None, c.n_embd // c.n_head)
              and all(getattr(c, f) == off for f, off in _MECHANISMS.items()))
        return None if ok else "not GPT-2 shaped"
    required, allowed, mlp, rope_types = _FAMILY_RULES[family]
    if c.pos_embedding != "rope" or c.norm != "rmsnorm" or c.mlp != mlp:
        return f"{family} needs rope + rmsnorm + {mlp}"
    for name, off in _MECHANISMS.items():
        value = getattr(c, name)
        want = required.get(name)
        if want is ANY:
            if value == off:
                return f"{family} needs config field '{name}'"
        elif name in required:
            if value != want:
                return f"{family} needs {name}={want!r}"
        elif name not in allowed and value != off:
            return f"{family} has no {name}"
    if c.rope_type not in rope_types:
        return f"{family} reads no rope_type {c.rope_type!r}"
    bias_ok = {"llama": c.bias == c.qkv_bias, "qwen2": not c.bias and c.qkv_bias}.get(family, not c.bias and not c.qkv_bias)
    if not bias_ok:
        return f"{family} has no such biases"
    if c.n_expert and (c.moe_dense_layers and family != "qwen3_moe" or not c.moe_norm_topk and family == "mixtral"):
        return f"{family} has no dense layers or unnormalised routing"
    return None


def hf_family(config: Config) -> Optional[str]:
    """The HF family that expresses `config` exactly (its own `family` first), or None."""
    candidates = ([config.family] if config.family in _PREFERENCE else []) + _PREFERENCE
    return next((f for f in candidates if _mismatch(config, f) is None), None)


# ---- config mapping -------------------------------------------------------------------------

def _rope_from_params(hf: dict[str, Any], params: Optional[dict[str, Any]], theta_default: float = 10000.0
                      ) -> tuple[float, Optional[dict], float]:
    """(theta, scaling, partial_rotary_factor) from the v4 keys or a v5 `rope_parameters` dict."""
    params = dict(params or {})
    theta = float(params.pop("rope_theta", hf.get("rope_theta", theta_default)))
    partial = float(params.pop("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)))
    scaling = hf.get("rope_scaling") if "rope_scaling" in hf and hf.get("rope_scaling") else params
    scaling = {k: v for k, v in (scaling or {}).items() if k not in ("rope_theta", "partial_rotary_factor")}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind in ("su", "yarn") and hf.get("model_type") == "phi3":  # HF reads both as longrope for Phi-3
        kind = "longrope"
    if kind == "default":
        return theta, None, partial
    scaling = {k: v for k, v in scaling.items() if k != "type"} | {"rope_type": kind}
    if kind == "longrope" and "original_max_position_embeddings" not in scaling:
        scaling["original_max_position_embeddings"] = hf.get("original_max_position_embeddings")
    return theta, scaling, partial


def _first_id(value: Any) -> Optional[int]:
    if isinstance(value, list):
        return value[0] if value else None
    return value


def _family_of(hf: dict[str, Any], source: str) -> str:
    archs = hf.get("architectures") or []
    arch = archs[0] if archs else None
    if arch in UNSUPPORTED_HINTS:
        raise ConfigError(f"{source}: architecture {arch!r} is not supported: {UNSUPPORTED_HINTS[arch]}")
    family = SUPPORTED_ARCHITECTURES.get(arch) if arch else None
    if family is None:
        family = {t: f for f, t in MODEL_TYPE_OF.items()}.get(hf.get("model_type", ""))
    if family is None:
        raise ConfigError(f"{source}: unsupported architecture {arch or hf.get('model_type')!r}; "
                          f"supported: {sorted(SUPPORTED_ARCHITECTURES)}")
    return family


def config_from_hf(hf: dict[str, Any], source: str = "config.json") -> Config:
    """Translate an HF config.json dict into a gptforge Config."""
    if isinstance(hf.get("gptforge"), dict):
        return Config.from_dict(hf["gptforge"], source=source)  # our own, exact
    family = _family_of(hf, source)
    common = dict(vocab_size=hf["vocab_size"], bos_token_id=_first_id(hf.get("bos_token_id")),
                  eos_token_id=_first_id(hf.get("eos_token_id")), pad_token_id=_first_id(hf.get("pad_token_id")))
    if family == "gpt2":
        act = hf.get("activation_function", "gelu_new")
        if act not in ("gelu_new", "gelu_pytorch_tanh", "gelu"):
            raise ConfigError(f"{source}: activation_function {act!r} is not supported (gelu_new, gelu)")
        return Config(name=hf.get("_name_or_path") or "gpt2", family="gpt2", block_size=hf["n_positions"],
                      n_layer=hf["n_layer"], n_head=hf["n_head"], n_embd=hf["n_embd"],
                      intermediate_size=hf.get("n_inner"), pos_embedding="learned", norm="layernorm",
                      norm_eps=hf.get("layer_norm_epsilon", 1e-5), mlp="gelu",
                      gelu_approximate="none" if act == "gelu" else "tanh", bias=True,
                      tie_embeddings=hf.get("tie_word_embeddings", True),
                      dropout=hf.get("resid_pdrop", 0.0), attn_dropout=hf.get("attn_pdrop", 0.0),
                      embd_dropout=hf.get("embd_pdrop", 0.0), **common)
    gemma = family in ("gemma2", "gemma3")
    act = hf.get("hidden_activation") or hf.get("hidden_act") or ("gelu_pytorch_tanh" if gemma else "silu")
    acts = {"gelu_pytorch_tanh": "tanh", "gelu_new": "tanh", "gelu": "none"} if gemma else {"silu": None}
    if act not in acts:
        raise ConfigError(f"{source}: hidden activation {act!r} is not supported for {family} ({sorted(acts)})")
    n_head = hf["num_attention_heads"]
    head_dim = hf.get("head_dim")
    if head_dim == hf["hidden_size"] // n_head:
        head_dim = None
    fields: dict[str, Any] = dict(
        name=hf.get("_name_or_path") or family, family=family, block_size=hf.get("max_position_embeddings", 2048),
        n_layer=hf["num_hidden_layers"], n_head=n_head, n_kv_head=hf.get("num_key_value_heads") or n_head,
        head_dim=head_dim, n_embd=hf["hidden_size"], intermediate_size=hf["intermediate_size"], pos_embedding="rope",
        norm="rmsnorm", norm_eps=hf.get("rms_norm_eps", 1e-6 if gemma or family.startswith("qwen3") else 1e-5),
        mlp="geglu" if gemma else "swiglu", gelu_approximate=acts[act] or "tanh",
        tie_embeddings=hf.get("tie_word_embeddings", gemma), attn_dropout=hf.get("attention_dropout") or 0.0,
        **common)
    fields.update(_bias_fields(hf, family, source))
    fields.update(_FAMILY_READERS.get(family, _read_rope_and_window)(hf, source))
    return Config(**fields)


def _bias_fields(hf: dict[str, Any], family: str, source: str) -> dict[str, Any]:
    attention_bias, mlp_bias = bool(hf.get("attention_bias", False)), bool(hf.get("mlp_bias", False))
    if family == "qwen2":
        return dict(bias=False, attn_qkv_bias=True)
    if family == "llama":
        if attention_bias != mlp_bias:
            raise ConfigError(f"{source}: attention_bias={attention_bias} with mlp_bias={mlp_bias} is not supported")
        return dict(bias=attention_bias)
    if attention_bias:
        raise ConfigError(f"{source}: attention_bias=true is not supported for {family}")
    return dict(bias=False)


def _read_rope_and_window(hf: dict[str, Any], source: str) -> dict[str, Any]:
    """Llama, Mistral, Mixtral: RoPE and one sliding window for every layer."""
    theta, scaling, partial = _rope_from_params(hf, hf.get("rope_parameters"))
    if partial != 1.0:
        raise ConfigError(f"{source}: partial_rotary_factor {partial} is only supported for phi3")
    return dict(rope_theta=theta, rope_scaling=scaling, sliding_window=hf.get("sliding_window"))


def _read_qwen(hf: dict[str, Any], source: str) -> dict[str, Any]:
    """Qwen2/3: windows only with use_sliding_window, and then on the layers `layer_types` (or max_window_layers)
    marks as sliding; Qwen3 adds QK-norm."""
    out = _read_rope_and_window(hf, source)
    out["sliding_window"] = None
    if hf.get("use_sliding_window") and hf.get("sliding_window"):
        n, first = hf["num_hidden_layers"], hf.get("max_window_layers", hf["num_hidden_layers"])
        types = hf.get("layer_types") or ["sliding_attention" if i >= first else "full_attention" for i in range(n)]
        if "sliding_attention" in types:
            out.update(sliding_window=hf["sliding_window"], layer_types=list(types))
    if hf.get("model_type", "qwen3") != "qwen2":
        out["qk_norm"] = "head"
    return out


def _read_gemma(hf: dict[str, Any], source: str) -> dict[str, Any]:
    """Gemma 2/3: sandwich norms, (1 + w) RMSNorm, scaled embeddings, soft-capping, alternating local/global layers,
    and (Gemma 3) QK-norm with a separate RoPE base for the local layers."""
    gemma3 = hf.get("model_type") != "gemma2"
    if hf.get("use_bidirectional_attention"):
        raise ConfigError(f"{source}: use_bidirectional_attention=true (an encoder) is not supported")
    n = hf["num_hidden_layers"]
    pattern = hf.get("sliding_window_pattern") or hf.get("_sliding_window_pattern") or (6 if gemma3 else 2)
    types = hf.get("layer_types") or ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n)]
    params = hf.get("rope_parameters") or {}
    if gemma3 and "full_attention" in params:  # v5: one RoPE dict per layer type
        theta, scaling, _ = _rope_from_params({}, params["full_attention"], 1_000_000.0)
        local_theta, local_scaling, _ = _rope_from_params({}, params.get("sliding_attention"), 10_000.0)
        if local_scaling is not None:
            raise ConfigError(f"{source}: rope_parameters.sliding_attention: scaled local RoPE is not supported")
    else:
        theta, scaling, _ = _rope_from_params(hf, params, 1_000_000.0 if gemma3 else 10_000.0)
        local_theta = float(hf.get("rope_local_base_freq", 10_000.0))
    window = hf.get("sliding_window")
    if window is None:
        types = ["full_attention"] * n
    out = dict(norm_placement="sandwich", norm_unit_offset=True, scale_embeddings=True,
               query_pre_attn_scalar=hf.get("query_pre_attn_scalar") or 256,
               logit_softcap=hf.get("final_logit_softcapping"), layer_types=list(types), sliding_window=window,
               rope_theta=theta, rope_scaling=scaling)
    if gemma3:  # Gemma 3's attention ignores attn_logit_softcapping (as HF does)
        out.update(qk_norm="head", rope_local_theta=local_theta)
    else:
        out["attn_softcap"] = hf.get("attn_logit_softcapping")
    return out


def _read_phi3(hf: dict[str, Any], source: str) -> dict[str, Any]:
    """Phi-3/3.5/4-mini: fused gate|up, partial rotary, LongRoPE, one sliding window for every layer."""
    theta, scaling, partial = _rope_from_params(hf, hf.get("rope_parameters"))
    return dict(rope_theta=theta, rope_scaling=scaling, partial_rotary_factor=partial, fused_gate_up=True,
                sliding_window=hf.get("sliding_window"), dropout=hf.get("resid_pdrop") or 0.0,
                embd_dropout=hf.get("embd_pdrop") or 0.0)


def _read_olmo2(hf: dict[str, Any], source: str) -> dict[str, Any]:
    out = _read_rope_and_window(hf, source)
    out.update(norm_placement="post", qk_norm="full", sliding_window=None)
    return out


def _read_moe(hf: dict[str, Any], source: str) -> dict[str, Any]:
    """Mixtral, Qwen3-MoE, OLMoE: experts, top-k and each family's routing and dense-layer settings."""
    family = hf.get("model_type")
    out = _read_rope_and_window(hf, source)
    n_expert = hf.get("num_local_experts") if family == "mixtral" else hf.get("num_experts", hf.get("num_local_experts"))
    out.update(n_expert=int(n_expert), n_expert_per_token=int(hf.get("num_experts_per_tok", 2)),
               router_aux_loss_coef=float(hf.get("router_aux_loss_coef", 0.001)),
               moe_norm_topk=True if family == "mixtral" else bool(hf.get("norm_topk_prob", False)))
    if family == "qwen3_moe":
        # One window for every layer (not per layer type) when use_sliding_window is on; decoder_sparse_step and
        # mlp_only_layers name the layers that keep a dense MLP.
        step = int(hf.get("decoder_sparse_step", 1))
        dense = set(hf.get("mlp_only_layers") or []) | {i for i in range(hf["num_hidden_layers"]) if (i + 1) % step}
        out.update(qk_norm="head", sliding_window=hf.get("sliding_window") if hf.get("use_sliding_window") else None,
                   moe_intermediate_size=hf.get("moe_intermediate_size"), moe_dense_layers=sorted(dense) or None)
    elif family == "olmoe":
        out.update(qk_norm="full", clip_qkv=hf.get("clip_qkv"), sliding_window=None)
    return out


_FAMILY_READERS: dict[str, Callable[[dict[str, Any], str], dict[str, Any]]] = {
    "qwen2": _read_qwen, "qwen3": _read_qwen, "gemma2": _read_gemma, "gemma3": _read_gemma, "phi3": _read_phi3,
    "olmo2": _read_olmo2, "mixtral": _read_moe, "qwen3_moe": _read_moe, "olmoe": _read_moe,
}


def config_to_hf(config: Config) -> dict[str, Any]:
    """An HF config.json dict; always carries the exact gptforge config under the key "gptforge"."""
    family = hf_family(config)
    c = config
    out: dict[str, Any]
    tokens = {"bos_token_id": c.bos_token_id, "eos_token_id": c.eos_token_id, "pad_token_id": c.pad_token_id}
    if family == "gpt2":
        out = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": c.vocab_size,
               "n_positions": c.block_size, "n_ctx": c.block_size, "n_embd": c.n_embd, "n_layer": c.n_layer,
               "n_head": c.n_head, "n_inner": c.intermediate_size,
               "activation_function": "gelu_new" if c.gelu_approximate == "tanh" else "gelu",
               "layer_norm_epsilon": c.norm_eps, "resid_pdrop": c.dropout, "embd_pdrop": c.embd_dropout,
               "attn_pdrop": c.attn_dropout, "tie_word_embeddings": c.tie_embeddings,
               "scale_attn_weights": True, "use_cache": True}
    elif family is not None:
        out = {"architectures": [ARCHITECTURE_OF[family]], "model_type": MODEL_TYPE_OF[family],
               "vocab_size": c.vocab_size, "hidden_size": c.n_embd, "intermediate_size": c.ffn_dim,
               "num_hidden_layers": c.n_layer, "num_attention_heads": c.n_head, "num_key_value_heads": c.kv_heads,
               "head_dim": c.hdim, "hidden_act": "silu", "max_position_embeddings": c.block_size,
               "rms_norm_eps": c.norm_eps, "rope_theta": c.rope_theta, "rope_scaling": c.rope_scaling,
               "tie_word_embeddings": c.tie_embeddings, "attention_dropout": c.attn_dropout, "use_cache": True}
        _FAMILY_WRITERS.get(family, lambda c, out: None)(c, out)
    else:
        out = {"architectures": [NATIVE_ARCHITECTURE], "model_type": "gptforge", "vocab_size": c.vocab_size}
    out.update(tokens)
    out["torch_dtype"] = "float32"
    out["gptforge"] = c.to_dict()
    return out


def _write_llama(c: Config, out: dict[str, Any]) -> None:
    out.update(attention_bias=c.bias, mlp_bias=c.bias)


def _write_qwen(c: Config, out: dict[str, Any]) -> None:
    if c.sliding_window is None:
        out.update(use_sliding_window=False, sliding_window=None, max_window_layers=c.n_layer)
    else:
        types = c.layer_types or ["sliding_attention"] * c.n_layer
        first = types.index("sliding_attention") if "sliding_attention" in types else c.n_layer
        out.update(use_sliding_window=True, sliding_window=c.sliding_window, layer_types=types, max_window_layers=first)
    if c.qk_norm is not None:
        out["attention_bias"] = False


def _write_gemma(c: Config, out: dict[str, Any]) -> None:
    gemma3 = c.qk_norm is not None
    types = c.layer_types or ["sliding_attention" if c.sliding_window else "full_attention"] * c.n_layer
    out.update(hidden_activation="gelu_pytorch_tanh" if c.gelu_approximate == "tanh" else "gelu",
               query_pre_attn_scalar=_int_if_whole(c.query_pre_attn_scalar or c.hdim),
               final_logit_softcapping=c.logit_softcap,
               attn_logit_softcapping=None if gemma3 else c.attn_softcap, layer_types=types,
               sliding_window=c.sliding_window or c.block_size, attention_bias=False)
    out.pop("hidden_act")
    if gemma3:  # one RoPE dict per layer type, as transformers 5 writes them
        full = {"rope_type": "default", **(c.rope_scaling or {}), "rope_theta": c.rope_theta}
        out["rope_parameters"] = {"full_attention": full,
                                  "sliding_attention": {"rope_type": "default", "rope_theta": c.rope_local_theta}}
        out.update(rope_scaling=None, rope_local_base_freq=c.rope_local_theta)
        del out["rope_theta"], out["rope_scaling"]


def _int_if_whole(value: float) -> float | int:
    """HF's strict config classes type some fields as int (e.g. Gemma's query_pre_attn_scalar)."""
    return int(value) if float(value).is_integer() else value


def _write_phi3(c: Config, out: dict[str, Any]) -> None:
    rope = {"rope_type": "default", **(c.rope_scaling or {}), "rope_theta": c.rope_theta,
            "partial_rotary_factor": c.partial_rotary_factor}
    out.update(rope_parameters=rope, partial_rotary_factor=c.partial_rotary_factor, sliding_window=c.sliding_window,
               resid_pdrop=c.dropout, embd_pdrop=c.embd_dropout,
               original_max_position_embeddings=(c.rope_scaling or {}).get("original_max_position_embeddings",
                                                                            c.block_size))
    del out["rope_theta"], out["rope_scaling"]


def _write_moe(c: Config, out: dict[str, Any]) -> None:
    out.update(num_experts_per_tok=c.n_expert_per_token, router_aux_loss_coef=c.router_aux_loss_coef,
               output_router_logits=False, intermediate_size=c.expert_dim)


def _write_mixtral(c: Config, out: dict[str, Any]) -> None:
    _write_moe(c, out)
    out.update(num_local_experts=c.n_expert, sliding_window=c.sliding_window, router_jitter_noise=0.0)


def _write_qwen3_moe(c: Config, out: dict[str, Any]) -> None:
    _write_moe(c, out)
    out.update(num_experts=c.n_expert, norm_topk_prob=c.moe_norm_topk, attention_bias=False,
               intermediate_size=c.ffn_dim, moe_intermediate_size=c.expert_dim, decoder_sparse_step=1,
               mlp_only_layers=c.moe_dense_layers or [], use_sliding_window=c.sliding_window is not None,
               sliding_window=c.sliding_window)


def _write_olmoe(c: Config, out: dict[str, Any]) -> None:
    _write_moe(c, out)
    out.update(num_experts=c.n_expert, norm_topk_prob=c.moe_norm_topk, attention_bias=False, clip_qkv=c.clip_qkv)


_FAMILY_WRITERS: dict[str, Callable[[Config, dict[str, Any]], None]] = {
    "llama": _write_llama, "mistral": lambda c, out: out.update(sliding_window=c.sliding_window),
    "qwen2": _write_qwen, "qwen3": _write_qwen, "gemma2": _write_gemma, "gemma3": _write_gemma, "phi3": _write_phi3,
    "olmo2": lambda c, out: out.update(attention_bias=False), "mixtral": _write_mixtral,
    "qwen3_moe": _write_qwen3_moe, "olmoe": _write_olmoe,
}


# ---- weight name mapping --------------------------------------------------------------------

_GPT2_PAIRS = [("norm1.weight", "ln_1.weight"), ("norm1.bias", "ln_1.bias"), ("norm2.weight", "ln_2.weight"),
               ("norm2.bias", "ln_2.bias"), ("attn.qkv.bias", "attn.c_attn.bias"), ("attn.out.bias", "attn.c_proj.bias"),
               ("mlp.up.bias", "mlp.c_fc.bias"), ("mlp.down.bias", "mlp.c_proj.bias")]
_GPT2_CONV1D = [("attn.qkv", "attn.c_attn"), ("attn.out", "attn.c_proj"), ("mlp.up", "mlp.c_fc"), ("mlp.down", "mlp.c_proj")]
# Our norm modules -> HF's, by placement. Llama's "post_attention_layernorm" is the norm *before* the MLP.
_NORM_NAMES = {
    "pre": {"norm1": "input_layernorm", "norm2": "post_attention_layernorm"},
    "sandwich": {"norm1": "input_layernorm", "post_attn_norm": "post_attention_layernorm",
                 "norm2": "pre_feedforward_layernorm", "post_mlp_norm": "post_feedforward_layernorm"},
    "post": {"post_attn_norm": "post_attention_layernorm", "post_mlp_norm": "post_feedforward_layernorm"},
}
_MLP_NAMES = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj", "gate_up": "gate_up_proj"}
_MIXTRAL_EXPERT = {"gate": "w1", "up": "w3", "down": "w2"}


def _layer_modules(config: Config, family: str, layer: int) -> list[tuple[str, str]]:
    """(our module, HF module) inside block `layer`, for tensors that map 1:1 (q/k/v split aside)."""
    pairs = list(_NORM_NAMES[config.norm_placement].items())
    pairs += [("attn.out", "self_attn.o_proj"), ("attn.q_norm", "self_attn.q_norm"), ("attn.k_norm", "self_attn.k_norm")]
    if family == "phi3":
        pairs.append(("attn.qkv", "self_attn.qkv_proj"))  # Phi-3 stores q|k|v fused, in our row order
    if not config.is_moe_layer(layer):
        return pairs + [(f"mlp.{ours}", f"mlp.{theirs}") for ours, theirs in _MLP_NAMES.items()]
    moe = "block_sparse_moe" if family == "mixtral" else "mlp"
    pairs.append(("mlp.router", f"{moe}.gate"))
    for e in range(config.n_expert):
        for ours, theirs in (_MIXTRAL_EXPERT if family == "mixtral" else _MLP_NAMES).items():
            pairs.append((f"mlp.experts.{e}.{ours}", f"{moe}.experts.{e}.{theirs}"))
    return pairs


def _qkv_sizes(config: Config) -> list[int]:
    return [config.n_head * config.hdim, config.kv_heads * config.hdim, config.kv_heads * config.hdim]


def state_from_hf(hf_state: dict[str, torch.Tensor], config: Config, family: str) -> dict[str, torch.Tensor]:
    """Rename/reshape HF tensors into gptforge's state dict."""
    out: dict[str, torch.Tensor] = {}
    if family == "gpt2":
        prefix = "transformer." if any(k.startswith("transformer.") for k in hf_state) else ""
        for ours, theirs in [("wte.weight", "wte.weight"), ("wpe.weight", "wpe.weight"),
                             ("norm_f.weight", "ln_f.weight"), ("norm_f.bias", "ln_f.bias")]:
            out[ours] = hf_state[prefix + theirs]
        for i in range(config.n_layer):
            h = f"{prefix}h.{i}."
            for ours, theirs in _GPT2_PAIRS:
                out[f"blocks.{i}.{ours}"] = hf_state[h + theirs]
            # GPT-2 uses Conv1D: weights are stored (in, out); nn.Linear wants (out, in).
            for ours, theirs in _GPT2_CONV1D:
                out[f"blocks.{i}.{ours}.weight"] = hf_state[h + theirs + ".weight"].t().contiguous()
    else:
        out["wte.weight"] = hf_state["model.embed_tokens.weight"]
        out["norm_f.weight"] = hf_state["model.norm.weight"]
        for i in range(config.n_layer):
            h = f"model.layers.{i}."
            for ours, theirs in _layer_modules(config, family, i):
                for suffix in (".weight", ".bias"):
                    if h + theirs + suffix in hf_state:
                        out[f"blocks.{i}.{ours}{suffix}"] = hf_state[h + theirs + suffix]
            if family != "phi3":  # separate q/k/v projections -> our fused qkv (rows q | k | v)
                for suffix in ("weight", "bias"):
                    if h + f"self_attn.q_proj.{suffix}" in hf_state:
                        out[f"blocks.{i}.attn.qkv.{suffix}"] = torch.cat(
                            [hf_state[h + f"self_attn.{p}_proj.{suffix}"] for p in "qkv"], dim=0)
    if not config.tie_embeddings:
        head = hf_state.get("lm_head.weight")
        if head is None:
            raise CheckpointError("lm_head.weight is missing but tie_word_embeddings is false")
        out["lm_head.weight"] = head
    return out


def state_to_hf(state: dict[str, torch.Tensor], config: Config, family: str) -> dict[str, torch.Tensor]:
    """gptforge state dict -> HF names and layouts (inverse of `state_from_hf`); every tensor gets a name."""
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()

    def put(hf_name: str, ours: str, tensor: Optional[torch.Tensor] = None) -> None:
        out[hf_name] = state[ours] if tensor is None else tensor
        used.add(ours)

    if family == "gpt2":
        for ours, theirs in [("wte.weight", "wte.weight"), ("wpe.weight", "wpe.weight"),
                             ("norm_f.weight", "ln_f.weight"), ("norm_f.bias", "ln_f.bias")]:
            put("transformer." + theirs, ours)
        for i in range(config.n_layer):
            h = f"transformer.h.{i}."
            for ours, theirs in _GPT2_PAIRS:
                put(h + theirs, f"blocks.{i}.{ours}")
            for ours, theirs in _GPT2_CONV1D:
                put(h + theirs + ".weight", f"blocks.{i}.{ours}.weight", state[f"blocks.{i}.{ours}.weight"].t().contiguous())
    else:
        put("model.embed_tokens.weight", "wte.weight")
        put("model.norm.weight", "norm_f.weight")
        for i in range(config.n_layer):
            h, b = f"model.layers.{i}.", f"blocks.{i}."
            for ours, theirs in _layer_modules(config, family, i):
                for suffix in (".weight", ".bias"):
                    if b + ours + suffix in state:
                        put(h + theirs + suffix, b + ours + suffix)
            for suffix in ("weight", "bias"):
                fused = state.get(f"{b}attn.qkv.{suffix}")
                if fused is not None and family != "phi3":
                    for p, part in zip("qkv", fused.split(_qkv_sizes(config), dim=0)):
                        put(h + f"self_attn.{p}_proj.{suffix}", f"{b}attn.qkv.{suffix}", part.contiguous())
    if not config.tie_embeddings:
        put("lm_head.weight", "lm_head.weight")
    unmapped = sorted(set(state) - used - {"lm_head.weight"})
    if unmapped:
        raise CheckpointError(f"{family} has no Hugging Face name for tensor(s) {unmapped[:4]}; the model holds "
                              "modules the architecture does not (save it without LoRA adapters, or merge them)")
    return out


__all__ = ["config_from_hf", "config_to_hf", "state_from_hf", "state_to_hf", "hf_family", "SUPPORTED_ARCHITECTURES",
           "ARCHITECTURE_OF", "NATIVE_ARCHITECTURE"]
