"""The `gptforge` command line: one subcommand per workflow.

Each subcommand lives in `gptforge.commands.<name>` with `add_arguments(parser)` and `run(args) -> int`;
only the invoked one is imported, so `gptforge --help` stays fast. Commands that take a YAML recipe
also accept dotted overrides (`--train.lr=3e-4`), collected into `args.overrides`.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import Optional, Sequence

# name -> (module, one-line help, accepts dotted overrides)
COMMANDS: dict[str, tuple[str, str, bool]] = {
    "prepare": ("gptforge.commands.prepare", "Tokenize corpora (files, globs, JSONL/Parquet, HF datasets, stdlib) into token shards", False),
    "pretrain": ("gptforge.commands.pretrain", "Pretrain a model with next-token prediction (single process or torchrun)", True),
    "finetune": ("gptforge.commands.finetune", "Fine-tune (full or LoRA) on instruction, chat or task data; multi-task", True),
    "merge-lora": ("gptforge.commands.merge_lora", "Merge a LoRA adapter into its base model", False),
    "generate": ("gptforge.commands.generate", "Generate text from prompts (sampling, beam search, stop strings)", False),
    "chat": ("gptforge.commands.chat", "Interactive chat with streaming output", False),
    "eval": ("gptforge.commands.eval", "Evaluate: perplexity, task metrics, few-shot, lm-evaluation-harness", False),
    "serve": ("gptforge.commands.serve", "Serve an OpenAI-compatible HTTP API with a chat web page", False),
    "quantize": ("gptforge.commands.quantize", "Quantize weights to int8 or int4", False),
    "prune": ("gptforge.commands.prune", "Prune weights (magnitude, Wanda) or heads/channels (structured)", False),
    "export": ("gptforge.commands.export", "Export to Hugging Face or GGUF format", False),
    "feedback": ("gptforge.commands.feedback", "Export the feedback the server stored to preference and SFT datasets", False),
    "explain": ("gptforge.commands.explain", "Per-token log-probabilities, surprisal and attention maps", False),
    "demo": ("gptforge.commands.demo", "Train a small code model on the Python standard library, offline", True),
}

# Errors a user can cause: shown as one clear line and a non-zero exit, never a traceback. GptforgeError is
# ours (gptforge.errors); the builtins cover argument checks and files the user named.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, NotADirectoryError,
                                                IsADirectoryError, PermissionError)


def build_parser(argv: Sequence[str]) -> tuple[argparse.ArgumentParser, Optional[object]]:
    parser = argparse.ArgumentParser(prog="gptforge", description="Train, adapt, evaluate and serve GPT models.")
    parser.add_argument("--version", action="version", version=f"gptforge {_version()}")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="debug logging with timestamps, including other libraries' messages")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    chosen = next((a for a in argv if not a.startswith("-")), None)
    module = None
    for name, (module_name, help_text, _) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:
            module = importlib.import_module(module_name)
            module.add_arguments(p)
    return parser, module


class PlainFormatter(logging.Formatter):
    """gptforge's progress messages as plain lines; warnings and errors say so ("warning: ...")."""

    def format(self, record: logging.LogRecord) -> str:
        message = super().format(record)
        return message if record.levelno < logging.WARNING else f"{record.levelname.lower()}: {message}"


def configure_logging(verbose: bool = False) -> None:
    """Plain lines from gptforge at INFO, other libraries only from WARNING; `verbose`: everything, timestamped."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_gptforge_cli", False):
            root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler._gptforge_cli = True  # type: ignore[attr-defined]
    if verbose:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.setLevel(logging.DEBUG)
    else:
        handler.setFormatter(PlainFormatter())
        root.setLevel(logging.WARNING)  # third-party INFO (e.g. httpx, datasets) stays out of the way
    root.addHandler(handler)
    logging.getLogger("gptforge").setLevel(logging.DEBUG if verbose else logging.INFO)


def _version() -> str:
    from . import __version__

    return __version__


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the `gptforge` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser, module = build_parser(argv)
    if module is not None and COMMANDS[next(a for a in argv if not a.startswith("-"))][2]:
        args, extra = parser.parse_known_args(argv)
        bad = [e for e in extra if not (e.startswith("--") and "=" in e)]
        if bad:
            parser.error(f"unrecognized arguments: {' '.join(bad)} (overrides look like --section.key=value)")
        args.overrides = extra
    else:
        args = parser.parse_args(argv)
    configure_logging(args.verbose)
    if module is None:
        parser.print_help()
        return 1
    try:
        return int(module.run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        from .errors import GptforgeError

        if isinstance(exc, (GptforgeError, *USER_ERRORS)):
            print(f"gptforge {args.command}: error: {exc}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
