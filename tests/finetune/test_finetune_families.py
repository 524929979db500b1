"""Fine-tuning every family through the shared loop: full fine-tuning lowers the loss and saves a checkpoint
`transformers` loads as the same architecture; LoRA trains an adapter that `peft` loads on the HF model."""

import pytest
import torch

from finetune_helpers import char_tokenizer, number_words, write_jsonl
from gptforge.finetune.recipe import recipe_from_dict
from gptforge.finetune.runner import finetune, load_finetuned
from gptforge.loading import load_model, save
from hf_families import CASES, hf_model

transformers = pytest.importorskip("transformers")
QUIET = {"progress": False, "weight_decay": 0.0}


def _base(case, tmp_path, tokenizer):
    hf = hf_model(case, vocab_size=128)  # the char tokenizer has 104 tokens
    hf.save_pretrained(tmp_path / "hf")
    save(tmp_path / "base", load_model(tmp_path / "hf"), tokenizer)
    return hf, tmp_path / "base"


def _recipe(base, tmp_path, **extra):
    task = {"name": "words", "data": write_jsonl(tmp_path / "train.jsonl", number_words(256, seed=1)),
            "val_data": write_jsonl(tmp_path / "val.jsonl", number_words(16, seed=2)), "metric": "exact_match",
            "max_new_tokens": 3, "max_eval_examples": 4}
    return recipe_from_dict({"model": str(base), "out_dir": str(tmp_path / "run"), "tasks": [task],
                             "data": {"batch_size": 8, "max_len": 24},
                             "train": {"max_steps": 12, "lr": 3e-3, "warmup_steps": 2, **QUIET}, **extra})


@pytest.mark.parametrize("case", CASES)
def test_full_finetune(case, tmp_path):
    tokenizer = char_tokenizer()
    hf, base = _base(case, tmp_path, tokenizer)
    result = finetune(_recipe(base, tmp_path))
    losses = result.train_result.losses
    assert len(losses) == 12 and sum(losses[-3:]) < sum(losses[:3])
    tuned, _ = load_finetuned(result.model_dir)
    back = transformers.AutoModelForCausalLM.from_pretrained(result.model_dir).eval()
    assert type(back) is type(hf)
    ids = torch.tensor([tokenizer.encode("seven two=")])
    with torch.no_grad():
        assert (back(ids).logits - tuned(ids)).abs().max().item() <= 1e-4
        assert not torch.allclose(tuned(ids), load_model(base)(ids), atol=1e-3)  # training changed the weights


@pytest.mark.parametrize("case", ["gemma2", "phi4-mini", "mixtral"])
def test_lora_finetune_adapter_loads_in_peft(case, tmp_path):
    peft = pytest.importorskip("peft")
    tokenizer = char_tokenizer()
    hf, base = _base(case, tmp_path, tokenizer)
    targets = ["attn.qkv", "attn.out"] + ([] if case == "mixtral" else
                                          ["mlp.gate_up", "mlp.down"] if case == "phi4-mini" else ["mlp.up"])
    result = finetune(_recipe(base, tmp_path, method="lora", lora={"r": 4, "alpha": 8, "target_modules": targets}))
    tuned, _ = load_finetuned(result.model_dir)
    ids = torch.tensor([tokenizer.encode("nine=")])
    with torch.no_grad():
        base_logits = hf(ids).logits
    peft_model = peft.PeftModel.from_pretrained(hf, result.model_dir).eval()  # wraps hf in place
    with torch.no_grad():
        assert (peft_model(ids).logits - tuned(ids)).abs().max().item() <= 1e-4
        assert (peft_model(ids).logits - base_logits).abs().max().item() > 1e-4  # the adapter trained
