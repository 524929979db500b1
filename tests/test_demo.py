"""`gptforge demo` end to end on a tiny budget: corpus, pretraining, perplexity vs unigram, completions, reuse."""

import json
import math

import numpy as np
import pytest

from gptforge.cli import main
from gptforge.demo import (BASE_MODEL_NOTE, TIME_PLANNED_MAX_STEPS, default_recipe_path, training_overrides,
                           unigram_log_probs)
from gptforge.generate import generate
from gptforge.loading import load

# The shipped recipe, shrunk: a slice of the stdlib, a 2-layer model, a fixed number of steps.
TINY = ["--steps", "60", "--minutes", "5", "--no-progress", "--max-new-tokens", "12",
        "--data.max_bytes=300000", "--data.split=documents", "--data.val_fraction=0.15", "--data.vocab_size=512", "--data.seq_len=64", "--data.batch_size=16",
        "--data.eval_tokens=4096", "--model.n_layer=2", "--model.n_head=2", "--model.n_kv_head=2",
        "--model.n_embd=64", "--model.block_size=64", "--train.lr=0.01", "--train.warmup_steps=5",
        "--train.batch_tokens=0", "--train.grad_accum_steps=1", "--train.checkpoint_every=0"]


def test_unigram_baseline_is_a_smoothed_distribution():
    logp = unigram_log_probs(np.array([0, 0, 1, 3]), vocab_size=5)
    assert np.exp(logp).sum() == pytest.approx(1.0)
    assert np.exp(logp[0]) == pytest.approx(3 / 9)  # (2 + 1) / (4 + 5)
    assert np.exp(logp[4]) == pytest.approx(1 / 9)  # unseen tokens keep some mass


def test_training_is_planned_in_time_unless_steps_are_fixed():
    from gptforge.train.pretrain import load_recipe

    timed = load_recipe(default_recipe_path(), training_overrides(90.0, None, progress=False)).train
    # No step count guessed before the run: the budget ends it, the schedule and evaluations follow it.
    assert timed.time_budgeted and timed.max_time == 90.0 and timed.max_steps == TIME_PLANNED_MAX_STEPS
    assert timed.eval_every == 1 and not timed.progress
    fixed = load_recipe(default_recipe_path(), training_overrides(90.0, 40)).train
    assert not fixed.time_budgeted and fixed.max_steps == 40 and fixed.max_time == 90.0 and fixed.eval_every == 10
    with pytest.raises(ValueError, match="budget"):
        training_overrides(0.0)


@pytest.mark.slow
def test_demo_end_to_end_and_reuse(tmp_path, capsys):
    assert default_recipe_path().is_file(), "configs/stdlib-code.yaml is the demo's recipe"
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), *TINY]) == 0
    printed = capsys.readouterr().out

    report = json.loads((out / "report.json").read_text())
    assert report["steps"] == 60 and report["val_tokens"] > 1000
    assert math.isfinite(report["val_perplexity"])
    assert report["val_perplexity"] < report["unigram_perplexity"], report
    assert f"{report['val_perplexity']:.2f}" in printed and f"{report['unigram_perplexity']:.2f}" in printed

    png = out / "loss_curve.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "metrics.jsonl").is_file()

    model, tokenizer = load(out / "model")
    assert tokenizer is not None and model.config.n_layer == 2
    assert len(generate(model, "def ", tokenizer, max_new_tokens=4, do_sample=False)[0].token_ids) > 0

    # Quality on Python no corpus contains, each figure next to its baseline, and what the corpus kept.
    heldout = report["heldout"]
    assert math.isfinite(heldout["bits_per_byte"]) and heldout["lines"] > 0
    assert heldout["bits_per_byte"] < heldout["unigram_bits_per_byte"], heldout
    assert "bits per byte" in printed and "next-line exact match" in printed and "unigram baseline" in printed
    (selection,) = report["corpus"]
    assert selection["kept_bytes"] <= 300_000 and "literal_data" in selection["dropped"]
    assert "stdlib: kept" in printed and BASE_MODEL_NOTE in printed
    assert report["sampling"]["max_new_tokens"] == 12

    # The recipe trains fill-in-the-middle: held-out lines restored with the code around them, next to the
    # same model without the code after the gap, and the suggested --suffix command runs.
    infill = report["infill"]
    assert infill["cases"] > 0 and 0.0 <= infill["exact_match"] <= 1.0
    assert math.isfinite(infill["bits_per_byte"]) and math.isfinite(infill["prefix_only_bits_per_byte"])
    assert "fill in the middle" in printed and "bits per byte of the line" in printed and "--suffix" in printed
    assert main(["generate", "--model", str(out / "model"), "--prompt", "def area(width, height):\n    ",
                 "--suffix", "\n    return result\n", "--max-new-tokens", "4"]) == 0
    capsys.readouterr()

    assert len(report["completions"]) == 5
    for item in report["completions"]:
        assert f"prompt     | {item['prompt'].splitlines()[0]}" in printed
    assert "gptforge chat --model" in printed and "gptforge serve --model" in printed

    # Re-running reuses the corpus and the model and reports the same perplexity, even when the
    # command line differs: the folder keeps the settings it was trained with (no corpus rebuild).
    manifest = (out / "data" / "manifest.json").read_text()
    assert main(["demo", "--out", str(out), "--no-progress", "--max-new-tokens", "4"]) == 0
    again = capsys.readouterr().out
    assert "reusing the model" in again and "note:" in again and "--fresh" in again
    assert (out / "data" / "manifest.json").read_text() == manifest
    second = json.loads((out / "report.json").read_text())
    assert second["reused_model"] and second["val_perplexity"] == pytest.approx(report["val_perplexity"])


def test_demo_bad_arguments(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--minutes", "0"]) == 2
    assert "--minutes must be positive" in capsys.readouterr().err
    assert main(["demo", "--out", str(tmp_path), "--recipe", str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml" in capsys.readouterr().err
