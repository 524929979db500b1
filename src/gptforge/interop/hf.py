"""Hugging Face checkpoint format: the mapping of configs and weight names (no file I/O here).

`gptforge.loading` reads and writes the directories (config.json + safetensors + tokenizer files) and
uses these functions to translate; `transformers` is only the test-time peer.

Supported architectures: GPT2LMHeadModel, LlamaForCausalLM, Qwen2ForCausalLM, MistralForCausalLM.
A config that none of them can express (e.g. sinusoidal positions) is saved with the architecture
"GPTForgeForCausalLM": gptforge loads it, `transformers` does not.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from ..config import Config
from ..errors import CheckpointError, ConfigError

SUPPORTED_ARCHITECTURES = {
    "GPT2LMHeadModel": "gpt2",
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "MistralForCausalLM": "mistral",
}
NATIVE_ARCHITECTURE = "GPTForgeForCausalLM"


# ---- config mapping -------------------------------------------------------------------------

def _rope_from_hf(hf: dict[str, Any]) -> tuple[float, Optional[dict]]:
    """rope_theta and scaling from either the v4 keys or the v5 `rope_parameters` dict."""
    params = hf.get("rope_parameters") or {}
    theta = float(hf.get("rope_theta", params.get("rope_theta", 10000.0)))
    scaling = hf.get("rope_scaling")
    if scaling is None and params.get("rope_type", "default") != "default":
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    if scaling is not None and scaling.get("rope_type", scaling.get("type", "default")) == "default":
        scaling = None
    return theta, scaling


def config_from_hf(hf: dict[str, Any], source: str = "config.json") -> Config:
    """Translate an HF config.json dict into a gptforge Config."""
    if isinstance(hf.get("gptforge"), dict):
        return Config.from_dict(hf["gptforge"], source=source)  # our own, exact
    archs = hf.get("architectures") or []
    arch = archs[0] if archs else None
    family = SUPPORTED_ARCHITECTURES.get(arch) if arch else None
    if family is None:
        family = {"gpt2": "gpt2", "llama": "llama", "qwen2": "qwen2", "mistral": "mistral"}.get(hf.get("model_type", ""))
    if family is None:
        raise ConfigError(f"{source}: unsupported architecture {arch or hf.get('model_type')!r}; "
                          f"supported: {sorted(SUPPORTED_ARCHITECTURES)}")
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
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise ConfigError(f"{source}: hidden_act {act!r} is not supported (silu)")
    theta, scaling = _rope_from_hf(hf)
    attention_bias, mlp_bias = bool(hf.get("attention_bias", False)), bool(hf.get("mlp_bias", False))
    if family == "qwen2":
        bias, qkv_bias = False, True
    elif attention_bias != mlp_bias:
        raise ConfigError(f"{source}: attention_bias={attention_bias} with mlp_bias={mlp_bias} is not supported")
    else:
        bias, qkv_bias = attention_bias, None
    window = hf.get("sliding_window")
    if family == "qwen2" and not hf.get("use_sliding_window", False):
        window = None
    n_head = hf["num_attention_heads"]
    head_dim = hf.get("head_dim")
    if head_dim == hf["hidden_size"] // n_head:
        head_dim = None
    return Config(name=hf.get("_name_or_path") or family, family=family,
                  block_size=hf.get("max_position_embeddings", 2048), n_layer=hf["num_hidden_layers"],
                  n_head=n_head, n_kv_head=hf.get("num_key_value_heads") or n_head, head_dim=head_dim,
                  n_embd=hf["hidden_size"], intermediate_size=hf["intermediate_size"], pos_embedding="rope",
                  rope_theta=theta, rope_scaling=scaling, norm="rmsnorm", norm_eps=hf.get("rms_norm_eps", 1e-6),
                  mlp="swiglu", bias=bias, attn_qkv_bias=qkv_bias,
                  tie_embeddings=hf.get("tie_word_embeddings", False), sliding_window=window,
                  attn_dropout=hf.get("attention_dropout", 0.0), **common)


def _first_id(value: Any) -> Optional[int]:
    if isinstance(value, list):
        return value[0] if value else None
    return value


def hf_family(config: Config) -> Optional[str]:
    """The HF family that expresses `config` exactly, or None."""
    c = config
    if (c.pos_embedding == "learned" and c.norm == "layernorm" and c.mlp == "gelu" and c.bias and c.qkv_bias
            and c.kv_heads == c.n_head and c.head_dim in (None, c.n_embd // c.n_head) and c.sliding_window is None):
        return "gpt2"
    if c.pos_embedding == "rope" and c.norm == "rmsnorm" and c.mlp == "swiglu":
        if not c.bias and c.qkv_bias:
            return "qwen2"
        if c.bias == c.qkv_bias:
            if c.sliding_window is not None:
                return "mistral" if not c.bias else None
            return c.family if c.family in ("llama", "mistral") else "llama"
    return None


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
    elif family in ("llama", "qwen2", "mistral"):
        arch = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM"}[family]
        out = {"architectures": [arch], "model_type": family, "vocab_size": c.vocab_size,
               "hidden_size": c.n_embd, "intermediate_size": c.ffn_dim, "num_hidden_layers": c.n_layer,
               "num_attention_heads": c.n_head, "num_key_value_heads": c.kv_heads, "head_dim": c.hdim,
               "hidden_act": "silu", "max_position_embeddings": c.block_size, "rms_norm_eps": c.norm_eps,
               "rope_theta": c.rope_theta, "rope_scaling": c.rope_scaling,
               "tie_word_embeddings": c.tie_embeddings, "attention_dropout": c.attn_dropout, "use_cache": True}
        if family == "llama":
            out.update(attention_bias=c.bias, mlp_bias=c.bias)
        if family == "mistral":
            out["sliding_window"] = c.sliding_window
        if family == "qwen2":
            out.update(use_sliding_window=False, sliding_window=None, max_window_layers=c.n_layer)
    else:
        out = {"architectures": [NATIVE_ARCHITECTURE], "model_type": "gptforge", "vocab_size": c.vocab_size}
    out.update(tokens)
    out["torch_dtype"] = "float32"
    out["gptforge"] = c.to_dict()
    return out


# ---- weight name mapping --------------------------------------------------------------------

def _layer_maps(family: str) -> list[tuple[str, str]]:
    """(our suffix, HF suffix) per block, for direct 1:1 tensors."""
    if family == "gpt2":
        return [("norm1.weight", "ln_1.weight"), ("norm1.bias", "ln_1.bias"),
                ("norm2.weight", "ln_2.weight"), ("norm2.bias", "ln_2.bias"),
                ("attn.qkv.bias", "attn.c_attn.bias"), ("attn.out.bias", "attn.c_proj.bias"),
                ("mlp.up.bias", "mlp.c_fc.bias"), ("mlp.down.bias", "mlp.c_proj.bias")]
    pairs = [("norm1.weight", "input_layernorm.weight"), ("norm2.weight", "post_attention_layernorm.weight"),
             ("attn.out.weight", "self_attn.o_proj.weight"), ("mlp.gate.weight", "mlp.gate_proj.weight"),
             ("mlp.up.weight", "mlp.up_proj.weight"), ("mlp.down.weight", "mlp.down_proj.weight")]
    pairs += [("attn.out.bias", "self_attn.o_proj.bias"), ("mlp.gate.bias", "mlp.gate_proj.bias"),
              ("mlp.up.bias", "mlp.up_proj.bias"), ("mlp.down.bias", "mlp.down_proj.bias")]
    return pairs


def state_from_hf(hf_state: dict[str, torch.Tensor], config: Config, family: str) -> dict[str, torch.Tensor]:
    """Rename/reshape HF tensors into gptforge's state dict."""
    out: dict[str, torch.Tensor] = {}
    get = hf_state.get
    if family == "gpt2":
        prefix = "transformer." if any(k.startswith("transformer.") for k in hf_state) else ""
        out["wte.weight"] = hf_state[f"{prefix}wte.weight"]
        out["wpe.weight"] = hf_state[f"{prefix}wpe.weight"]
        out["norm_f.weight"] = hf_state[f"{prefix}ln_f.weight"]
        out["norm_f.bias"] = hf_state[f"{prefix}ln_f.bias"]
        for i in range(config.n_layer):
            h = f"{prefix}h.{i}."
            for ours, theirs in _layer_maps("gpt2"):
                out[f"blocks.{i}.{ours}"] = hf_state[h + theirs]
            # GPT-2 uses Conv1D: weights are stored (in, out); nn.Linear wants (out, in).
            for ours, theirs in [("attn.qkv", "attn.c_attn"), ("attn.out", "attn.c_proj"),
                                 ("mlp.up", "mlp.c_fc"), ("mlp.down", "mlp.c_proj")]:
                out[f"blocks.{i}.{ours}.weight"] = hf_state[h + theirs + ".weight"].t().contiguous()
        head = get("lm_head.weight")
    else:
        out["wte.weight"] = hf_state["model.embed_tokens.weight"]
        out["norm_f.weight"] = hf_state["model.norm.weight"]
        for i in range(config.n_layer):
            h = f"model.layers.{i}."
            for ours, theirs in _layer_maps(family):
                if h + theirs in hf_state:
                    out[f"blocks.{i}.{ours}"] = hf_state[h + theirs]
            out[f"blocks.{i}.attn.qkv.weight"] = torch.cat(
                [hf_state[h + f"self_attn.{p}_proj.weight"] for p in "qkv"], dim=0)
            if h + "self_attn.q_proj.bias" in hf_state:
                out[f"blocks.{i}.attn.qkv.bias"] = torch.cat(
                    [hf_state[h + f"self_attn.{p}_proj.bias"] for p in "qkv"], dim=0)
        head = get("lm_head.weight")
    if not config.tie_embeddings:
        if head is None:
            raise CheckpointError("lm_head.weight is missing but tie_word_embeddings is false")
        out["lm_head.weight"] = head
    return out


