"""`gptforge generate`: continue prompts from the command line, as text or JSON lines."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from .decoding_args import (add_model_arguments, add_moderation_argument, add_sampling_arguments, load_for_decoding,
                            passive_openmp, sampling_kwargs)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--prompt", action="append", default=[], help="prompt text (repeatable)")
    parser.add_argument("--prompts-file", help="a text file with one prompt per line (blank lines are skipped)")
    parser.add_argument("--suffix", default=None,
                        help="fill in the middle: the text after the gap (each prompt is the text before it); "
                             "needs a model pretrained with data.fim_rate > 0")
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
    passive_openmp()
    import torch

    from ..safety import load_moderator
    from ..sampling import SamplingParams

    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.stream and (args.jsonl or args.output or len(args.prompt) != 1 or args.prompts_file):
        raise ValueError("--stream takes exactly one --prompt and prints text (no --jsonl/--output)")
    prompts = read_prompts(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    kwargs = sampling_kwargs(args)
    kwargs.update(num_return_sequences=args.num_return_sequences, logprobs=args.logprobs,
                  top_logprobs=args.top_logprobs)
    SamplingParams.from_kwargs(**kwargs)  # fail on bad parameters before loading the model
    moderator = load_moderator(args.moderation)  # a bad policy file fails before the model loads
    model, tokenizer = load_for_decoding(args, "text prompts cannot be encoded")
    if args.stream:
        return _stream_one(args, model, tokenizer, prompts[0], kwargs, moderator)
    records = _generate_all(args, model, tokenizer, prompts, kwargs, moderator)
    _print_records(args, records)
    return 0


def _stream_one(args: argparse.Namespace, model: Any, tokenizer: Any, prompt: str, kwargs: dict[str, Any],
                moderator: Any) -> int:
    from ..generate import stream
    from ..safety import moderated_stream

    if moderator is not None and not moderator.check_input(prompt):
        print(moderator.refusal)
        return 0
    stream_kwargs = {k: v for k, v in kwargs.items() if k not in ("logprobs", "top_logprobs")}
    deltas = stream(model, prompt, tokenizer, truncate_prompt=args.truncate_prompt, compile=args.compile,
                    token_healing=args.token_healing, suffix=args.suffix, **stream_kwargs)
    for text, refused in moderated_stream(moderator, deltas):
        sys.stdout.write("\n" + text if refused else text)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def _generate_all(args: argparse.Namespace, model: Any, tokenizer: Any, prompts: list[str], kwargs: dict[str, Any],
                  moderator: Any) -> list[dict[str, Any]]:
    """One JSON-able record per output, in prompt order; refused prompts get the policy's refusal."""
    from ..generate import generate
    from ..safety import CONTENT_FILTER

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
                            compile=args.compile, token_healing=args.token_healing, suffix=args.suffix, **kwargs):
            record = asdict(out)
            record["index"] = allowed[start + record["index"]]
            blocked = moderator.check_output(record["text"]) if moderator is not None else None
            if blocked is not None and not blocked.allowed:
                record.update(text=moderator.refusal, finish_reason=CONTENT_FILTER, moderation=blocked.reason)
            record["prompt"] = prompts[record["index"]]
            if args.suffix is not None:
                record["suffix"] = args.suffix
            for key in ("top_logprobs", "prompt_top_logprobs"):  # JSON keys are strings: token text, as OpenAI does
                if record[key] is not None:
                    record[key] = [None if step is None else {tokenizer.id_to_token(t): lp for t, lp in step.items()}
                                   for step in record[key]]
            records.append({k: v for k, v in record.items() if v is not None})
    records.sort(key=lambda r: r["index"])  # refusals were collected first; keep the prompts' order
    return records


def _print_records(args: argparse.Namespace, records: list[dict[str, Any]]) -> None:
    from ..atomic import atomic_write_text

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
            print(record["prompt"] + record["text"] + record.get("suffix", ""))
