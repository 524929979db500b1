"""Preference tuning: pair data, DPO/ORPO losses against TRL, the loop (resume), the CLI and the run folder."""

import contextlib
import copy
import json
import random
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from finetune_helpers import write_jsonl
from gptforge.cli import main
from gptforge.data.preference import collate_pairs, encode_pair, render_pair
from gptforge.data.records import Record
from gptforge.errors import ConfigError, DataError
from gptforge.finetune.preference import PreferenceObjective, PreferenceSettings, ReferenceModel, sequence_logps
from gptforge.finetune.recipe import load_recipe, recipe_from_dict
from gptforge.finetune.runner import finetune

transformers = pytest.importorskip("transformers")
REPO = Path(__file__).resolve().parents[2]


def arithmetic_pairs(n: int, seed: int) -> list[dict]:
    """'3+4=' -> chosen '7', rejected a wrong two-digit sum: a preference the model can learn."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        out.append({"prompt": f"{a}+{b}=", "chosen": str(a + b), "rejected": str(rng.randint(20, 99))})
    return out


# ---- data ---------------------------------------------------------------------------------------------

def test_text_and_chat_pairs_share_the_prompt_and_mask_it(tokenizer):
    text = Record({"prompt": "Q: hi\nA:", "chosen": " hello", "rejected": " go"}, "p.jsonl", 1)
    pair = encode_pair(text, tokenizer, 64)
    n_prompt = len(tokenizer.encode("Q: hi\nA:"))
    assert pair.chosen.input_ids[:n_prompt] == pair.rejected.input_ids[:n_prompt]
    assert not any(pair.chosen.train_mask[:n_prompt]) and all(pair.chosen.train_mask[n_prompt:])
    assert pair.chosen.input_ids[-1] == tokenizer.eos_token_id  # EOS ends (and is trained on) each answer

    explicit = Record({"prompt": [{"role": "user", "content": "hi"}],
                       "chosen": [{"role": "assistant", "content": "hello"}], "rejected": "go"}, "c.jsonl", 2)
    implicit = Record({"chosen": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
                       "rejected": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "go"}]},
                      "c.jsonl", 3)
    assert render_pair(explicit, tokenizer) == render_pair(implicit, tokenizer)
    chosen, rejected = render_pair(explicit, tokenizer)
    assert chosen[0].text == tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])
    assert not chosen[0].train and chosen[1].train and chosen[1].text.startswith("hello")
    assert rejected[1].text.startswith("go")

    batch = collate_pairs([pair, encode_pair(text, tokenizer, 64)], tokenizer.pad_token_id)
    assert batch["input_ids"].shape[0] == 4 and batch["labels"].shape == batch["input_ids"].shape


@pytest.mark.parametrize("data,field", [
    ({"prompt": "x", "chosen": "a"}, "rejected"),
    ({"prompt": "x", "chosen": "", "rejected": "b"}, "chosen"),
    ({"prompt": [{"role": "user"}], "chosen": "a", "rejected": "b"}, "prompt[0]"),
    ({"prompt": [{"role": "robot", "content": "x"}], "chosen": "a", "rejected": "b"}, "prompt[0].role"),
    ({"chosen": [{"role": "user", "content": "x"}], "rejected": [{"role": "user", "content": "y"}]}, "chosen"),
    ({"prompt": "x", "chosen": 3, "rejected": "b"}, "chosen"),
])
def test_bad_pairs_name_file_line_and_field(tokenizer, data, field):
    with pytest.raises(DataError) as err:
        encode_pair(Record(data, "prefs.jsonl", 7), tokenizer, 64)
    assert "prefs.jsonl:7" in str(err.value) and repr(field) in str(err.value)


def test_recipe_checks_the_objective(base_model, tmp_path):
    data = write_jsonl(tmp_path / "p.jsonl", arithmetic_pairs(4, 0))
    base = {"model": str(base_model), "tasks": [{"data": data}], "train": {"max_steps": 1}}
    for extra, message in [({"objective": "ppo"}, "objective"), ({"objective": "dpo", "head": "classification"}, "head"),
                           ({"objective": "dpo", "preference": {"beta": 0}}, "preference.beta"),
                           ({"objective": "orpo", "preference": {"loss": "ipo"}}, "preference.loss"),
                           ({"objective": "dpo", "preference": {"label_smoothing": 0.7}}, "label_smoothing"),
                           ({"objective": "dpo", "data": {"packing": True}}, "packing"),
                           ({"tasks": [{"data": data, "format": "preference"}]}, "objective: dpo")]:
        with pytest.raises(ConfigError, match=message):
            recipe_from_dict({**base, **extra})
    with pytest.raises(DataError, match="--objective dpo"):  # SFT on preference data says what to do
        finetune(recipe_from_dict({**base, "out_dir": str(tmp_path / "sft")}))


# ---- the losses against TRL ---------------------------------------------------------------------------

def _hf_pair(tokenizer, tmp_path):
    """A random-init tiny Llama and the same weights as a gptforge model (no dropout)."""
    from gptforge.loading import load_model

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=128, tie_word_embeddings=False)
    hf = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    hf.save_pretrained(tmp_path / "hf")
    return hf, load_model(tmp_path / "hf")


def _our_grads_as_hf(model) -> dict[str, torch.Tensor]:
    from gptforge.interop.hf import state_to_hf

    grads = {name: p.grad for name, p in model.named_parameters()}
    return state_to_hf(grads, model.config, "llama")


@pytest.mark.slow
@pytest.mark.parametrize("loss_type,beta", [("sigmoid", 0.1), ("sigmoid", 0.5), ("ipo", 0.1)])
def test_dpo_loss_and_gradients_equal_trls_dpo_trainer(tokenizer, tmp_path, loss_type, beta):
    """TRL's DPOTrainer.compute_loss and ours on the same tiny model, batch and beta: loss and every
    gradient within 1e-5. The batch is tokenized by each side from the same strings (they must agree)."""
    trl = pytest.importorskip("trl")
    import datasets
    from transformers import PreTrainedTokenizerFast

    hf, ours = _hf_pair(tokenizer, tmp_path)
    # TRL's policy trains after one step of ours would differ, so the reference is a frozen copy on both sides
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend, eos_token=tokenizer.eos_token,
                                     pad_token=tokenizer.pad_token)
    rows = arithmetic_pairs(4, 1) + [{"prompt": "Say hi: ", "chosen": "hello there", "rejected": "no"}]
    args = trl.DPOConfig(output_dir=str(tmp_path / "trl"), beta=beta, loss_type=[loss_type],
                         per_device_train_batch_size=len(rows), report_to=[], use_cpu=True, bf16=False, fp16=False,
                         max_length=None, precompute_ref_log_probs=False, dataset_num_proc=None, seed=0)
    trainer = trl.DPOTrainer(model=hf, ref_model=copy.deepcopy(hf).eval(), args=args, processing_class=hf_tok,
                             train_dataset=datasets.Dataset.from_list(rows))
    trl_batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(rows))])
    trainer.model.train()
    trl_loss = trainer.compute_loss(trainer.model, trl_batch)
    trl_loss.backward()
    trl_grads = {name: p.grad for name, p in trainer.model.named_parameters()}

    pairs = [encode_pair(Record(r, "rows", i), tokenizer, 128) for i, r in enumerate(rows)]
    for pair, i in zip(pairs, range(len(rows))):  # our tokenization equals TRL's
        example = trainer.train_dataset[i]
        assert pair.chosen.input_ids == example["prompt_ids"] + example["chosen_ids"]
        assert pair.rejected.input_ids == example["prompt_ids"] + example["rejected_ids"]
    batch = collate_pairs(pairs, tokenizer.pad_token_id)
    objective = PreferenceObjective("dpo", PreferenceSettings(beta=beta, loss=loss_type), ReferenceModel(ours))
    ours.train()
    loss_sum, metrics = objective.loss(ours, batch, contextlib.nullcontext)
    loss = loss_sum / objective.count(batch)
    loss.backward()
    assert abs(loss.item() - trl_loss.item()) < 1e-5, (loss.item(), trl_loss.item())
    ours_hf = _our_grads_as_hf(ours)
    assert set(ours_hf) == {k for k, g in trl_grads.items() if g is not None}
    worst = max((ours_hf[k] - trl_grads[k]).abs().max().item() for k in ours_hf)
    assert worst < 1e-5, worst
    assert float(loss) > 0 and any(g.abs().max() > 1e-4 for g in ours_hf.values())  # not a vacuous match
    trl_metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    n = objective.count(batch)
    assert metrics["reward_margin"].item() / n == pytest.approx(trl_metrics["rewards/margins"], abs=1e-5)
    assert metrics["logps_chosen"].item() / n == pytest.approx(trl_metrics["logps/chosen"], abs=1e-4)


def test_sequence_logps_equal_a_direct_log_softmax():
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 11)
    labels = torch.tensor([[1, 2, -100, 4, -100], [-100, -100, 0, 10, 3], [5, 5, 5, 5, 5]])
    total, count = sequence_logps(logits, labels)
    logp = torch.log_softmax(logits, -1)
    expected = torch.stack([sum(logp[r, t, labels[r, t]] for t in range(5) if labels[r, t] != -100)
                            for r in range(3)])
    assert torch.allclose(total, expected, atol=1e-6) and count.tolist() == [3, 3, 5]


def test_orpo_odds_ratio_term_equals_trls():
    """ORPO's odds-ratio term against TRL's `ORPOTrainer.odds_ratio_loss` on the same per-token averages."""
    pytest.importorskip("trl")
    from trl.experimental.orpo.orpo_trainer import ORPOTrainer

    torch.manual_seed(0)
    sums = -torch.rand(8) * 20 - 0.5
    lengths = torch.tensor([3, 5, 2, 7, 4, 4, 9, 1])
    objective = PreferenceObjective("orpo", PreferenceSettings(beta=0.25))
    losses, metrics = objective.pair_losses(sums, lengths, None)
    means = sums / lengths
    fake = SimpleNamespace(beta=0.25, accelerator=SimpleNamespace(device="cpu"))
    trl_terms, trl_chosen, trl_rejected, _, _ = ORPOTrainer.odds_ratio_loss(fake, means[:4], means[4:])
    assert torch.allclose(metrics["log_odds_ratio"] * 0.25, trl_terms, atol=1e-6)
    assert torch.allclose(losses, -means[:4] - trl_terms, atol=1e-6)  # loss = chosen NLL - beta * term
    assert torch.allclose(metrics["rewards_chosen"], trl_chosen) and torch.allclose(metrics["rewards_rejected"], trl_rejected)


def test_label_smoothing_is_conservative_dpo():
    ref = torch.zeros(4)
    sums = torch.tensor([-2.0, -1.0, -3.0, -1.5])
    plain = PreferenceObjective("dpo", PreferenceSettings(beta=0.5), SimpleNamespace())
    smooth = PreferenceObjective("dpo", PreferenceSettings(beta=0.5, label_smoothing=0.2), SimpleNamespace())
    z = 0.5 * (sums[:2] - sums[2:])
    (l0, _), (l1, _) = plain.pair_losses(sums, torch.ones(4), ref), smooth.pair_losses(sums, torch.ones(4), ref)
    assert torch.allclose(l0, -torch.nn.functional.logsigmoid(z))
    assert torch.allclose(l1, 0.8 * -torch.nn.functional.logsigmoid(z) + 0.2 * -torch.nn.functional.logsigmoid(-z))


def test_lora_reference_is_the_base_model(tokenizer):
    from gptforge.finetune.lora import LoRAConfig, apply_lora
    from gptforge.model import GPT

    model = GPT.from_config("nano", vocab_size=tokenizer.vocab_size, block_size=32)
    ids = torch.randint(0, tokenizer.vocab_size, (2, 8))
    labels = ids.roll(-1, 1)
    with torch.no_grad():
        base = sequence_logps(model(ids), labels)[0]
    apply_lora(model, LoRAConfig(r=4, target_modules=["attn.qkv", "mlp.up"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_()  # a trained adapter changes the model...
        assert not torch.allclose(sequence_logps(model(ids), labels)[0], base)
    reference = ReferenceModel(model)  # ...the reference is the base: adapters off, and no copy
    assert torch.allclose(reference.logps(ids, labels, contextlib.nullcontext), base, atol=1e-5)
    assert reference.model is model and model.training  # the policy's mode is left as it was


# ---- runs ---------------------------------------------------------------------------------------------

def test_dpo_run_resumes_exactly(base_model, tmp_path):
    data = write_jsonl(tmp_path / "p.jsonl", arithmetic_pairs(24, 0))
    common = {"model": str(base_model), "objective": "dpo", "tasks": [{"data": data, "val_fraction": 0.25}],
              "data": {"batch_size": 4, "max_len": 16}, "train": {"lr": 3e-3, "progress": False, "max_steps": 6, "schedule": "constant"}}
    # constant lr: the first part's shorter max_steps does not change the schedule the steps see
    straight = finetune(recipe_from_dict({**common, "out_dir": str(tmp_path / "a")}))
    first = recipe_from_dict({**common, "out_dir": str(tmp_path / "b"),
                              "train": {**common["train"], "max_steps": 3}})
    finetune(first)
    resumed = finetune(recipe_from_dict({**common, "out_dir": str(tmp_path / "b")}), resume=True)
    assert resumed.train_result.losses == straight.train_result.losses[3:]
    records = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert steps[0]["loss"] == pytest.approx(0.6931, abs=1e-3)  # policy == reference at the start: log 2
    assert all({"reward_margin", "reward_accuracy", "logps_chosen", "logps_rejected"} <= set(r) for r in steps)


@pytest.mark.slow
@pytest.mark.parametrize("objective,method", [("dpo", "full"), ("dpo", "lora"), ("orpo", "full")])
def test_cli_preference_run_prefers_the_chosen_answers(base_model, tmp_path, capsys, objective, method):
    train = write_jsonl(tmp_path / "train.jsonl", arithmetic_pairs(64, 0))
    val = write_jsonl(tmp_path / "val.jsonl", arithmetic_pairs(16, 99))
    out = tmp_path / "run"
    code = main(["finetune", "--model", str(base_model), "--data", train, "--out", str(out), "--objective", objective,
                 "--method", method, "--tasks.0.val_data=" + val, "--train.max_steps=24", "--train.lr=3e-3",
                 "--train.eval_every=12", "--train.progress=false", "--data.batch_size=8", "--data.max_len=16",
                 "--lora.r=8", "--lora.target_modules=[attn.qkv, attn.out, mlp.up, mlp.down]"])
    assert code == 0
    report = json.loads((out / "eval.json").read_text())
    before, after = report["before"], report["val"]
    assert report["objective"] == objective and report["train_pairs"] == 64 and report["val_pairs"] == 16
    assert after["val_reward_margin"] > before["val_reward_margin"]
    assert after["val_reward_accuracy"] >= 0.75 and after["val_reward_accuracy"] > before["val_reward_accuracy"] or \
        objective == "orpo" and after["val_reward_accuracy"] >= before["val_reward_accuracy"]
    assert (after["val_logps_chosen"] - after["val_logps_rejected"]) > \
        (before["val_logps_chosen"] - before["val_logps_rejected"])
    assert (out / "reward_margin.png").stat().st_size > 10_000
    printed = capsys.readouterr().out
    assert "held-out pairs" in printed and "reward margin curve" in printed
    from gptforge.finetune.runner import load_finetuned

    model, tok = load_finetuned(out / "model")  # adapter or full model: loads for serving
    assert tok is not None and model is not None


def test_dpo_feedback_recipe_trains_on_exported_feedback(base_model, tmp_path, capsys):
    """configs/dpo-feedback.yaml: LoRA DPO from what `gptforge feedback export` writes (chat prompts), via the CLI."""
    from gptforge.feedback.store import Feedback, FeedbackStore

    recipe_path = REPO / "configs" / "dpo-feedback.yaml"
    recipe = load_recipe(recipe_path, model=str(base_model), data_files=["prefs.jsonl"])
    assert (recipe.method, recipe.objective, recipe.tasks[0].format) == ("lora", "dpo", "preference")
    assert recipe.preference.beta == 0.1 and recipe.preference.loss == "sigmoid" and recipe.train.lr == 1e-4
    store = FeedbackStore.open(tmp_path / "feedback.db")
    try:
        for pair in arithmetic_pairs(12, 0):  # side-by-side picks on the chat page
            store.record(Feedback(model="m", endpoint="chat", prompt=[{"role": "user", "content": pair["prompt"]}],
                                  completions=[pair["rejected"], pair["chosen"]], chosen=pair["chosen"],
                                  rejected=pair["rejected"]))
    finally:
        store.close()
    prefs, out = tmp_path / "prefs.jsonl", tmp_path / "run"
    assert main(["feedback", "export", "--db", str(tmp_path / "feedback.db"), "--out", str(prefs)]) == 0
    code = main(["finetune", "--config", str(recipe_path), "--model", str(base_model), "--data", str(prefs),
                 "--out", str(out), "--train.max_steps=2", "--train.eval_every=2", "--train.warmup_steps=0",
                 "--train.progress=false", "--data.batch_size=4", "--data.max_len=40", "--tasks.0.val_fraction=0.25"])
    assert code == 0
    report = json.loads((out / "eval.json").read_text())
    assert report["objective"] == "dpo" and report["train_pairs"] == 9 and report["val_pairs"] == 3
    assert {"val_reward_accuracy", "val_reward_margin"} <= set(report["val"])
    assert (out / "model" / "adapter_model.safetensors").is_file()  # LoRA: the adapters, not a full copy
    assert (out / "reward_margin.png").stat().st_size > 0
