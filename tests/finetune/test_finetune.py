"""End to end: fine-tuning through the shared loop (full, LoRA + merge, classification head), multi-task
validation metrics, early stopping, and the CLI's errors for bad data."""

import json

import pytest
import torch

from finetune_helpers import number_words, sorted_digits, write_jsonl
from gptforge.cli import main
from gptforge.data.sft import IGNORE_INDEX
from gptforge.finetune.mixture import MultiTaskSource
from gptforge.finetune.recipe import TaskRecipe, recipe_from_dict
from gptforge.finetune.runner import build_task, finetune, load_finetuned
from gptforge.generate import generate
from gptforge.loading import load_model

QUIET = {"progress": False, "weight_decay": 0.0}


def sorted_task(tmp_path, n_train=1200):
    train = write_jsonl(tmp_path / "train.jsonl", sorted_digits(n_train, seed=1))
    val = write_jsonl(tmp_path / "val.jsonl", sorted_digits(64, seed=2))
    return {"name": "sorted", "data": train, "val_data": val, "test_data": val, "format": "classification",
            "labels": ["yes", "no"], "prompt": "{text}?"}


def test_full_finetune_learns_number_words_with_completion_only_loss(tmp_path, base_model, tokenizer):
    task_cfg = {"name": "words", "data": write_jsonl(tmp_path / "train.jsonl", number_words(1500, seed=1)),
                "val_data": write_jsonl(tmp_path / "val.jsonl", number_words(64, seed=2)),
                "metric": "exact_match", "max_new_tokens": 4}
    # The loss sees only the completion (the digits) and EOS; never the number words of the prompt.
    task = build_task(TaskRecipe(**task_cfg), tokenizer)
    source = MultiTaskSource([task], tokenizer, batch_size=16, max_len=32, probabilities=[1.0])
    x, y = source.next_batch()
    for row_x, row_y in zip(x, y):
        targets = tokenizer.decode([t for t in row_y.tolist() if t != IGNORE_INDEX])
        assert targets[:-len("<|endoftext|>")].isdigit() and targets.endswith("<|endoftext|>")
        prompt_len = tokenizer.decode(row_x.tolist()).index("=") + 1
        assert (row_y[:prompt_len - 1] == IGNORE_INDEX).all()
        assert (row_y[prompt_len - 1:] != IGNORE_INDEX).sum() == len(targets) - len("<|endoftext|>") + 1

    recipe = recipe_from_dict({
        "model": str(base_model), "out_dir": str(tmp_path / "run"), "tasks": [task_cfg],
        "data": {"batch_size": 32, "max_len": 32},
        "train": {"max_steps": 150, "lr": 1e-2, "warmup_steps": 10, **QUIET}})
    result = finetune(recipe)
    assert result.val["words/exact_match"] >= 0.9, result.val
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()
    assert (tmp_path / "run" / "loss_curve.png").is_file()
    tuned, tokenizer = load_finetuned(tmp_path / "run" / "model")
    out = generate(tuned, ["three one=", "nine="], tokenizer, max_new_tokens=4, do_sample=False)
    assert [o.text for o in out] == ["31", "9"]


def test_lora_cli_with_merge_and_merge_lora_command(tmp_path, base_model):
    task_cfg = sorted_task(tmp_path, n_train=64)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(json.dumps({"tasks": [task_cfg], "lora": {"r": 4, "alpha": 8, "target_modules":
                                                                ["attn.qkv", "attn.out", "mlp.up"]},
                                  "data": {"batch_size": 8, "max_len": 32}}))
    code = main(["finetune", "--model", str(base_model), "--config", str(recipe), "--out", str(tmp_path / "lora"),
                 "--method", "lora", "--merge", "--train.max_steps=6", "--train.lr=1e-2", "--train.progress=false"])
    assert code == 0
    adapter = tmp_path / "lora" / "model"
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= {p.name for p in adapter.iterdir()}
    assert not (adapter / "model.safetensors").exists()  # only the adapter is saved
    with_adapter, _ = load_finetuned(adapter)
    base = load_model(base_model)
    ids = torch.randint(0, 90, (2, 12))
    with torch.no_grad():
        adapted = with_adapter(ids)
        assert not torch.allclose(adapted, base(ids), atol=1e-4)  # training moved the adapter
        assert torch.allclose(load_model(tmp_path / "lora" / "merged")(ids), adapted, atol=1e-5)
    assert main(["merge-lora", "--adapter", str(adapter), "--out", str(tmp_path / "merged2")]) == 0
    with torch.no_grad():
        assert torch.allclose(load_model(tmp_path / "merged2")(ids), adapted, atol=1e-5)


