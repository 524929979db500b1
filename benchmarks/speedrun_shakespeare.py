"""Char-level tinyshakespeare speedrun: best validation loss within a fixed wall-clock budget.

Runs the shipped recipe `configs/shakespeare-char.yaml` (RoPE, RMSNorm, SwiGLU, longer context,
bigger batches, higher lr with warmup-stable-decay timed to the budget) on 2 threads. Validation is
the last 10% of characters, evaluated over all of it, so the loss is in nats per character. The
budget counts everything from process start (imports, data preparation, evaluations, saving).
Reference on this machine: the nanoGPT "baby" recipe (4 layers, 4 heads, 128 dims, context 64,
batch 12, lr 1e-3, dropout 0) reaches 1.886 after 2,000 iterations in 118 s. `--reference` runs that
recipe through gptforge too, for a same-run comparison.

    python benchmarks/speedrun_shakespeare.py [--text ../shared/data/tinyshakespeare.txt] [--budget 120]
Prints one JSON object: best val loss, the curve (step, seconds, val loss), tokens, load average.
"""

from __future__ import annotations

import time

PROCESS_START = time.perf_counter()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT_TEXT = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"

# nanoGPT's config/train_shakespeare_char.py with the CPU settings of its README ("baby GPT").
REFERENCE = ["model.pos_embedding=learned", "model.norm=layernorm", "model.mlp=gelu", "model.bias=false",
             "model.n_layer=4", "model.n_head=4", "model.n_embd=128", "model.block_size=64",
             "data.seq_len=64", "data.batch_size=12", "train.lr=1e-3", "train.schedule=cosine",
             "train.warmup_steps=100", "train.min_lr_ratio=0.1", "train.beta2=0.99", "train.max_steps=2000",
             "train.time_schedule=false", "train.dtype=fp32", "train.eval_every=250", "train.batch_tokens=0"]


def run(recipe: Path, text: Path, out: Path, budget: float, extra: list[str]) -> dict:
    import torch

    from gptforge.train.metrics import read_metrics
    from gptforge.train.pretrain import load_recipe, pretrain

    torch.set_num_threads(2)
    # Leave room for start-up, the final evaluation and saving inside the budget.
    startup = time.perf_counter() - PROCESS_START
    overrides = [f"data.sources=[{text}]", f"data.dir={out / 'data'}", f"out_dir={out / 'run'}",
                 "train.progress=false", "train.checkpoint_every=0", "data.eval_tokens=0", *extra]
    recipe_obj = load_recipe(recipe, overrides)
    if recipe_obj.train.max_time:
        # The loop's budget covers its final evaluation and saving; 2 s cover start-up jitter and exit.
        recipe_obj.train.max_time = max(10.0, budget - startup - 2.0)
    started = time.perf_counter()
    run_dir = pretrain(recipe_obj)
    finished = time.perf_counter()
    records = read_metrics(run_dir / "metrics.jsonl")
    train_records = [r for r in records if "loss" in r]
    curve, last_elapsed = [], 0.0
    for r in records:
        if "loss" in r:
            last_elapsed = r["elapsed_s"]
        if "val_loss" in r:
            curve.append({"step": r["step"], "s": round(started - PROCESS_START + last_elapsed, 1),
                          "val_loss": round(r["val_loss"], 4)})
    return {
        "best_val_loss": round(min(c["val_loss"] for c in curve), 4),
        "final_val_loss": curve[-1]["val_loss"],
        "steps": train_records[-1]["step"] if train_records else 0,
        "tokens": train_records[-1]["tokens"] if train_records else 0,
        "wall_s": round(finished - PROCESS_START, 1),
        "startup_s": round(started - PROCESS_START, 1),
        "curve": curve,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--text", type=Path, default=DEFAULT_TEXT, help="path to tinyshakespeare.txt")
    ap.add_argument("--recipe", type=Path, default=REPO / "configs" / "shakespeare-char.yaml")
    ap.add_argument("--budget", type=float, default=120.0, help="wall-clock seconds, start-up included")
    ap.add_argument("--reference", action="store_true", help="run the nanoGPT baby recipe instead")
    ap.add_argument("overrides", nargs="*", help="extra section.key=value recipe overrides")
    args = ap.parse_args()
    if not args.text.is_file():
        sys.exit(f"tinyshakespeare text not found: {args.text} (pass --text PATH)")
    load_before = os.getloadavg()
    extra = (REFERENCE if args.reference else []) + args.overrides
    with tempfile.TemporaryDirectory(prefix="speedrun-") as tmp:
        result = run(args.recipe, args.text, Path(tmp), args.budget, extra)
    result = {"benchmark": "speedrun_shakespeare", "recipe": "nanogpt-baby (reference)" if args.reference
              else str(args.recipe.relative_to(REPO) if args.recipe.is_relative_to(REPO) else args.recipe),
              "budget_s": args.budget, "target": 1.70, "reference_val_loss": 1.886, **result,
              "unit": "nats/char (val = last 10% of characters)", "threads": 2,
              "loadavg_before": [round(x, 2) for x in load_before],
              "loadavg_after": [round(x, 2) for x in os.getloadavg()],
              "machine": f"{platform.machine()}, {os.cpu_count()} cores",
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
