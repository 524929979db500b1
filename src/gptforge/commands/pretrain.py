"""`gptforge pretrain --config configs/X.yaml [--resume] [--section.key=value ...]` (also under torchrun)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="YAML recipe with model / data / train sections")
    parser.add_argument("--resume", action="store_true", help="continue exactly from the run's latest checkpoint")
    parser.add_argument("--json", action="store_true",
                        help="end with a JSON summary (for scripts) instead of sentences")
    parser.epilog = ("Override any recipe field with --section.key=value, e.g. --train.max_steps=200 "
                     "--data.sources=[notes.txt] --out_dir=runs/x. Multi-process: torchrun --nproc_per_node N "
                     "-m gptforge.cli pretrain --config ...")


def run(args: argparse.Namespace) -> int:
    from . import short_spin_openmp

    short_spin_openmp()  # before torch loads: long spinning costs a shared machine (see there)
    from ..train.pretrain import load_recipe, pretrain

    recipe = load_recipe(args.config, getattr(args, "overrides", []))
    run_dir = Path(pretrain(recipe, resume=args.resume))
    result_file = run_dir / "result.json"
    if int(os.environ.get("RANK", "0")) != 0 or not result_file.is_file():
        return 0  # under torchrun, rank 0 reports
    result = json.loads(result_file.read_text(encoding="utf-8"))
    if args.json:
        print(json.dumps({"run_dir": str(run_dir), **{k: result[k] for k in ("steps", "last_loss", "best_metric")}}))
    else:
        print(describe_run(run_dir, result, recipe.train.early_stopping_metric))
    if result.get("interrupted"):
        print(f"Interrupted at step {result['steps']}: continue with the same command and --resume.", file=sys.stderr)
        return 130
    return 0


def describe_run(run_dir: Path, result: dict[str, Any], best_metric_name: str) -> str:
    """Where the model, loss curve and metrics of a finished run are, and how it did, as sentences."""
    from ..formatting import metric_phrase, round_figure

    sentence = (f"Trained {result['steps']:,} steps on {result.get('tokens', 0):,} tokens"
                f"{' (stopped early: no more improvement)' if result.get('stopped_early') else ''}; "
                f"last training loss {round_figure(result['last_loss'])}")
    metrics = result.get("metrics") or {}
    if metrics:
        sentence += ", validation " + ", ".join(metric_phrase("loss" if k == "val_loss" else k, v)
                                                for k, v in metrics.items())
    lines = [sentence + "."]
    model = run_dir / "model"
    lines.append(f"  model:       {model}")
    if (run_dir / "best").is_dir() and result.get("best_step") not in (None, result["steps"]):
        lines.append(f"  best model:  {run_dir / 'best'} ({metric_phrase(best_metric_name, result['best_metric'])} "
                     f"at step {result['best_step']})")
    png = run_dir / "loss_curve.png"
    if png.is_file():
        lines.append(f"  loss curve:  {png}")
    lines.append(f"  metrics:     {run_dir / 'metrics.jsonl'} (one JSON record per step and evaluation)")
    lines.append(f"  checkpoints: {run_dir / 'checkpoints'} (continue training with --resume)")
    lines.append(f"Next, try it: gptforge generate --model {model} --prompt \"...\" --max-new-tokens 32")
    return "\n".join(lines)
