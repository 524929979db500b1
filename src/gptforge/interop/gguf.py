"""GGUF export (llama.cpp's format) for the GPT-2 and Llama architectures, written with the `gguf` package.

Layouts follow llama.cpp's own converter (convert_hf_to_gguf.py):
- GPT-2: fused `attn_qkv`, LayerNorm weights and biases, learned `position_embd`; Linear weights (out, in).
- Llama (also Qwen2-style q/k/v biases and Mistral without a sliding window): q/k/v split, and the rows of
  Q and K permuted from HF's rotate-half RoPE layout to the interleaved pairs that llama.cpp rotates.
  Llama-3 RoPE scaling is written as the `rope_freqs` factor tensor, linear scaling as metadata.
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
from ..model import GPT, rope_inv_freq

GGUF_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0")
_FILE_TYPES = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0",
               "q4_0": "MOSTLY_Q4_0"}


def gguf_architecture(config: Config) -> str:
    """'gpt2' or 'llama', or a ValueError naming the config field llama.cpp cannot express."""
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
    if c.pos_embedding == "rope" and c.norm == "rmsnorm" and c.mlp == "swiglu":
        if c.sliding_window is not None:
            raise ValueError("GGUF export: config field 'sliding_window' is not supported by llama.cpp's llama "
                             "architecture")
        return "llama"
    raise ValueError(f"GGUF export supports GPT-2 (learned positions) and Llama (rope + rmsnorm + swiglu) models; "
                     f"got pos_embedding={c.pos_embedding!r}, norm={c.norm!r}, mlp={c.mlp!r}")


def permute_for_llama_cpp(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder Q/K rows (or biases) per head from [first half | second half] to interleaved pairs."""
    shape = weight.shape
    return weight.reshape(n_heads, 2, shape[0] // n_heads // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def gguf_tensors(model: GPT) -> dict[str, torch.Tensor]:
    """llama.cpp tensor names -> float tensors in llama.cpp's layouts."""
    c = model.config
    arch = gguf_architecture(c)
    sd = {k: v.detach().float() for k, v in model.state_dict().items()}
    out: dict[str, torch.Tensor] = {"token_embd.weight": sd["wte.weight"], "output_norm.weight": sd["norm_f.weight"],
                                    "output.weight": sd["lm_head.weight"] if "lm_head.weight" in sd
                                    else sd["wte.weight"]}
    if "norm_f.bias" in sd:
        out["output_norm.bias"] = sd["norm_f.bias"]
    if arch == "gpt2":
        out["position_embd.weight"] = sd["wpe.weight"]
    else:
        factors = _rope_factors(c)
        if factors is not None:
            out["rope_freqs.weight"] = factors
    q_size, kv_size = c.n_head * c.hdim, c.kv_heads * c.hdim
    for i in range(c.n_layer):
        p, b = f"blocks.{i}.", f"blk.{i}."
        names = {"norm1": "attn_norm", "norm2": "ffn_norm", "attn.out": "attn_output",
                 "mlp.up": "ffn_up", "mlp.gate": "ffn_gate", "mlp.down": "ffn_down"}
        if arch == "gpt2":
            names["attn.qkv"] = "attn_qkv"
        for ours, theirs in names.items():
            for suffix in ("weight", "bias"):
                if f"{p}{ours}.{suffix}" in sd:
                    out[f"{b}{theirs}.{suffix}"] = sd[f"{p}{ours}.{suffix}"]
        if arch == "llama":
            for suffix in ("weight", "bias"):
                fused = sd.get(f"{p}attn.qkv.{suffix}")
                if fused is None:
                    continue
                q, k, v = fused.split([q_size, kv_size, kv_size], dim=0)
                out[f"{b}attn_q.{suffix}"] = permute_for_llama_cpp(q, c.n_head)
                out[f"{b}attn_k.{suffix}"] = permute_for_llama_cpp(k, c.kv_heads)
                out[f"{b}attn_v.{suffix}"] = v
    return out


def _rope_factors(config: Config) -> Optional[torch.Tensor]:
    """llama.cpp's per-frequency divisors for Llama-3 RoPE scaling (None otherwise)."""
    scaling = config.rope_scaling or {}
    if scaling.get("rope_type", scaling.get("type")) != "llama3":
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
        writer.add_name(c.name)
        writer.add_file_type(getattr(gguf.LlamaFileType, _FILE_TYPES[outtype]))
        writer.add_context_length(c.block_size)
        writer.add_embedding_length(c.n_embd)
        writer.add_block_count(c.n_layer)
        writer.add_feed_forward_length(c.ffn_dim)
        writer.add_head_count(c.n_head)
        writer.add_head_count_kv(c.kv_heads)
        writer.add_vocab_size(c.vocab_size)
        if arch == "gpt2":
            writer.add_layer_norm_eps(c.norm_eps)
        else:
            writer.add_layer_norm_rms_eps(c.norm_eps)
            writer.add_rope_freq_base(c.rope_theta)
            writer.add_rope_dimension_count(c.hdim)
            writer.add_key_length(c.hdim)
            writer.add_value_length(c.hdim)
            scaling = c.rope_scaling or {}
            if scaling.get("rope_type", scaling.get("type")) == "linear":
                writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
                writer.add_rope_scaling_factor(float(scaling["factor"]))
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
        for name, tensor in tensors.items():
            array, raw_dtype = _encode_tensor(name, tensor, outtype)
            writer.add_tensor(name, array, raw_dtype=raw_dtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return path


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
           "GGUF_TYPES"]
