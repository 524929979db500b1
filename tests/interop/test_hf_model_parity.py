"""Logits and greedy tokens against Hugging Face `transformers` (random-init tiny models, offline)."""

import pytest
import torch

from gptforge.interop.hf import config_from_hf
from gptforge.loading import load_model, save

transformers = pytest.importorskip("transformers")

TINY = dict(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=128)


def _hf_model(arch: str):
    if arch == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=97, n_positions=128, n_embd=64, n_layer=2, n_head=4,
                                      resid_pdrop=0, embd_pdrop=0, attn_pdrop=0)
        return transformers.GPT2LMHeadModel(cfg)
    if arch == "gpt2-untied":
        cfg = transformers.GPT2Config(vocab_size=97, n_positions=128, n_embd=64, n_layer=2, n_head=4,
                                      tie_word_embeddings=False)
        return transformers.GPT2LMHeadModel(cfg)
    if arch == "llama-gqa":
        cfg = transformers.LlamaConfig(**TINY, num_key_value_heads=2, rope_theta=500000.0, tie_word_embeddings=False)
        return transformers.LlamaForCausalLM(cfg)
    if arch == "llama-tied-mha":
        cfg = transformers.LlamaConfig(**TINY, num_key_value_heads=4, tie_word_embeddings=True)
        return transformers.LlamaForCausalLM(cfg)
    if arch == "llama3-rope-scaling":
        cfg = transformers.LlamaConfig(**TINY, num_key_value_heads=2, rope_scaling={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32})
        return transformers.LlamaForCausalLM(cfg)
    if arch == "qwen2":
        cfg = transformers.Qwen2Config(**TINY, num_key_value_heads=2, tie_word_embeddings=False)
        return transformers.Qwen2ForCausalLM(cfg)
    if arch == "mistral":
        cfg = transformers.MistralConfig(**TINY, num_key_value_heads=1, sliding_window=16)
        return transformers.MistralForCausalLM(cfg)
    raise ValueError(arch)


ARCHS = ["gpt2", "gpt2-untied", "llama-gqa", "llama-tied-mha", "llama3-rope-scaling", "qwen2", "mistral"]


@pytest.fixture(params=ARCHS)
def pair(request, tmp_path):
    torch.manual_seed(0)
    hf = _hf_model(request.param).eval()
    # Random init leaves some weights at exactly 0/1; perturb everything so the test sees all of them.
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    hf.save_pretrained(tmp_path / "hf")
    ours = load_model(tmp_path / "hf")
    return request.param, hf, ours, tmp_path


def test_logits_match(pair):
    arch, hf, ours, _ = pair
    ids = torch.randint(0, 97, (2, 40))
    with torch.no_grad():
        ref = hf(ids).logits
        got = ours(ids)
    diff = (ref - got).abs().max().item()
    print(f"{arch}: max |logit diff| = {diff:.2e}")
    assert diff <= 1e-4, f"{arch}: max logit diff {diff}"


def test_greedy_matches(pair):
    arch, hf, ours, _ = pair
    ids = torch.randint(0, 97, (1, 7))
    with torch.no_grad():
        ref = hf.generate(ids, max_new_tokens=20, do_sample=False, min_new_tokens=20, pad_token_id=0)[0, 7:].tolist()
        seq = ids
        for _ in range(20):
            nxt = ours(seq)[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
    assert seq[0, 7:].tolist() == ref


def test_round_trip_through_hf(pair):
    arch, hf, ours, tmp_path = pair
    save(tmp_path / "ours", ours)
    hf2 = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours").eval()
    ours2 = load_model(tmp_path / "ours")
    ids = torch.randint(0, 97, (1, 30))
    with torch.no_grad():
        a, b, c = ours(ids), hf2(ids).logits, ours2(ids)
    assert torch.equal(a, c)
    assert (a - b).abs().max().item() <= 1e-4
    assert type(hf2).__name__ == type(hf).__name__


def test_config_mapping_preserves_gqa_and_ties(pair):
    arch, hf, ours, _ = pair
    cfg = config_from_hf(hf.config.to_dict())
    assert cfg.kv_heads == getattr(hf.config, "num_key_value_heads", cfg.n_head)
    assert cfg.tie_embeddings == hf.config.tie_word_embeddings
