"""Command-line options shared by the decoding commands (`generate`, `chat`): model, sampling, moderation."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from . import passive_openmp  # noqa: F401  (re-exported: generate, chat and serve call it)

# The names `gptforge.loading.resolve_dtype` accepts (kept here so `--help` needs no torch import).
DTYPES = ("bf16", "bfloat16", "float16", "float32", "fp16", "fp32")


def add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    """The decoding parameters shared by `generate` and `chat` (HF/OpenAI names)."""
    group = parser.add_argument_group("decoding")
    group.add_argument("--max-new-tokens", type=int, default=64)
    group.add_argument("--min-new-tokens", type=int, default=0)
    group.add_argument("--do-sample", action="store_true", help="sample (default: greedy, as in transformers)")
    group.add_argument("--temperature", type=float, default=1.0)
    group.add_argument("--top-k", type=int, default=0)
    group.add_argument("--top-p", type=float, default=1.0)
    group.add_argument("--min-p", type=float, default=0.0)
    group.add_argument("--typical-p", type=float, default=1.0)
    group.add_argument("--repetition-penalty", type=float, default=1.0)
    group.add_argument("--presence-penalty", type=float, default=0.0)
    group.add_argument("--frequency-penalty", type=float, default=0.0)
    group.add_argument("--no-repeat-ngram-size", type=int, default=0)
    group.add_argument("--logit-bias", action="append", default=[], metavar="TOKEN=BIAS",
                       help="add BIAS to the logit of token id TOKEN (repeatable)")
    group.add_argument("--stop", action="append", default=None, metavar="TEXT", help="stop string (repeatable)")
    group.add_argument("--eos-token-id", action="append", type=int, default=None, metavar="ID",
                       help="end-of-sequence token id (repeatable; default: the tokenizer's stop tokens)")
    group.add_argument("--seed", type=int, default=None)
    group.add_argument("--num-beams", type=int, default=1)
    group.add_argument("--length-penalty", type=float, default=1.0)
    group.add_argument("--early-stopping", choices=["true", "false", "never"], default="false")
    group.add_argument("--prompt-lookup", type=int, default=0, metavar="N",
                       help="speculative decoding: draft up to N tokens by matching the text's last n-gram against "
                            "earlier text and verify them in one pass (same output; faster when the output "
                            "repeats its context, as when editing code; see docs/generate.md)")
    group.add_argument("--prompt-lookup-ngram", type=int, default=2, metavar="N",
                       help="the longest n-gram matched when drafting (default: 2)")
    group.add_argument("--no-token-healing", dest="token_healing", action="store_false",
                       help="feed a text prompt's last token as it is (default: let the model re-choose it, so "
                            "a prompt may end mid-word or after a space; see docs/generate.md)")


def sampling_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """Keyword arguments for `gptforge.generate.generate` from parsed arguments."""
    bias = {}
    for item in args.logit_bias:
        token, sep, value = item.partition("=")
        try:
            bias[int(token)] = float(value)
        except ValueError:
            raise ValueError(f"--logit-bias: expected TOKEN=BIAS (e.g. 50256=-100), got {item!r}") from None
        if not sep:
            raise ValueError(f"--logit-bias: expected TOKEN=BIAS (e.g. 50256=-100), got {item!r}")
    early = {"true": True, "false": False, "never": "never"}[args.early_stopping]
    return dict(max_new_tokens=args.max_new_tokens, min_new_tokens=args.min_new_tokens, do_sample=args.do_sample,
                temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                typical_p=args.typical_p, repetition_penalty=args.repetition_penalty,
                presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty,
                no_repeat_ngram_size=args.no_repeat_ngram_size, logit_bias=bias or None, stop=args.stop,
                eos_token_id=args.eos_token_id, seed=args.seed, num_beams=args.num_beams,
                length_penalty=args.length_penalty, early_stopping=early,
                prompt_lookup_num_tokens=args.prompt_lookup, max_matching_ngram_size=args.prompt_lookup_ngram)


def load_for_decoding(args: argparse.Namespace, purpose: str) -> tuple[Any, Any]:
    """(model, tokenizer) named by --model and --dtype; `purpose` words the error."""
    from ..loading import load

    model, tokenizer = load(Path(args.model), dtype=args.dtype)
    if tokenizer is None:
        raise FileNotFoundError(f"--model {args.model}: no tokenizer.json, so {purpose}")
    return model, tokenizer  # generate/stream lay the weights out for decoding themselves


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="model directory (config.json, model.safetensors, tokenizer)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="cast the weights (default: as saved)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--compile", action="store_true", default=None,
                        help="torch.compile the decode step (a first call of a minute or more; pays for long "
                             "generations of small models; default: on when GPTFORGE_COMPILE=1)")


def add_moderation_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--moderation", default=None, metavar="FILE",
                        help="moderation policy YAML (see docs/safety.md): a blocked prompt or output is replaced "
                             "by the policy's refusal (finish_reason content_filter)")
