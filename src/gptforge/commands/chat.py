"""`gptforge chat`: an interactive conversation with streaming replies.

Type a message and press Enter. `/reset` clears the history (the system prompt stays), `/exit` or
end-of-input leaves. The whole history is rendered with the tokenizer's chat template each turn;
when it no longer fits the context, the oldest turns are dropped.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Optional

from .decoding_args import (add_model_arguments, add_moderation_argument, add_sampling_arguments, load_for_decoding,
                            passive_openmp, sampling_kwargs)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--system", default=None, help="system prompt")
    add_moderation_argument(parser)
    add_sampling_arguments(parser)
    parser.set_defaults(max_new_tokens=256)


def fit_history(tokenizer: Any, messages: list[dict[str, str]], budget: int) -> tuple[list[dict[str, str]], list[int]]:
    """Drop the oldest non-system turns until the rendered prompt has at most `budget` tokens."""
    messages = list(messages)
    while True:
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        first = 1 if messages and messages[0]["role"] == "system" else 0
        if len(ids) <= budget or len(messages) - first <= 1:
            return messages, ids
        del messages[first]


def run(args: argparse.Namespace, stdin: Optional[Any] = None, stdout: Optional[Any] = None) -> int:
    passive_openmp()
    from ..generate import stream
    from ..sampling import SamplingParams

    stdin = stdin or sys.stdin
    stdout = stdout or sys.stdout
    kwargs = sampling_kwargs(args)
    if kwargs["num_beams"] != 1:
        raise ValueError("--num-beams: chat streams its replies, so beam search is not available here")
    SamplingParams.from_kwargs(**kwargs)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    from ..safety import load_moderator, moderated_stream

    moderator = load_moderator(args.moderation)  # a bad policy file fails before the model loads
    model, tokenizer = load_for_decoding(args, "chat cannot encode messages")
    system = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(system)
    interactive = stdin.isatty()
    budget = model.config.block_size - min(args.max_new_tokens, model.config.block_size // 2)
    if interactive:
        print("chat: type a message; /reset clears the history, /exit quits", file=sys.stderr)
    while True:
        if interactive:
            stdout.write("you> ")
            stdout.flush()
        line = stdin.readline()
        if not line:
            break
        text = line.rstrip("\n")
        if text.strip() == "/exit":
            break
        if text.strip() == "/reset":
            messages = list(system)
            stdout.write("(history cleared)\n")
            continue
        if not text.strip():
            continue
        if moderator is not None and not moderator.check_input(text):
            stdout.write(f"assistant> {moderator.refusal}\n")  # refused; the message is not kept
            stdout.flush()
            continue
        messages.append({"role": "user", "content": text})
        messages, ids = fit_history(tokenizer, messages, budget)
        stdout.write("assistant> ")
        reply: list[str] = []
        deltas = stream(model, ids, tokenizer, truncate_prompt=True, compile=args.compile, **kwargs)
        for text, refused in moderated_stream(moderator, deltas):
            if refused:  # the reply so far is replaced by the refusal in the history
                stdout.write((" " if reply else "") + text)
                reply = [text]
                break
            reply.append(text)
            stdout.write(text)
            stdout.flush()
        stdout.write("\n")
        stdout.flush()
        messages.append({"role": "assistant", "content": "".join(reply).strip()})
    return 0
