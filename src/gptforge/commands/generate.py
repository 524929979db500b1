"""`gptforge generate`: continue prompts from the command line, as text or JSON lines."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16"}


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
                length_penalty=args.length_penalty, early_stopping=early)


def load_model(args: argparse.Namespace) -> Any:
    """The model (with its tokenizer) named by --model and --dtype."""
    import torch

    from ..model import GPT

    path = Path(args.model)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"--model {path}: no config.json there (expected a model directory written by "
                                f"save_pretrained or a Hugging Face checkpoint)")
    from ..generate import prepare_for_decoding

    dtype = getattr(torch, DTYPES[args.dtype]) if args.dtype else None
    return prepare_for_decoding(GPT.from_pretrained(path, dtype=dtype))


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="model directory (config.json, model.safetensors, tokenizer)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="cast the weights (default: as saved)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the decode step (slow first call, faster long generations)")


def add_moderation_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--moderation", default=None, metavar="FILE",
                        help="moderation policy YAML (see docs/safety.md): a blocked prompt or output is replaced "
                             "by the policy's refusal (finish_reason content_filter)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--prompt", action="append", default=[], help="prompt text (repeatable)")
    parser.add_argument("--prompts-file", help="a text file with one prompt per line (blank lines are skipped)")
    parser.add_argument("--num-return-sequences", type=int, default=1)
    parser.add_argument("--logprobs", action="store_true", help="report the log-probability of each token")
    parser.add_argument("--top-logprobs", type=int, default=0, help="report this many alternatives per token")
    parser.add_argument("--echo", action="store_true", help="also report the prompt's token log-probabilities")
    parser.add_argument("--truncate-prompt", action="store_true",
                        help="keep the end of a prompt longer than the context instead of failing")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts decoded together")
    parser.add_argument("--stream", action="store_true", help="print text as it is generated (one prompt)")
    parser.add_argument("--jsonl", action="store_true", help="print one JSON object per output")
    parser.add_argument("--output", help="write the outputs as JSON lines to this file")
    add_moderation_argument(parser)
    add_sampling_arguments(parser)


def read_prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompt)
    if args.prompts_file:
        path = Path(args.prompts_file)
        if not path.is_file():
            raise FileNotFoundError(f"--prompts-file {path}: file not found")
        prompts += [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise ValueError("no prompts: give --prompt TEXT or --prompts-file FILE")
    return prompts


def run(args: argparse.Namespace) -> int:
    import torch

    from ..atomic import atomic_write_text
    from ..generate import generate, stream

    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    prompts = read_prompts(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    kwargs = sampling_kwargs(args)
    kwargs.update(num_return_sequences=args.num_return_sequences, logprobs=args.logprobs,
                  top_logprobs=args.top_logprobs)
    from ..sampling import SamplingParams

    SamplingParams.from_kwargs(**kwargs)  # fail on bad parameters before loading the model
    from ..safety import CONTENT_FILTER, load_moderator

    moderator = load_moderator(args.moderation)  # a bad policy file fails before the model loads
    model = load_model(args)
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is None:
        raise FileNotFoundError(f"--model {args.model}: no tokenizer.json, so text prompts cannot be encoded")
    if args.stream:
        if len(prompts) != 1 or args.jsonl or args.output:
            raise ValueError("--stream takes exactly one prompt and prints text (no --jsonl/--output)")
        stream_kwargs = {k: v for k, v in kwargs.items() if k not in ("logprobs", "top_logprobs")}
        if moderator is not None and not moderator.check_input(prompts[0]):
            print(moderator.refusal)
            return 0
        guard = moderator.stream_guard() if moderator is not None else None
        for delta in stream(model, prompts[0], tokenizer, truncate_prompt=args.truncate_prompt,
                            compile=args.compile, **stream_kwargs):
            if guard is not None:
                delta = guard.push(delta)
                if guard.blocked:  # stop before the delta that completed blocked text
                    sys.stdout.write("\n" + moderator.refusal)
                    break
            sys.stdout.write(delta)
            sys.stdout.flush()
        sys.stdout.write("\n")
        return 0
    records = []
    verdicts = [moderator.check_input(p) if moderator is not None else None for p in prompts]
    allowed = [i for i, v in enumerate(verdicts) if v is None or v.allowed]
    for i, verdict in enumerate(verdicts):
        if verdict is not None and not verdict.allowed:  # refused: the model never sees this prompt
            records += [{"index": i, "prompt": prompts[i], "text": moderator.refusal, "token_ids": [],
                         "finish_reason": CONTENT_FILTER, "moderation": verdict.reason}
                        for _ in range(args.num_return_sequences)]
    for start in range(0, len(allowed), args.batch_size):
        chunk = [prompts[i] for i in allowed[start:start + args.batch_size]]
        for out in generate(model, chunk, tokenizer, echo=args.echo, truncate_prompt=args.truncate_prompt,
                            compile=args.compile, **kwargs):
            record = asdict(out)
            record["index"] = allowed[start + record["index"]]
            blocked = moderator.check_output(record["text"]) if moderator is not None else None
            if blocked is not None and not blocked.allowed:
                record.update(text=moderator.refusal, finish_reason=CONTENT_FILTER, moderation=blocked.reason)
            record["prompt"] = prompts[record["index"]]
            if record["top_logprobs"] is not None:  # JSON keys are strings: use the token text as OpenAI does
                record["top_logprobs"] = [{tokenizer.id_to_token(t): lp for t, lp in step.items()}
                                          for step in record["top_logprobs"]]
            if record["prompt_top_logprobs"] is not None:
                record["prompt_top_logprobs"] = [None if step is None else
                                                 {tokenizer.id_to_token(t): lp for t, lp in step.items()}
                                                 for step in record["prompt_top_logprobs"]]
            records.append({k: v for k, v in record.items() if v is not None})
    records.sort(key=lambda r: r["index"])  # refusals were collected first; keep the prompts' order
    lines = [json.dumps(r, ensure_ascii=False) for r in records]
    if args.output:
        atomic_write_text(Path(args.output), "\n".join(lines) + "\n")
        print(f"wrote {len(records)} outputs to {args.output}", file=sys.stderr)
    elif args.jsonl:
        print("\n".join(lines))
    else:
        for i, record in enumerate(records):
            if i:
                print("-" * 40)
            print(record["prompt"] + record["text"])
    return 0
