"""`gptforge pretrain --config configs/X.yaml [--resume] [--section.key=value ...]` (also under torchrun)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="YAML recipe with model / data / train sections")
    parser.add_argument("--resume", action="store_true", help="continue exactly from the run's latest checkpoint")
    parser.epilog = ("Override any recipe field with --section.key=value, e.g. --train.max_steps=200 "
                     "--data.sources=[notes.txt] --out_dir=runs/x. Multi-process: torchrun --nproc_per_node N "
                     "-m gptforge.cli pretrain --config ...")


def run(args: argparse.Namespace) -> int:
    from ..train.pretrain import load_recipe, pretrain

    recipe = load_recipe(args.config, getattr(args, "overrides", []))
    run_dir = pretrain(recipe, resume=args.resume)
    result_file = Path(run_dir) / "result.json"
    if result_file.is_file():
        result = json.loads(result_file.read_text(encoding="utf-8"))
        print(json.dumps({"run_dir": str(run_dir), **{k: result[k] for k in ("steps", "last_loss", "best_metric")}}))
        if result.get("interrupted"):
            print("interrupted: continue with --resume", file=sys.stderr)
            return 130
    return 0
