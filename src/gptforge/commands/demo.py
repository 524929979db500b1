"""`gptforge demo`: pretrain a small code model on the Python standard library, offline, in minutes."""

from __future__ import annotations

import argparse

from ..demo import DEFAULT_MINUTES


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--minutes", type=float, default=DEFAULT_MINUTES,
                        help=f"training budget in minutes (default {DEFAULT_MINUTES:g}; the first run also spends "
                             "about a minute preparing the corpus)")
    parser.add_argument("--steps", type=int, default=None,
                        help="train exactly this many optimizer steps instead of fitting them to --minutes")
    parser.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    parser.add_argument("--recipe", default=None,
                        help="pretraining recipe (default: configs/stdlib-code.yaml of the source tree)")
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
    from ..demo import DEFAULT_PROMPTS, run_demo  # noqa: F401 (DEFAULT_PROMPTS: the default prompts)

    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    report = run_demo(args.out, minutes=args.minutes, recipe_path=args.recipe,
                      overrides=getattr(args, "overrides", []), fresh=args.fresh, steps=args.steps,
                      prompts=args.prompt or DEFAULT_PROMPTS, max_new_tokens=args.max_new_tokens, seed=args.seed,
                      progress=not args.no_progress)
    return 0
