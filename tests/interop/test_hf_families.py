"""Qwen3, Gemma 2/3, Phi-3/4-mini, OLMo 2, Mixtral, Qwen3-MoE and OLMoE against `transformers` (tiny random models).

For each family: logits within 1e-4 (fp32), 20 greedy tokens through `gptforge.generate` (KV cache) equal to
`transformers` `generate`, and HF -> gptforge -> HF bit-identical weights that `transformers` loads back.
"""

import json

import pytest
import torch

from gptforge.config import Config
from gptforge.generate import generate
from gptforge.interop.hf import config_from_hf, config_to_hf, hf_family
from gptforge.loading import load_model, save
from hf_families import CASES, FAMILY, VOCAB, hf_model

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module", params=CASES)
def pair(request, tmp_path_factory):
    case = request.param
    hf = hf_model(case)
    path = tmp_path_factory.mktemp(case)
    hf.save_pretrained(path / "hf")
    return case, hf, load_model(path / "hf"), path


def test_family_is_recognised(pair):
    case, hf, ours, _ = pair
    assert ours.config.family == FAMILY.get(case, case) == hf_family(ours.config)
    assert ours.config.num_params() == ours.num_params()  # the config's count drives the loader's size check


def test_logits_match(pair):
    case, hf, ours, _ = pair
    ids = torch.randint(0, VOCAB, (2, 40))
    with torch.no_grad():
        diff = (hf(ids).logits - ours(ids)).abs().max().item()
    assert diff <= 1e-4, f"{case}: max logit diff {diff}"


def test_padded_batch_logits_match(pair):
    case, hf, ours, _ = pair
    ids = torch.randint(3, VOCAB, (2, 24))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # left padding
    with torch.no_grad():
        ref = hf(ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
        got = ours(ids, positions=(mask.cumsum(-1) - 1).clamp(min=0), key_mask=mask.bool())
    diff = (ref - got)[mask.bool()].abs().max().item()
    assert diff <= 1e-4, f"{case}: max logit diff on real tokens {diff}"


def test_greedy_generation_matches(pair):
    case, hf, ours, _ = pair
    prompts = [[5, 17, 42, 8, 9, 30, 11], [60, 61, 62]]
    outputs = generate(ours, prompts, max_new_tokens=20, eos_token_id=[])  # one batch: left padding + KV cache
    hf.generation_config.eos_token_id = None  # no early stop and no EOS suppression: 20 plain argmax steps
    for prompt, output in zip(prompts, outputs):
        ids = torch.tensor([prompt])
        with torch.no_grad():
            ref = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=20, do_sample=False,
                              pad_token_id=0)[0, len(prompt):].tolist()
        assert len(ref) == len(output.token_ids) == 20
        if prompt is prompts[0]:  # alone: batch-1 decode (one token per step, e.g. MoE's single-token path)
            assert generate(ours, [prompt], max_new_tokens=20, eos_token_id=[])[0].token_ids == ref, case
        assert output.token_ids == ref, case


def test_round_trip_is_bit_identical(pair):
    case, hf, ours, path = pair
    save(path / "ours", ours)
    back = transformers.AutoModelForCausalLM.from_pretrained(path / "ours").eval()
    assert type(back) is type(hf)
    theirs, again = hf.state_dict(), back.state_dict()
    assert set(theirs) == set(again)
    for name, tensor in theirs.items():
        assert torch.equal(tensor, again[name]), f"{case}: {name} changed"
    ids = torch.randint(0, VOCAB, (1, 30))
    with torch.no_grad():
        # Equal weights; the logits may differ in the last bits because an earlier generate() re-laid
        # `ours`'s linears column-major for decoding (another summation order).
        torch.testing.assert_close(load_model(path / "ours")(ids), ours(ids), rtol=0, atol=1e-5)
        assert (back(ids).logits - ours(ids)).abs().max().item() <= 1e-4


def test_config_survives_hf_mapping(pair):
    case, hf, ours, path = pair
    written = json.loads((path / "hf" / "config.json").read_text())
    mapped = config_to_hf(ours.config)
    again = config_from_hf({k: v for k, v in mapped.items() if k != "gptforge"})
    assert again.replace(name=ours.config.name) == ours.config.replace(name=ours.config.name)
    assert config_from_hf(written) == ours.config


def test_unsupported_variants_name_the_field():
    from gptforge.errors import ConfigError

    base = {"architectures": ["Gemma2ForCausalLM"], "model_type": "gemma2", "vocab_size": 97, "hidden_size": 64,
            "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4}
    with pytest.raises(ConfigError, match="use_bidirectional_attention"):
        config_from_hf({**base, "use_bidirectional_attention": True})
    with pytest.raises(ConfigError, match="multimodal Gemma 3"):
        config_from_hf({**base, "architectures": ["Gemma3ForConditionalGeneration"]})
    with pytest.raises(ConfigError, match="attention_bias"):
        config_from_hf({**base, "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "attention_bias": True})
    with pytest.raises(ConfigError, match="rope_type 'yarn'"):
        config_from_hf({**base, "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3",
                        "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})


def test_a_config_no_family_expresses_is_saved_natively(tmp_path):
    # OLMo 2 norms with Gemma's soft-capping: gptforge runs it, no HF class does.
    config = Config(family="olmo2", vocab_size=97, block_size=32, n_layer=1, n_head=2, n_embd=32,
                    pos_embedding="rope", norm="rmsnorm", mlp="swiglu", bias=False, norm_placement="post",
                    qk_norm="full", logit_softcap=5.0)
    assert hf_family(config) is None
    from gptforge.model import GPT

    model = GPT(config).eval()
    save(tmp_path / "m", model)
    assert json.loads((tmp_path / "m" / "config.json").read_text())["architectures"] == ["GPTForgeForCausalLM"]
    ids = torch.randint(0, 97, (1, 9))
    with torch.no_grad():
        assert torch.equal(load_model(tmp_path / "m")(ids), model(ids))
