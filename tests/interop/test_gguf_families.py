"""GGUF export of Qwen3, Gemma 2/3, Phi-3/4-mini, OLMo 2, Mixtral, Qwen3-MoE and OLMoE: read back with the
`gguf` package, refused with the field named where llama.cpp would compute something else, and (with
LLAMACPP_BIN set to llama.cpp's bin folder) the same greedy text from `llama-completion` as from gptforge."""

import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from gptforge.generate import generate
from gptforge.interop.gguf import FAMILY_ARCH, export_gguf, gguf_architecture, gguf_tensors, read_gguf_tensors
from gptforge.loading import load_model
from gptforge.tokenizer import Tokenizer
from hf_families import hf_model

gguf = pytest.importorskip("gguf")
pytest.importorskip("transformers")

TEXT = "the quick brown fox jumps over the lazy dog; pack my box with five dozen liquor jugs. " * 30
# Exportable variants of the shared cases: llama.cpp fixes some choices that transformers leaves open
# (Gemma's attention scale, Phi-3's disabled window, OLMoE without GQA or clipping, Qwen3-MoE without dense layers).
EXPORTABLE = {
    "qwen3": {}, "gemma2": dict(query_pre_attn_scalar=16), "gemma3": {}, "phi3": dict(sliding_window=None),
    "phi4-mini": {}, "olmo2": {}, "mixtral": dict(sliding_window=None), "qwen3_moe": dict(mlp_only_layers=[]),
    "olmoe": dict(clip_qkv=None, num_key_value_heads=4),
}
ARCH = {"qwen3": "qwen3", "gemma2": "gemma2", "gemma3": "gemma3", "phi3": "phi3", "phi4-mini": "phi3",
        "olmo2": "olmo2", "mixtral": "llama", "qwen3_moe": "qwen3moe", "olmoe": "olmoe"}


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.train_bpe([TEXT], 300)


def _model(case: str, tmp_path: Path, **overrides):
    hf_model(case, vocab_size=320, **{**EXPORTABLE.get(case, {}), **overrides}).save_pretrained(tmp_path / case)
    return load_model(tmp_path / case)


def _field(reader, key):
    return reader.fields[key].contents()


@pytest.mark.parametrize("case", list(EXPORTABLE))
def test_export_reads_back(case, tmp_path, tokenizer):
    model = _model(case, tmp_path)
    c = model.config
    arch = gguf_architecture(c)
    assert arch == ARCH[case] == FAMILY_ARCH[c.family]
    path = export_gguf(model, tmp_path / "m.gguf", tokenizer)
    reader = gguf.GGUFReader(str(path))
    assert _field(reader, "general.architecture") == arch
    assert _field(reader, f"{arch}.rope.dimension_count") == c.rotary_dim
    assert _field(reader, f"{arch}.attention.key_length") == c.hdim
    back, ours = read_gguf_tensors(path), gguf_tensors(model)
    assert set(back) == set(ours)
    for name, tensor in ours.items():
        np.testing.assert_array_equal(back[name], tensor.numpy(), err_msg=name)
    if c.norm_unit_offset:  # Gemma's (1 + w) is written as the scale llama.cpp multiplies by
        np.testing.assert_array_equal(back["blk.0.attn_norm.weight"], 1 + model.blocks[0].norm1.weight.detach().numpy())
    if c.qk_norm:
        assert back["blk.0.attn_q_norm.weight"].shape == tuple(model.blocks[0].attn.q_norm.weight.shape)
    if c.n_expert:
        assert _field(reader, f"{arch}.expert_count") == c.n_expert
        assert _field(reader, f"{arch}.expert_used_count") == c.n_expert_per_token
        assert back["blk.0.ffn_gate_exps.weight"].shape == (c.n_expert, c.expert_dim, c.n_embd)
        np.testing.assert_array_equal(back["blk.0.ffn_down_exps.weight"][1],
                                      model.blocks[0].mlp.experts[1].down.weight.detach().numpy())
    if arch == "phi3":
        assert "blk.0.attn_qkv.weight" in back and back["blk.0.ffn_up.weight"].shape == (2 * c.ffn_dim, c.n_embd)
    if c.rope_type == "longrope":
        assert back["rope_factors_long.weight"].tolist() == pytest.approx(c.rope_scaling["long_factor"])
    if arch in ("gemma2", "gemma3"):
        assert list(_field(reader, f"{arch}.attention.sliding_window_pattern")) == [
            t == "sliding_attention" for t in c.layer_types]
    if arch == "gemma2":
        assert _field(reader, "gemma2.attn_logit_softcapping") == pytest.approx(c.attn_softcap)
    if arch == "gemma3":
        assert _field(reader, "gemma3.rope.freq_base_swa") == pytest.approx(c.rope_local_theta)


@pytest.mark.parametrize("case,overrides,field", [
    ("qwen3-window", {}, "sliding_window"),
    ("gemma2", dict(query_pre_attn_scalar=24), "query_pre_attn_scalar"),
    ("mixtral", dict(sliding_window=8), "sliding_window"),
    ("qwen3_moe", dict(mlp_only_layers=[1]), "moe_norm_topk=true, no dense layers"),
    ("olmoe", dict(clip_qkv=0.4), "no clip_qkv"),
])
def test_export_refuses_what_llama_cpp_computes_differently(case, overrides, field, tmp_path, tokenizer):
    model = _model(case, tmp_path, **overrides)
    with pytest.raises(ValueError, match=field):
        export_gguf(model, tmp_path / "x.gguf", tokenizer)
    assert not (tmp_path / "x.gguf").exists()


LLAMACPP_BIN = os.environ.get("LLAMACPP_BIN")


@pytest.mark.skipif(not LLAMACPP_BIN, reason="set LLAMACPP_BIN to llama.cpp's bin folder (llama-completion)")
@pytest.mark.parametrize("case", list(EXPORTABLE))
def test_llama_cpp_generates_the_same_text(case, tmp_path, tokenizer):
    model = _model(case, tmp_path)
    # A random head picks bytes that are not text; keep the words and letters so both sides print the same
    # characters (zero rows: those tokens never win the argmax).
    letters = [i for i in range(tokenizer.vocab_size) if (t := tokenizer.decode([i])) and (t.replace(" ", "").isalpha())]
    with torch.no_grad():
        drop = torch.ones(model.config.vocab_size, dtype=torch.bool)
        drop[letters] = False
        model.lm_head.weight[drop] = 0
    export_gguf(model, tmp_path / "m.gguf", tokenizer)
    prompt = "the quick brown"
    result = subprocess.run([str(Path(LLAMACPP_BIN) / "llama-completion"), "-m", str(tmp_path / "m.gguf"), "-p", prompt,
                             "-n", "16", "--temp", "0", "-no-cnv", "--no-display-prompt", "-t", "2", "-c", "64",
                             "-s", "1"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    ours = generate(model, [tokenizer.encode(prompt)], tokenizer, max_new_tokens=16, eos_token_id=[])[0].text
    assert len(ours) >= 16 and result.stdout.replace("[end of text]", "").strip() == ours.strip()
