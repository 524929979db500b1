"""LoRA on every family: `peft` loads our adapter on the `transformers` model with equal logits, PEFT's own
adapter loads back into gptforge, and a merged model saves as a checkpoint `transformers` reads."""

import pytest
import torch

from gptforge.finetune.lora import LORA_TARGETS, LoRAConfig, apply_lora, load_lora, lora_modules, merge_lora, save_lora
from gptforge.loading import load_model, save
from hf_families import CASES, VOCAB, hf_model

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


def _targets(model) -> list[str]:
    """Every target the model offers (MoE models: attention only, see the test below)."""
    names = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    found = [t for t in LORA_TARGETS if any(n.endswith("." + t) for n in names)]
    return [t for t in found if not (model.config.n_expert and t.startswith("mlp."))]


@pytest.mark.parametrize("case", CASES)
def test_peft_loads_our_adapter_and_we_load_peft_s(case, tmp_path):
    hf_model(case).save_pretrained(tmp_path / "base")
    model = load_model(tmp_path / "base")
    targets = _targets(model)
    assert {"attn.qkv", "attn.out"} <= set(targets)
    apply_lora(model, LoRAConfig(r=4, alpha=8, target_modules=targets))
    with torch.no_grad():
        for module in lora_modules(model).values():
            module.lora_B.normal_(std=0.2)  # a fresh adapter is the identity; make it do something
    save_lora(model, tmp_path / "adapter", base_model=str(tmp_path / "base"))

    ids = torch.randint(0, VOCAB, (2, 12))
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base").eval()
    with torch.no_grad():
        base = hf(ids).logits
    peft_model = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    with torch.no_grad():
        theirs, ours = peft_model(ids).logits, model(ids)
    assert (ours - theirs).abs().max().item() <= 1e-4
    assert (theirs - base).abs().max().item() > 1e-2  # the adapter changed the model

    peft_model.save_pretrained(tmp_path / "from_peft")
    again = load_lora(load_model(tmp_path / "base"), tmp_path / "from_peft")
    with torch.no_grad():
        assert (again(ids) - theirs).abs().max().item() <= 1e-4

    save(tmp_path / "merged", merge_lora(model))
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        assert (merged(ids).logits - theirs).abs().max().item() <= 1e-4


@pytest.mark.parametrize("case", ["mixtral", "qwen3_moe"])
def test_moe_models_offer_attention_targets_only(case, tmp_path):
    # PEFT maps gate/up/down_proj targets of an MoE model onto the fused expert weights, even where a layer is
    # dense (Qwen3-MoE mlp_only_layers), so an MLP adapter could not load there: refused, with the reason.
    from gptforge.config import ConfigError

    hf_model(case).save_pretrained(tmp_path)
    model = load_model(tmp_path)
    with pytest.raises(ConfigError, match="mixture-of-experts layers offer no MLP targets"):
        apply_lora(model, LoRAConfig(target_modules=["attn.qkv", "mlp.up"]))
