"""Pretraining recipes end to end: YAML + overrides, the run folder, the CLI and the shipped configs."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from gptforge.config import ConfigError
from gptforge.formatting import round_figure
from gptforge.model import GPT
from gptforge.train.metrics import read_metrics
from gptforge.train.pretrain import load_recipe, model_config, pretrain
from gptforge.loading import load, load_model

REPO = Path(__file__).resolve().parents[2]
TEXT = "".join(f"line {i}: the quick brown fox jumps over the lazy dog.\n" for i in range(300))


def tiny_recipe(tmp_path, **train) -> dict:
    (tmp_path / "corpus.txt").write_text(TEXT)
    return {
        "model": {"preset": "nano", "n_layer": 1, "n_embd": 32, "n_head": 2},
        "data": {"sources": [str(tmp_path / "corpus.txt")], "tokenizer": "char", "seq_len": 32, "batch_size": 4,
                 "eval_tokens": 2000, "dir": str(tmp_path / "data")},
        "train": {"max_steps": 8, "lr": 1e-2, "eval_every": 4, "progress": False, **train},
        "out_dir": str(tmp_path / "run"),
    }


@pytest.mark.parametrize("name", ["shakespeare-char", "stdlib-code", "gpt2-124m"])
def test_shipped_recipes_load(name):
    recipe = load_recipe(REPO / "configs" / f"{name}.yaml", ["--train.max_steps=3"])
    assert recipe.train.max_steps == 3
    config = model_config(recipe, vocab_size=65 if name == "shakespeare-char" else 8192)
    assert config.block_size >= recipe.data.seq_len


def test_unknown_fields_and_bad_values_name_the_field(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe(tmp_path)))
    with pytest.raises(ConfigError, match="train.*lrate"):
        load_recipe(path, ["--train.lrate=1"])
    with pytest.raises(ConfigError, match="data.*seq_length"):
        load_recipe(path, ["--data.seq_length=1"])
    with pytest.raises(ConfigError, match="n_layers"):
        load_recipe(path, ["--model.n_layers=1"])
    with pytest.raises(ConfigError, match="train.warmup_steps"):
        load_recipe(path, ["--train.warmup_steps=-1"])
    with pytest.raises(ConfigError, match="seq_len.*block_size"):
        load_recipe(path, ["--model.block_size=16"])


def test_pretrain_end_to_end(tmp_path):
    run_dir = pretrain(tiny_recipe(tmp_path), overrides=["--train.max_steps=10"])
    records = read_metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 11))
    evals = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in evals] == [0, 4, 8, 10]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 0.5
    assert evals[-1]["val_ppl"] == pytest.approx(2.718281828 ** evals[-1]["val_loss"], rel=1e-6)
    model, tokenizer = load(run_dir / "model")
    assert tokenizer is not None and tokenizer.decode(tokenizer.encode("fox")) == "fox"
    assert model.config.vocab_size == tokenizer.vocab_size
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["train"]["max_steps"] == 10 and saved["model"]["n_embd"] == 32
    assert json.loads((run_dir / "result.json").read_text())["steps"] == 10
    assert (run_dir / "best" / "config.json").is_file() and (run_dir / "loss_curve.png").is_file()
    # Exported HF folder: transformers reads it.
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(run_dir / "model")
    assert hf.config.vocab_size == model.config.vocab_size


def test_pretrain_cli_and_resume_extends_a_run(tmp_path, capsys):
    from gptforge.cli import main

    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe(tmp_path, checkpoint_every=3)))
    assert main(["pretrain", "--config", str(path), "--train.max_steps=6", "--json"]) == 0
    first = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert first["steps"] == 6
    before = (tmp_path / "run" / "config.yaml").read_text()
    assert main(["pretrain", "--config", str(path), "--train.max_steps=99"]) == 2  # no --resume: refused
    assert "--resume" in capsys.readouterr().err
    assert (tmp_path / "run" / "config.yaml").read_text() == before
    assert main(["pretrain", "--config", str(path), "--train.max_steps=9", "--resume"]) == 0
    # For people: sentences with the figures rounded and the paths of the model, curve and metrics.
    run = tmp_path / "run"
    result = json.loads((run / "result.json").read_text())
    captured = capsys.readouterr()
    assert captured.out.startswith(f"Trained 9 steps on {result['tokens']:,} tokens; last training loss ")
    assert f"  model:       {run / 'model'}\n" in captured.out
    assert f"  loss curve:  {run / 'loss_curve.png'}\n" in captured.out
    assert f"  metrics:     {run / 'metrics.jsonl'}" in captured.out
    assert f"validation loss {round_figure(result['metrics']['val_loss'])}, perplexity" in captured.out
    assert "{" not in captured.out and str(result["last_loss"]) not in captured.out  # no raw floats
    evals = re.findall(r"step \d+: val_loss (\S+), perplexity (\S+)", captured.err)
    assert evals and all(len(loss.rstrip(",")) <= 5 for loss, _ in evals), captured.err
    assert " INFO " not in captured.err  # no timestamped log lines without --verbose
    steps = [r["step"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    assert steps == list(range(1, 10))
    assert main(["pretrain", "--config", str(path), "--data.sources=[nowhere.txt]",
                 f"--out_dir={tmp_path / 'other'}", f"--data.dir={tmp_path / 'd2'}"]) == 2
    assert "nowhere.txt" in capsys.readouterr().err


@pytest.mark.slow
def test_ddp_and_fsdp_two_processes_match_one_process_with_accumulation(tmp_path):
    """torchrun, 2 CPU processes (gloo), DDP and FSDP2, accumulation 1 == 1 process, accumulation 2."""
    recipe = tiny_recipe(tmp_path, max_steps=4, eval_every=2, dtype="fp32")
    recipe["model"]["dropout"] = 0.0
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GPTFORGE_NO_PROGRESS": "1"}
    # Prepare once so both runs read the same shards.
    single = subprocess.run([sys.executable, "-m", "gptforge.cli", "pretrain", "--config", str(path),
                             "--train.grad_accum_steps=2", f"--out_dir={tmp_path / 'single'}"],
                            capture_output=True, text=True, env=env, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "-m", "gptforge.cli", "pretrain", "--config", str(path), "--train.grad_accum_steps=1",
                          f"--out_dir={tmp_path / 'ddp'}", "--data.sources=[]"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    fsdp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "gptforge.cli", "pretrain", "--config", str(path), "--train.grad_accum_steps=1",
                           "--train.parallel=fsdp", f"--out_dir={tmp_path / 'fsdp'}", "--data.sources=[]"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert fsdp.returncode == 0, fsdp.stderr[-3000:]

    def curve(name):
        records = read_metrics(tmp_path / name / "metrics.jsonl")
        return ([r["loss"] for r in records if "loss" in r], [r["val_loss"] for r in records if "val_loss" in r],
                [r["tokens"] for r in records if "loss" in r])

    loss_1, val_1, tokens_1 = curve("single")
    loss_2, val_2, tokens_2 = curve("ddp")
    assert len(loss_1) == 4 and tokens_1 == tokens_2 == [256, 512, 768, 1024]
    assert loss_2 == pytest.approx(loss_1, rel=1e-5)
    assert val_2 == pytest.approx(val_1, rel=1e-5)
    assert load_model(tmp_path / "ddp" / "model").config.n_layer == 1
    # FSDP2 shards parameters and optimizer state but computes the same steps.
    loss_3, val_3, _ = curve("fsdp")
    assert loss_3 == pytest.approx(loss_1, rel=1e-5) and val_3 == pytest.approx(val_1, rel=1e-5)
    # The gathered model/ folder holds the trained weights (Adam may amplify float noise in single elements,
    # so compare what the models compute).
    x = torch.arange(32)[None] % 20
    single_logits = load_model(tmp_path / "single" / "model")(x)
    fsdp_logits = load_model(tmp_path / "fsdp" / "model")(x)
    assert torch.allclose(single_logits, fsdp_logits, atol=1e-3)


def test_a_time_budget_sizes_validation_to_its_share(tmp_path):
    """Under train.max_time the first evaluation measures the model and caps data.eval_tokens to fit eval_share."""
    from gptforge.train import distributed as D
    from gptforge.train.loop import TrainConfig
    from gptforge.train.pretrain import ValidationLoss, prepare_data, recipe_from_dict

    recipe = recipe_from_dict(tiny_recipe(tmp_path))
    corpus = prepare_data(recipe, progress=False)
    model = GPT(model_config(recipe, corpus.vocab_size)).eval()
    info = D.DistInfo()
    one_batch = recipe.data.seq_len * recipe.data.batch_size

    tight = ValidationLoss(corpus, recipe.data, TrainConfig(max_time=0.01, eval_share=0.05), info)
    with torch.no_grad():
        first = tight(model)
        assert tight.max_tokens == one_batch  # never less than one batch
        assert tight(model) == first  # later evaluations read the same windows
    roomy = ValidationLoss(corpus, recipe.data, TrainConfig(max_time=1e7), info)
    steps = ValidationLoss(corpus, recipe.data, TrainConfig(max_time=0.01, time_schedule=False), info)
    with torch.no_grad():
        roomy(model), steps(model)
    assert roomy.max_tokens == steps.max_tokens == recipe.data.eval_tokens
