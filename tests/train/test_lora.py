"""LoRA: zero-init identity, merge equality, save/load round trip, PEFT loads our adapter on the HF export."""

import json

import pytest
import torch

from gptforge.checkpoint import CheckpointError
from gptforge.config import ConfigError
from gptforge.model import GPT
from gptforge.finetune.lora import (LoRAConfig, LoRALinear, apply_lora, load_lora, lora_modules, merge_lora,
                                 save_lora, trainable_parameters)
from gptforge.loading import load_model, save

TINY = dict(vocab_size=96, block_size=32, n_layer=2, n_embd=32)


def tiny(family: str) -> GPT:
    if family == "gpt2":
        return GPT.from_config("nano", **TINY, n_head=2).eval()
    return GPT.from_config("llama-nano", **TINY, n_head=4, n_kv_head=2).eval()


def randomize_adapters(model: GPT) -> None:
    # Fresh adapters are zero (B = 0); give B values so the adapter actually changes the output.
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.normal_(std=0.2)


def targets(family: str) -> list[str]:
    return ["attn.qkv", "attn.out", "mlp.up", "mlp.down"] + (["mlp.gate"] if family == "llama" else [])


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_fresh_adapter_is_identity_and_only_adapters_train(family):
    model = tiny(family)
    ids = torch.randint(0, 96, (2, 10))
    before = model(ids)
    apply_lora(model, LoRAConfig(r=4, alpha=8, target_modules=targets(family)))
    assert torch.equal(model(ids), before)
    trainable, total = trainable_parameters(model)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names and all("lora_" in n for n in names)
    assert 0 < trainable < total / 4


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_merge_equals_adapter_and_save_load_round_trip(family, tmp_path):
    model = tiny(family)
    apply_lora(model, LoRAConfig(r=4, alpha=8, target_modules=targets(family)))
    randomize_adapters(model)
    ids = torch.randint(0, 96, (2, 12))
    with torch.no_grad():
        adapted = model(ids)
    save_lora(model, tmp_path / "adapter")

    fresh = tiny(family)
    fresh.load_state_dict({k: v for k, v in model.state_dict().items() if "lora_" not in k}, strict=False)
    with torch.no_grad():
        base = fresh(ids)
    load_lora(fresh, tmp_path / "adapter")
    with torch.no_grad():
        assert torch.allclose(fresh(ids), adapted, atol=1e-6)
    assert not torch.allclose(base, adapted, atol=1e-3)  # the adapter does something

    merge_lora(model)
    assert not lora_modules(model)
    assert all(type(m) is torch.nn.Linear for n, m in model.named_modules() if n.endswith(("qkv", "out", "up", "down")))
    with torch.no_grad():
        assert torch.allclose(model(ids), adapted, atol=1e-5)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_peft_loads_saved_adapter_on_hf_export(family, tmp_path):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    model = tiny(family)
    save(tmp_path / "base", model)
    apply_lora(model, LoRAConfig(r=4, alpha=8, target_modules=targets(family)))
    randomize_adapters(model)
    save_lora(model, tmp_path / "adapter", base_model=str(tmp_path / "base"))
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4

    ids = torch.randint(0, 96, (2, 12))
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base").eval()
    peft_model = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    n_lora = sum(1 for n, _ in peft_model.named_parameters() if "lora_A" in n)
    assert n_lora == 2 * (len(targets(family)) + (2 if family == "llama" else 0))  # q/k/v are three modules
    with torch.no_grad():
        theirs = peft_model(ids).logits
        ours = model(ids)
    assert torch.allclose(ours, theirs, atol=1e-4), (ours - theirs).abs().max()

    # And back: an adapter PEFT saved itself loads into gptforge with the same logits.
    peft_model.save_pretrained(tmp_path / "from_peft")
    again = load_model(tmp_path / "base")
    load_lora(again, tmp_path / "from_peft")
    with torch.no_grad():
        assert torch.allclose(again(ids), theirs, atol=1e-4)


def test_peft_adapter_with_separate_qkv_down_projections_loads_exactly(tmp_path):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    model = tiny("llama")
    save(tmp_path / "base", model)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base").eval()
    lora = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "k_proj", "v_proj"], init_lora_weights=False)
    peft_model = peft.get_peft_model(hf, lora).eval()  # random, distinct A per projection
    peft_model.save_pretrained(tmp_path / "adapter")
    load_lora(model, tmp_path / "adapter")
    ids = torch.randint(0, 96, (1, 9))
    with torch.no_grad():
        assert torch.allclose(model(ids), peft_model(ids).logits, atol=1e-4)


def test_bad_lora_settings_name_the_field(tmp_path):
    with pytest.raises(ConfigError, match="'r'"):
        apply_lora(tiny("gpt2"), LoRAConfig(r=0))
    with pytest.raises(ConfigError, match="target_modules"):
        apply_lora(tiny("gpt2"), LoRAConfig(target_modules=["attn.query"]))
    with pytest.raises(ConfigError, match="mlp.gate"):
        apply_lora(tiny("gpt2"), LoRAConfig(target_modules=["mlp.gate"]))
    with pytest.raises(CheckpointError, match="adapter_config.json"):
        load_lora(tiny("gpt2"), tmp_path)
    with pytest.raises(ValueError, match="no LoRA adapters"):
        save_lora(tiny("gpt2"), tmp_path / "x")
    assert isinstance(LoRALinear(torch.nn.Linear(4, 4), 2, 4, 0.1), torch.nn.Linear)
