"""`gptforge finetune`: full or LoRA fine-tuning on instruction, chat or task data; several files = multi-task.

    gptforge finetune --model runs/base/model --data train.jsonl [--config configs/finetune-lora.yaml] \
        [--out runs/ft] [--method lora] [--objective dpo] [--merge] [--resume] [--train.lr=1e-4 --lora.r=16 ...]
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="model folder to fine-tune (overrides the recipe's 'model')")
    parser.add_argument("--data", default=None,
                        help="training file(s), comma-separated (JSONL/JSON/CSV/Parquet, or hf:NAME[:SPLIT]); "
                             "one task per file, matched in order to the recipe's tasks when it has some")
    parser.add_argument("--config", default=None, help="recipe YAML (configs/finetune-*.yaml)")
    parser.add_argument("--out", default=None, help="run folder (overrides the recipe's 'out_dir')")
    parser.add_argument("--method", choices=("full", "lora"), default=None, help="full fine-tuning or LoRA adapters")
    parser.add_argument("--objective", choices=("sft", "dpo", "orpo"), default=None,
                        help="sft: learn the targets (default); dpo / orpo: preference tuning on prompt/chosen/rejected "
                             "pairs (e.g. from `gptforge feedback export`)")
    parser.add_argument("--merge", action="store_true", help="LoRA: also write <out>/merged, a plain merged model")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")


def run(args: argparse.Namespace) -> int:
    from . import short_spin_openmp

    short_spin_openmp()  # before torch loads: long spinning costs a shared machine (see there)
    from ..finetune.recipe import load_recipe
    from ..finetune.runner import finetune

    files = [f.strip() for f in args.data.split(",") if f.strip()] if args.data else None
    recipe = load_recipe(args.config, getattr(args, "overrides", []), model=args.model, data_files=files,
                         out_dir=args.out, method=args.method, objective=args.objective)
    if args.merge:
        recipe.merge = True
    result = finetune(recipe, resume=args.resume)
    print(f"fine-tuned {recipe.model} for {result.steps} steps"
          f"{' (stopped early)' if result.stopped_early else ''}: {result.model_dir}")
    if result.best_dir:
        print(f"best checkpoint: {result.best_dir}")
    if result.merged_dir:
        print(f"merged model: {result.merged_dir}")
    if recipe.objective != "sft":
        _print_preference(result)
    for name, value in sorted(result.val.items()):
        print(f"  {name:<32} {value:.4f}")
    for task, entry in result.test.items():
        for split in ("test", "baseline"):
            for metric, value in (entry.get(split) or {}).items():
                if isinstance(value, float):
                    print(f"  {task}/{split}/{metric:<20} {value:.4f}")
    print(f"report: {result.out_dir / 'eval.json'}")
    return 0


def _print_preference(result) -> None:
    """How the held-out pairs moved, as sentences."""
    before, after = result.before, result.val
    if "val_reward_accuracy" in after:
        print(f"on the held-out pairs, the chosen answer now out-scores the rejected one in "
              f"{after['val_reward_accuracy']:.0%} of pairs (before: {before.get('val_reward_accuracy', 0.0):.0%}); "
              f"mean reward margin {after['val_reward_margin']:+.4f} (before: {before.get('val_reward_margin', 0.0):+.4f})")
    print(f"reward margin curve: {result.out_dir / 'reward_margin.png'}")