def state_to_hf(state: dict[str, torch.Tensor], config: Config, family: str) -> dict[str, torch.Tensor]:
    """gptforge state dict -> HF names and layouts (inverse of `state_from_hf`)."""
    out: dict[str, torch.Tensor] = {}
    if family == "gpt2":
        out["transformer.wte.weight"] = state["wte.weight"]
        out["transformer.wpe.weight"] = state["wpe.weight"]
        out["transformer.ln_f.weight"] = state["norm_f.weight"]
        out["transformer.ln_f.bias"] = state["norm_f.bias"]
        for i in range(config.n_layer):
            h = f"transformer.h.{i}."
            for ours, theirs in _layer_maps("gpt2"):
                out[h + theirs] = state[f"blocks.{i}.{ours}"]
            for ours, theirs in [("attn.qkv", "attn.c_attn"), ("attn.out", "attn.c_proj"),
                                 ("mlp.up", "mlp.c_fc"), ("mlp.down", "mlp.c_proj")]:
                out[h + theirs + ".weight"] = state[f"blocks.{i}.{ours}.weight"].t().contiguous()
    else:
        out["model.embed_tokens.weight"] = state["wte.weight"]
        out["model.norm.weight"] = state["norm_f.weight"]
        q_size = config.n_head * config.hdim
        kv_size = config.kv_heads * config.hdim
        for i in range(config.n_layer):
            h = f"model.layers.{i}."
            for ours, theirs in _layer_maps(family):
                if f"blocks.{i}.{ours}" in state:
                    out[h + theirs] = state[f"blocks.{i}.{ours}"]
            for suffix in ("weight", "bias"):
                fused = state.get(f"blocks.{i}.attn.qkv.{suffix}")
                if fused is not None:
                    for p, part in zip("qkv", fused.split([q_size, kv_size, kv_size], dim=0)):
                        out[h + f"self_attn.{p}_proj.{suffix}"] = part.contiguous()
    if not config.tie_embeddings:
        out["lm_head.weight"] = state["lm_head.weight"]
    return out


__all__ = ["config_from_hf", "config_to_hf", "state_from_hf", "state_to_hf", "hf_family", "SUPPORTED_ARCHITECTURES",
           "NATIVE_ARCHITECTURE"]
