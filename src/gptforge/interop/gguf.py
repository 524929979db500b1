"""GGUF export (llama.cpp's format), written with the `gguf` package.

Architectures: gpt2, llama (Llama, Mistral without a window, Qwen2-style biases, Mixtral's experts), qwen3,
qwen3moe, gemma2, gemma3, phi3, olmo2, olmoe. A config llama.cpp would run differently (e.g. a Gemma
query_pre_attn_scalar other than head_dim, Qwen3 sliding windows, OLMoE's clip_qkv) is refused with a
ValueError naming the field; docs/models.md has the table.

Layouts follow llama.cpp's own converter (convert_hf_to_gguf.py):
- GPT-2: fused `attn_qkv`, LayerNorm weights and biases, learned `position_embd`; Linear weights (out, in).
- Llama (also Qwen2-style q/k/v biases and Mistral without a sliding window): q/k/v split, and the rows of
  Q and K permuted from HF's rotate-half RoPE layout to the interleaved pairs that llama.cpp rotates.
  Llama-3 RoPE scaling is written as the `rope_freqs` factor tensor, linear scaling as metadata.
- The other architectures rotate halves as HF does (NEOX), so q/k are split without permuting; Phi-3 keeps
  fused `attn_qkv` and `ffn_up` (gate | up rows). Gemma's (1 + w) norms are written as 1 + w. Experts are
  stacked into `ffn_{gate,up,down}_exps` (n_expert, rows, cols), the router is `ffn_gate_inp`.
- Tokenizer: byte-level BPE vocabulary, merges and token types (`tokenizer.ggml.model = "gpt2"`,
  pre-tokenizer "gpt-2", the GPT-2 regex our BPE tokenizers use); padded with unused tokens up to the
  model's vocab_size.
1-D tensors (norms, biases) are always F32, as llama.cpp expects; 2-D weights are F32, F16, BF16, Q8_0 or
Q4_0 (blocks of 32 with one F16 scale: the peers of gptforge's fp32, bf16, int8 and int4 in
benchmarks/vs_llamacpp.py). A matrix whose rows are not a multiple of 32 wide stays F16 under Q8_0/Q4_0,
as llama.cpp's own converter does.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from ..atomic import atomic_path
from ..config import Config
from ..model import GPT, longrope_attention_factor, rope_inv_freq
from .hf import hf_family

GGUF_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0")
_FILE_TYPES = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0",
               "q4_0": "MOSTLY_Q4_0"}


# gptforge family -> llama.cpp architecture, for the families beyond GPT-2 and Llama.
FAMILY_ARCH = {"qwen3": "qwen3", "gemma2": "gemma2", "gemma3": "gemma3", "phi3": "phi3", "olmo2": "olmo2",
               "mixtral": "llama", "qwen3_moe": "qwen3moe", "olmoe": "olmoe"}
_MECHANISMS_OFF = dict(qk_norm=None, norm_placement="pre", norm_unit_offset=False, scale_embeddings=False,
                       query_pre_attn_scalar=None, attn_softcap=None, logit_softcap=None, layer_types=None,
                       rope_local_theta=None, partial_rotary_factor=1.0, fused_gate_up=False, clip_qkv=None, n_expert=0)


def gguf_architecture(config: Config) -> str:
    """The llama.cpp architecture, or a ValueError naming the config field llama.cpp cannot express."""
    c = config
    if c.pos_embedding == "learned":
        if not (c.norm == "layernorm" and c.mlp == "gelu" and c.bias and c.qkv_bias):
            raise ValueError("GGUF export: a learned-position model must be GPT-2 shaped "
                             "(norm=layernorm, mlp=gelu, bias=true)")
        if c.gelu_approximate != "tanh":
            raise ValueError("GGUF export: llama.cpp's GPT-2 uses tanh GELU; config field 'gelu_approximate' is "
                             f"{c.gelu_approximate!r}")
        if c.kv_heads != c.n_head or c.hdim * c.n_head != c.n_embd:
            raise ValueError("GGUF export: GPT-2 needs n_kv_head == n_head and head_dim == n_embd / n_head "
                             f"(got n_head={c.n_head}, n_kv_head={c.kv_heads}, head_dim={c.hdim})")
        if c.sliding_window is not None:
            raise ValueError("GGUF export: config field 'sliding_window' is not supported for GPT-2")
        return "gpt2"
    if not (c.pos_embedding == "rope" and c.norm == "rmsnorm" and c.mlp in ("swiglu", "geglu")):
        raise ValueError(f"GGUF export supports GPT-2 (learned positions) and RoPE + RMSNorm models of the families "
                         f"in docs/models.md; got pos_embedding={c.pos_embedding!r}, norm={c.norm!r}, mlp={c.mlp!r}")
    on = [name for name, off in _MECHANISMS_OFF.items() if getattr(c, name) != off]
    family = hf_family(c)
    if on and family not in FAMILY_ARCH:
        raise ValueError(f"GGUF export: no llama.cpp architecture runs config field(s) {on} in this combination "
                         f"(supported families: {sorted(FAMILY_ARCH)})")
    arch = FAMILY_ARCH.get(family, "llama") if on else "llama"
    if c.mlp != "swiglu" and arch not in ("gemma2", "gemma3"):
        raise ValueError(f"GGUF export: config field 'mlp' is {c.mlp!r}; llama.cpp's {arch} uses swiglu")
    reason = _unsupported(c, arch)
    if reason:
        raise ValueError(f"GGUF export ({arch}): {reason}")
    return arch


def _unsupported(c: Config, arch: str) -> Optional[str]:
    """What llama.cpp's `arch` would run differently from gptforge for config `c`, or None."""
    rope = c.rope_type
    if c.sliding_window is not None and arch not in ("gemma2", "gemma3", "phi3"):
        return f"config field 'sliding_window' is not supported by llama.cpp's {arch} architecture"
    if rope == "longrope" and arch != "phi3" or rope == "llama3" and arch != "llama":
        return f"config field 'rope_scaling': {rope} scaling is not written for {arch}"
    if rope == "linear" and arch not in ("llama", "gemma3"):
        return f"config field 'rope_scaling': linear scaling is not written for {arch}"
    if arch in ("gemma2", "gemma3"):
        big = {"gemma2": 46, "gemma3": 62}[arch]  # llama.cpp's 27B rule: n_embd / n_head instead of head_dim
        expected = c.n_embd / c.n_head if c.n_layer == big else c.hdim
        if float(c.query_pre_attn_scalar or c.hdim) != float(expected):
            return (f"config field 'query_pre_attn_scalar' is {c.query_pre_attn_scalar}; llama.cpp scales by "
                    f"{expected:g}^-1/2 for this size")
        if c.gelu_approximate != "tanh":
            return "llama.cpp's Gemma uses tanh GELU; config field 'gelu_approximate' is 'none'"
    if arch == "gemma2":
        if c.attn_softcap is None or c.logit_softcap is None:
            return "llama.cpp's gemma2 always soft-caps; config fields 'attn_softcap' and 'logit_softcap' must be set"
        if not c.tie_embeddings or c.rope_scaling:
            return "llama.cpp's gemma2 needs tie_embeddings=true and no rope_scaling"
    if arch == "qwen3moe" and (not c.moe_norm_topk or c.moe_dense_layers):
        return "llama.cpp's qwen3moe renormalises the top-k weights on every layer (moe_norm_topk=true, no dense layers)"
    if arch == "olmoe" and (c.moe_norm_topk or c.clip_qkv is not None or c.kv_heads != c.n_head):
        return "llama.cpp's olmoe needs moe_norm_topk=false, no clip_qkv and n_kv_head == n_head"
    if arch == "llama" and c.n_expert and (not c.moe_norm_topk or c.moe_dense_layers):
        return "llama.cpp's Mixtral renormalises the top-k weights on every layer (moe_norm_topk=true, no dense layers)"
    return None


