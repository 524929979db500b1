"""`gptforge chat`: an interactive conversation with streaming replies.

Type a message and press Enter. `/reset` clears the history (the system prompt stays), `/exit`,
end-of-input (Ctrl-D) or Ctrl-C at the prompt leave; Ctrl-C during a reply stops that reply only.

A model whose tokenizer has a chat template (fine-tuned on chat data, or a Hugging Face chat model)
gets the whole history rendered with it each turn; when it no longer fits the context, the oldest
turns are dropped and chat says so. A base model (no chat template, such as the one `gptforge demo`
trains) cannot follow turns: chat says so and continues the running text instead, each message
appended to it, with token healing so a message may end anywhere.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Callable, Iterator, Optional

from .decoding_args import (add_model_arguments, add_moderation_argument, add_sampling_arguments, load_for_decoding,
                            passive_openmp, sampling_kwargs)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--system", default=None, help="system prompt (chat models; a base model reads it as text)")
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


class Conversation:
    """The history and how it becomes a prompt: a chat template, or plain running text for a base model."""

    def __init__(self, tokenizer: Any, system: Optional[str], budget: int) -> None:
        self.tokenizer, self.system, self.budget = tokenizer, system, budget
        self.templated = bool(tokenizer.chat_template)
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []
        self.text = self.system + "\n" if self.system and not self.templated else ""

    def prompt(self, user: str) -> tuple[Any, Optional[str]]:
        """The prompt for the next reply (ids, or text for a base model) and a note when history was cut."""
        if self.templated:
            self.messages.append({"role": "user", "content": user})
            kept, ids = fit_history(self.tokenizer, self.messages, self.budget)
            note = None
            if len(kept) < len(self.messages):
                note = (f"(the conversation no longer fits the {self.budget}-token budget: the oldest "
                        f"{len(self.messages) - len(kept)} message(s) were dropped)")
            if len(ids) > self.budget:
                note = f"(your message is longer than the {self.budget}-token budget: only its end is used)"
            self.messages = kept
            return ids, note
        self.text += user + "\n"
        ids = self.tokenizer.encode(self.text)
        if len(ids) <= self.budget:
            return self.text, None
        self.text = self.tokenizer.decode(ids[-self.budget:])
        return self.text, f"(the text no longer fits the {self.budget}-token budget: its beginning was dropped)"

    def add_reply(self, reply: str) -> None:
        if self.templated:
            self.messages.append({"role": "assistant", "content": reply.strip()})
        else:
            self.text += reply if reply.endswith("\n") else reply + "\n"


def _stream_reply(deltas: Iterator[tuple[str, bool]], write: Callable[[str], None]) -> tuple[str, bool]:
    """Show a reply as it streams; Ctrl-C stops this reply only. Returns (reply text, interrupted)."""
    reply: list[str] = []
    try:
        for text, refused in deltas:
            if refused:  # the reply so far is replaced by the refusal in the history
                write((" " if reply else "") + text)
                return text, False
            reply.append(text)
            write(text)
    except KeyboardInterrupt:
        close = getattr(deltas, "close", None)
        if close is not None:
            close()
        write(" (stopped)")
        return "".join(reply), True
    return "".join(reply), False


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
    budget = model.config.block_size - min(args.max_new_tokens, model.config.block_size // 2)
    conversation = Conversation(tokenizer, args.system, budget)
    interactive = stdin.isatty()

    def write(text: str) -> None:
        stdout.write(text)
        stdout.flush()

    if interactive:
        print("chat: type a message; /reset clears the history, /exit (or Ctrl-D) quits, Ctrl-C stops a reply",
              file=sys.stderr)
    if not conversation.templated:
        print("chat: this model's tokenizer has no chat template, so it is a base model that continues text "
              "rather than answering turns; each message is appended to the running text and continued",
              file=sys.stderr)
    while True:
        if interactive:
            write("you> ")
        try:
            line = stdin.readline()
        except KeyboardInterrupt:  # Ctrl-C at the prompt leaves
            write("\n")
            break
        if not line:
            if interactive:
                write("\n")  # Ctrl-D: leave the shell prompt on a line of its own
            break
        text = line.rstrip("\n")
        if text.strip() == "/exit":
            break
        if text.strip() == "/reset":
            conversation.reset()
            write("(history cleared)\n")
            continue
        if not text.strip():
            continue
        if moderator is not None and not moderator.check_input(text):
            write(f"assistant> {moderator.refusal}\n")  # refused; the message is not kept
            continue
        prompt, note = conversation.prompt(text)
        if note:
            print(note, file=sys.stderr)
        write("assistant> ")
        deltas = stream(model, prompt, tokenizer, truncate_prompt=True, compile=args.compile,
                        token_healing=args.token_healing, **kwargs)
        reply, _ = _stream_reply(moderated_stream(moderator, deltas), write)
        write("\n")
        conversation.add_reply(reply)
    return 0
