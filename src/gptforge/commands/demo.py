"""`gptforge demo`: pretrain a small code model on the Python standard library, offline, in minutes."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    # The default budget lives in gptforge.demo, which imports torch: resolved in run() so --help stays instant.
    parser.add_argument("--minutes", type=float, default=None,
                        help="training budget in minutes (default: the demo's standard budget of a few minutes; "
                             "the first run also spends about a minute preparing the corpus)")
    parser.add_argument("--steps", type=int, default=None,
                        help="train exactly this many optimizer steps instead of fitting them to --minutes")
    parser.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    parser.add_argument("--recipe", default=None,
                        help="pretraining recipe (default: the shipped configs/stdlib-code.yaml)")
    parser.add_argument("--fresh", action="store_true",
                        help="train again instead of reusing the model of an earlier run (the corpus is kept)")
    parser.add_argument("--prompt", action="append", default=None, metavar="TEXT",
                        help="a prompt to complete after training (repeatable; default: a few code starters)")
    parser.add_argument("--max-new-tokens", type=int, default=48, help="tokens per completion (default 48)")
    parser.add_argument("--seed", type=int, default=0, help="seed for training and sampling (default 0)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.epilog = ("Recipe fields can be overridden with --section.key=value, e.g. --model.n_layer=2 "
                     "--data.max_bytes=2000000.")


def run(args: argparse.Namespace) -> int:
    from . import short_spin_openmp

    short_spin_openmp()  # before torch loads: long spinning costs a shared machine (see there)
    from ..demo import DEFAULT_MINUTES, DEFAULT_PROMPTS, run_demo

    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    minutes = DEFAULT_MINUTES if args.minutes is None else args.minutes
    run_demo(args.out, minutes=minutes, recipe_path=args.recipe,
             overrides=getattr(args, "overrides", []), fresh=args.fresh, steps=args.steps,
             prompts=args.prompt or DEFAULT_PROMPTS, max_new_tokens=args.max_new_tokens, seed=args.seed,
             progress=not args.no_progress)
    return 0
