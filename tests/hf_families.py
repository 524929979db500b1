"""Tiny random-init `transformers` models of every family gptforge reads (offline), shared by the tests.

Each case perturbs every weight off its 0/1 init, so a comparison sees all of them, and gives the mechanisms
values that matter at this size (small soft-caps, short windows, a LongRoPE switch inside 20 tokens).
"""

from __future__ import annotations

import random

import torch

VOCAB = 97
TINY = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def _longrope(rotary_dim: int) -> dict:
    rng = random.Random(0)
    return {"rope_type": "longrope", "short_factor": [1.0 + rng.random() for _ in range(rotary_dim // 2)],
            "long_factor": [2.0 + 4 * rng.random() for _ in range(rotary_dim // 2)],
            "original_max_position_embeddings": 16}


def hf_config(case: str, **overrides):
    """The transformers config of a named case (`overrides` replace config keys, e.g. vocab_size)."""
    config = _hf_config(case)
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def _hf_config(case: str):
    import transformers as T

    if case == "gpt2":
        return T.GPT2Config(vocab_size=VOCAB, n_positions=128, n_embd=64, n_layer=2, n_head=4, bos_token_id=1,
                            eos_token_id=2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    if case == "llama":
        return T.LlamaConfig(**TINY, tie_word_embeddings=False)
    if case == "mistral":
        return T.MistralConfig(**TINY, sliding_window=8)
    if case == "qwen2":
        return T.Qwen2Config(**TINY)
    if case == "qwen3":
        return T.Qwen3Config(**TINY, head_dim=16, tie_word_embeddings=False)
    if case == "qwen3-window":  # layer 1 slides over 8 keys, layer 0 is global
        return T.Qwen3Config(**TINY, head_dim=16, use_sliding_window=True, sliding_window=8, max_window_layers=1)
    if case == "gemma2":
        return T.Gemma2Config(**TINY, head_dim=16, sliding_window=8, query_pre_attn_scalar=24,
                              attn_logit_softcapping=3.0, final_logit_softcapping=4.0)
    if case == "gemma3":
        return T.Gemma3TextConfig(**{**TINY, "num_hidden_layers": 3}, head_dim=16, sliding_window=8,
                                  layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                                  query_pre_attn_scalar=16, final_logit_softcapping=5.0, rope_parameters={
                                      "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6},
                                      "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}})
    if case == "phi3":
        return T.Phi3Config(**TINY, sliding_window=8)
    if case == "phi4-mini":  # partial rotary, LongRoPE switching at position 16, tied embeddings
        rope = {**_longrope(12), "rope_theta": 10000.0, "partial_rotary_factor": 0.75}
        return T.Phi3Config(**TINY, rope_parameters=rope, original_max_position_embeddings=16,
                            tie_word_embeddings=True)
    if case == "olmo2":
        return T.Olmo2Config(**TINY)
    if case == "mixtral":
        return T.MixtralConfig(**TINY, num_local_experts=4, num_experts_per_tok=2, sliding_window=8)
    if case == "qwen3_moe":  # layer 1 keeps a dense MLP; top-k weights renormalised
        return T.Qwen3MoeConfig(**TINY, head_dim=16, moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2,
                                norm_topk_prob=True, mlp_only_layers=[1])
    if case == "olmoe":
        return T.OlmoeConfig(**TINY, num_experts=4, num_experts_per_tok=2, clip_qkv=0.4)
    raise ValueError(case)


CASES = ["gpt2", "llama", "mistral", "qwen2", "qwen3", "qwen3-window", "gemma2", "gemma3", "phi3", "phi4-mini", "olmo2",
         "mixtral", "qwen3_moe", "olmoe"]
MOE_CASES = ["mixtral", "qwen3_moe", "olmoe"]
FAMILY = {"qwen3-window": "qwen3", "phi4-mini": "phi3"}  # case -> gptforge family, when they differ


def hf_model(case: str, attn_implementation: str = "eager", **overrides):
    """A random-init HF causal LM of the case, in eval mode, every weight perturbed."""
    import transformers as T

    torch.manual_seed(0)
    config = hf_config(case, **overrides)
    config._attn_implementation = attn_implementation
    model = T.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            # Routers get a wide spread so top-k choices are far from ties.
            p.add_(torch.randn_like(p) * (0.5 if name.endswith("gate.weight") and p.shape[0] == 4 else 0.05))
    return model