def permute_for_llama_cpp(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder Q/K rows (or biases) per head from [first half | second half] to interleaved pairs."""
    shape = weight.shape
    return weight.reshape(n_heads, 2, shape[0] // n_heads // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


_NORMS = {"pre": {"norm1": "attn_norm", "norm2": "ffn_norm"},
          "sandwich": {"norm1": "attn_norm", "post_attn_norm": "post_attention_norm", "norm2": "ffn_norm",
                       "post_mlp_norm": "post_ffw_norm"},
          "post": {"post_attn_norm": "post_attention_norm", "post_mlp_norm": "post_ffw_norm"}}
_LINEARS = {"attn.out": "attn_output", "attn.q_norm": "attn_q_norm", "attn.k_norm": "attn_k_norm",
            "mlp.up": "ffn_up", "mlp.gate": "ffn_gate", "mlp.down": "ffn_down", "mlp.gate_up": "ffn_up",
            "mlp.router": "ffn_gate_inp"}


def gguf_tensors(model: GPT) -> dict[str, torch.Tensor]:
    """llama.cpp tensor names -> float tensors in llama.cpp's layouts."""
    c = model.config
    arch = gguf_architecture(c)
    sd = {k: v.detach().float() for k, v in model.state_dict().items()}
    if c.norm_unit_offset:  # llama.cpp's RMSNorm scales by w; Gemma's by (1 + w)
        norms = {f"{name}.weight" for name, module in model.named_modules() if getattr(module, "unit_offset", False)}
        sd = {k: v + 1 if k in norms else v for k, v in sd.items()}
    out: dict[str, torch.Tensor] = {"token_embd.weight": sd["wte.weight"], "output_norm.weight": sd["norm_f.weight"]}
    if arch != "gemma2":  # gemma2 always reads the head from the embedding
        out["output.weight"] = sd["lm_head.weight"] if "lm_head.weight" in sd else sd["wte.weight"]
    if "norm_f.bias" in sd:
        out["output_norm.bias"] = sd["norm_f.bias"]
    if arch == "gpt2":
        out["position_embd.weight"] = sd["wpe.weight"]
    else:
        factors = _rope_factors(c)
        if factors is not None:
            out["rope_freqs.weight"] = factors
        if c.rope_type == "longrope":
            out["rope_factors_long.weight"] = torch.tensor(c.rope_scaling["long_factor"], dtype=torch.float32)
            out["rope_factors_short.weight"] = torch.tensor(c.rope_scaling["short_factor"], dtype=torch.float32)
    for i in range(c.n_layer):
        p, b = f"blocks.{i}.", f"blk.{i}."
        names = {**_NORMS[c.norm_placement], **_LINEARS}
        if arch in ("gpt2", "phi3"):
            names["attn.qkv"] = "attn_qkv"
        for ours, theirs in names.items():
            for suffix in ("weight", "bias"):
                if f"{p}{ours}.{suffix}" in sd:
                    out[f"{b}{theirs}.{suffix}"] = sd[f"{p}{ours}.{suffix}"]
        if arch not in ("gpt2", "phi3"):
            out.update(_split_qkv(sd, c, p, b, permute=arch == "llama"))
        if c.is_moe_layer(i):
            for ours, theirs in (("gate", "ffn_gate_exps"), ("up", "ffn_up_exps"), ("down", "ffn_down_exps")):
                experts = [sd[f"{p}mlp.experts.{e}.{ours}.weight"] for e in range(c.n_expert)]
                out[f"{b}{theirs}.weight"] = torch.stack(experts)  # (n_expert, rows, cols)
    return out


def _split_qkv(sd: dict[str, torch.Tensor], c: Config, p: str, b: str, permute: bool) -> dict[str, torch.Tensor]:
    """attn_q/k/v from our fused qkv; the llama architecture rotates interleaved pairs, so its q/k are permuted."""
    out = {}
    q_size, kv_size = c.n_head * c.hdim, c.kv_heads * c.hdim
    for suffix in ("weight", "bias"):
        fused = sd.get(f"{p}attn.qkv.{suffix}")
        if fused is None:
            continue
        q, k, v = fused.split([q_size, kv_size, kv_size], dim=0)
        if permute:
            q, k = permute_for_llama_cpp(q, c.n_head), permute_for_llama_cpp(k, c.kv_heads)
        out[f"{b}attn_q.{suffix}"], out[f"{b}attn_k.{suffix}"], out[f"{b}attn_v.{suffix}"] = q, k, v
    return out


def _rope_factors(config: Config) -> Optional[torch.Tensor]:
    """llama.cpp's per-frequency divisors for Llama-3 RoPE scaling (None otherwise)."""
    if config.rope_type != "llama3":
        return None
    plain = rope_inv_freq(config.replace(rope_scaling=None))
    return (plain / rope_inv_freq(config)).float()


def _tokenizer_vocab(tokenizer: Any, vocab_size: int) -> tuple[list[str], list[int], list[str]]:
    """(tokens by id, token types, merges "a b") of a byte-level BPE tokenizer, padded to vocab_size."""
    import gguf

    if tokenizer.kind != "bpe":
        raise ValueError(f"GGUF export needs a byte-level BPE tokenizer; this model's is {tokenizer.kind!r} "
                         "(llama.cpp has no character-level tokenizer)")
    data = json.loads(tokenizer.backend.to_str())
    model = data["model"]
    by_id: dict[int, str] = {i: t for t, i in tokenizer.backend.get_vocab(with_added_tokens=True).items()}
    if len(by_id) > vocab_size or max(by_id) >= vocab_size:
        raise ValueError(f"tokenizer has {len(by_id)} tokens but the model's vocab_size is {vocab_size}")
    special = {a["id"] for a in data.get("added_tokens", []) if a.get("special")}
    tokens, types = [], []
    for i in range(vocab_size):
        if i in by_id:
            tokens.append(by_id[i])
            types.append(int(gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL))
        else:
            tokens.append(f"[PAD{i}]")
            types.append(int(gguf.TokenType.UNUSED))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return tokens, types, merges


def _encode_tensor(name: str, tensor: torch.Tensor, outtype: str) -> tuple[np.ndarray, Any]:
    """(array, raw_dtype) for GGUFWriter.add_tensor; 1-D tensors stay F32."""
    import gguf

    array = tensor.contiguous().numpy().astype(np.float32)
    if array.ndim == 1 or outtype == "f32" or name == "rope_freqs.weight":
        return array, None
    if outtype == "f16":
        return array.astype(np.float16), None
    if outtype == "bf16":
        kind = gguf.GGMLQuantizationType.BF16
        return gguf.quants.quantize(array, kind), kind
    if array.shape[-1] % 32:  # Q8_0/Q4_0 blocks are 32 wide; llama.cpp's converter falls back the same way
        return array.astype(np.float16), None
    kind = gguf.GGMLQuantizationType.Q8_0 if outtype == "q8_0" else gguf.GGMLQuantizationType.Q4_0
    return gguf.quants.quantize(array, kind), kind


def export_gguf(model: GPT, path: str | Path, tokenizer: Any, outtype: str = "f32") -> Path:
    """Write `model` and its tokenizer as one GGUF file that llama.cpp loads."""
    import gguf

    if outtype not in GGUF_TYPES:
        raise ValueError(f"GGUF outtype must be one of {list(GGUF_TYPES)}, got {outtype!r}")
    from ..compress.quantize import dequantize_model, is_quantized

    if is_quantized(model):
        model = dequantize_model(model)
    c = model.config
    arch = gguf_architecture(c)
    if tokenizer is None:
        raise ValueError("GGUF export needs the model's tokenizer (tokenizer.json in the model directory)")
    tokens, types, merges = _tokenizer_vocab(tokenizer, c.vocab_size)
    tensors = gguf_tensors(model)
    path = Path(path)
    with atomic_path(path) as tmp:
        writer = gguf.GGUFWriter(str(tmp), arch)
        if not (arch == "phi3" and any(t not in tokens for t in _PHI3_NAMED_TOKENS)):
            # llama.cpp looks these tokens up when the name says Phi-3, and aborts if they are absent
            writer.add_name(c.name)
        writer.add_file_type(getattr(gguf.LlamaFileType, _FILE_TYPES[outtype]))
        writer.add_context_length(c.block_size)
        writer.add_embedding_length(c.n_embd)
        writer.add_block_count(c.n_layer)
        writer.add_head_count(c.n_head)
        writer.add_head_count_kv(c.kv_heads)
        writer.add_vocab_size(c.vocab_size)
        if arch == "gpt2":
            writer.add_feed_forward_length(c.ffn_dim)
            writer.add_layer_norm_eps(c.norm_eps)
        else:
            _write_family_metadata(writer, c, arch)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("gpt-2")
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        writer.add_token_merges(merges)
        eos = c.eos_token_id if c.eos_token_id is not None else tokenizer.eos_token_id
        bos = c.bos_token_id if c.bos_token_id is not None else (tokenizer.bos_token_id or eos)
        if eos is not None:
            writer.add_eos_token_id(eos)
        if bos is not None:
            writer.add_bos_token_id(bos)
        if tokenizer.pad_token_id is not None:
            writer.add_pad_token_id(tokenizer.pad_token_id)
        writer.add_add_bos_token(False)
        _write_fim_tokens(writer, tokenizer)
        for name, tensor in tensors.items():
            array, raw_dtype = _encode_tensor(name, tensor, outtype)
            writer.add_tensor(name, array, raw_dtype=raw_dtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return path


def _write_fim_tokens(writer: Any, tokenizer: Any) -> None:
    """llama.cpp's FIM token keys, so its server's /infill and editor plugins find the tokens."""
    import gguf

    from ..fim import fim_tokens

    tokens = fim_tokens(tokenizer)
    if tokens is None:
        return
    keys = gguf.Keys.Tokenizer
    for key, token_id in ((keys.FIM_PRE_ID, tokens.prefix), (keys.FIM_SUF_ID, tokens.suffix),
                          (keys.FIM_MID_ID, tokens.middle), (keys.FIM_PAD_ID, tokens.pad),
                          (keys.FIM_REP_ID, tokens.repo), (keys.FIM_SEP_ID, tokens.file_sep)):
        if token_id is not None:
            writer.add_uint32(key, token_id)


_PHI3_NAMED_TOKENS = ("</s>", "<unk>", "<s>", "<|endoftext|>")


def _write_family_metadata(writer: Any, c: Config, arch: str) -> None:
    """Hyperparameters of the RoPE architectures: sizes, RoPE, windows, soft-caps and experts."""
    import gguf

    moe_everywhere = c.n_expert and not c.moe_dense_layers
    writer.add_feed_forward_length(c.expert_dim if moe_everywhere and arch != "qwen3moe" else c.ffn_dim)
    writer.add_layer_norm_rms_eps(c.norm_eps)
    writer.add_rope_freq_base(c.rope_theta)
    writer.add_rope_dimension_count(c.rotary_dim)
    writer.add_key_length(c.hdim)
    writer.add_value_length(c.hdim)
    if c.rope_type == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(c.rope_scaling["factor"]))
    if c.rope_type == "longrope":  # the factors are tensors; llama.cpp picks long or short by its context size
        writer.add_rope_scaling_orig_ctx_len(int(c.rope_scaling["original_max_position_embeddings"]))
        writer.add_rope_scaling_attn_factors(longrope_attention_factor(c))
    if c.sliding_window is not None:
        writer.add_sliding_window(c.sliding_window)
        if arch in ("gemma2", "gemma3"):
            writer.add_sliding_window_pattern([c.layer_window(i) is not None for i in range(c.n_layer)])
    if c.rope_local_theta is not None:
        writer.add_rope_freq_base_swa(c.rope_local_theta)
    if c.attn_softcap is not None:
        writer.add_attn_logit_softcapping(c.attn_softcap)
    if c.logit_softcap is not None:
        writer.add_final_logit_softcapping(c.logit_softcap)
    if c.n_expert:
        writer.add_expert_count(c.n_expert)
        writer.add_expert_used_count(c.n_expert_per_token)
        if arch == "qwen3moe":
            writer.add_expert_feed_forward_length(c.expert_dim)


def read_gguf_tensors(path: str | Path) -> dict[str, np.ndarray]:
    """Float arrays of a GGUF file, in PyTorch's (rows, cols) order (dequantizing Q8_0/Q4_0/F16/BF16)."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    out: dict[str, np.ndarray] = {}
    for t in reader.tensors:
        data = gguf.quants.dequantize(t.data, t.tensor_type)
        out[t.name] = np.asarray(data, dtype=np.float32).reshape(tuple(reversed([int(n) for n in t.shape])))
    return out


__all__ = ["export_gguf", "gguf_tensors", "gguf_architecture", "permute_for_llama_cpp", "read_gguf_tensors",
           "GGUF_TYPES", "FAMILY_ARCH"]