def test_multitask_run_reports_per_task_metrics(tmp_path, base_model):
    words = ["zero", "one", "two", "three"]
    numbers = [{"prompt": f"{w}=", "completion": str(i)} for i, w in enumerate(words)] * 4
    recipe = recipe_from_dict({
        "model": str(base_model), "out_dir": str(tmp_path / "multi"),
        "tasks": [{**sorted_task(tmp_path, n_train=32), "weight": 1.0},
                  {"name": "numbers", "data": write_jsonl(tmp_path / "n.jsonl", numbers), "val_fraction": 0.25,
                   "metric": "exact_match", "max_new_tokens": 3, "weight": 3.0}],
        "data": {"batch_size": 8, "max_len": 32, "mixing": "weights"}, "dropout": 0.1,
        "train": {"max_steps": 4, "lr": 1e-3, **QUIET}})
    result = finetune(recipe)
    assert {"sorted/accuracy", "sorted/val_loss", "numbers/exact_match", "numbers/val_loss", "val_loss"} <= set(result.val)
    assert result.val["val_loss"] == pytest.approx((result.val["sorted/val_loss"] + result.val["numbers/val_loss"]) / 2)
    assert result.test["numbers"]["drawn"] > result.test["sorted"]["drawn"]  # weight 3 vs 1
    metrics = [json.loads(line) for line in (tmp_path / "multi" / "metrics.jsonl").read_text().splitlines()]
    assert any("numbers/exact_match" in m for m in metrics)


def test_early_stopping_on_the_validation_metric(tmp_path, base_model):
    recipe = recipe_from_dict({
        "model": str(base_model), "out_dir": str(tmp_path / "es"), "tasks": [{**sorted_task(tmp_path, n_train=32), "test_data": None, "max_eval_examples": 8}],
        "data": {"batch_size": 4, "max_len": 32},
        # An improvement must beat min_delta; none can, so patience runs out after two evaluations.
        "train": {"max_steps": 50, "lr": 1e-4, "eval_every": 1, "early_stopping_patience": 2,
                  "early_stopping_metric": "sorted/val_loss", "early_stopping_min_delta": 100.0, **QUIET}})
    result = finetune(recipe)
    assert result.stopped_early and result.steps == 2
    assert json.loads((tmp_path / "es" / "eval.json").read_text())["best_step"] == 0


def test_classification_head_trains_and_reloads(tmp_path, base_model):
    recipe = recipe_from_dict({
        "model": str(base_model), "out_dir": str(tmp_path / "head"), "head": "classification", "method": "lora",
        "lora": {"r": 4, "alpha": 8}, "tasks": [sorted_task(tmp_path, n_train=64)],
        "data": {"batch_size": 8, "max_len": 32}, "train": {"max_steps": 3, "lr": 1e-3, **QUIET}})
    result = finetune(recipe)
    assert 0.0 <= result.val["sorted/accuracy"] <= 1.0 and "sorted/val_loss" in result.val
    folder = tmp_path / "head" / "model"
    assert {"classifier.safetensors", "classifier.json", "adapter_model.safetensors"} <= {p.name for p in folder.iterdir()}
    reloaded, tokenizer = load_finetuned(folder)
    assert reloaded.labels == ["yes", "no"]
    ids = tokenizer.encode("0123?")
    assert reloaded.predict([ids])[0] in ("yes", "no")


def test_cli_bad_data_exits_2_naming_file_line_and_field(tmp_path, base_model, capsys):
    rows = sorted_digits(4, seed=0) + [{"text": "123", "label": "maybe"}]
    data = write_jsonl(tmp_path / "bad.jsonl", rows)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(json.dumps({"tasks": [{"format": "classification", "labels": ["yes", "no"]}]}))
    code = main(["finetune", "--model", str(base_model), "--data", data, "--config", str(recipe),
                 "--out", str(tmp_path / "x")])
    assert code == 2
    err = capsys.readouterr().err
    assert "bad.jsonl:5 field 'label': label 'maybe' is not in the label list" in err
    assert not (tmp_path / "x").exists()  # nothing was started or written
    code = main(["finetune", "--model", str(base_model), "--data", data, "--train.nope=1"])
    assert code == 2 and "nope" in capsys.readouterr().err
