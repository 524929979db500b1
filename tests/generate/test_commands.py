"""`gptforge generate` and `gptforge chat` end to end on a tiny saved model."""

import io
import json

import pytest
import torch

from gptforge import cli
from gptforge.commands import chat
from gptforge.config import Config
from gptforge.model import GPT
from gptforge.tokenizer import Tokenizer
from gptforge.loading import save


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    tokenizer = Tokenizer.train_bpe(["hello there, how are you? fine thanks. " * 20], vocab_size=300)
    torch.manual_seed(0)
    model = GPT(Config.from_name("nano").replace(vocab_size=tokenizer.vocab_size, block_size=128))
    path = tmp_path_factory.mktemp("model")
    save(path, model, tokenizer)
    return path


def test_generate_prints_text_and_jsonl(model_dir, tmp_path, capsys):
    assert cli.main(["generate", "--model", str(model_dir), "--prompt", "hello", "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out.startswith("hello")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("hello there\n\nhow are\n", encoding="utf-8")
    out = tmp_path / "out.jsonl"
    code = cli.main(["generate", "--model", str(model_dir), "--prompts-file", str(prompts), "--max-new-tokens", "4",
                     "--do-sample", "--seed", "1", "--num-return-sequences", "2", "--logprobs", "--top-logprobs", "2",
                     "--output", str(out), "--eos-token-id", "0"])
    assert code == 0
    records = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [r["index"] for r in records] == [0, 0, 1, 1]
    assert records[2]["prompt"] == "how are"
    assert all(len(r["logprobs"]) == len(r["token_ids"]) and len(r["top_logprobs"][0]) == 2 for r in records)
    assert cli.main(["generate", "--model", str(model_dir), "--prompt", "hello", "--max-new-tokens", "3",
                     "--jsonl", "--num-beams", "2", "--echo"]) == 0
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert record["finish_reason"] in ("stop", "length") and "score" in record and "prompt_logprobs" in record


def test_generate_stream_and_errors(model_dir, capsys):
    assert cli.main(["generate", "--model", str(model_dir), "--prompt", "hi", "--stream", "--max-new-tokens", "4"]) == 0
    assert cli.main(["generate", "--model", str(model_dir), "--prompt", "hi", "--temperature", "-1"]) == 2
    assert "temperature" in capsys.readouterr().err
    assert cli.main(["generate", "--model", str(model_dir) + "-missing", "--prompt", "hi"]) == 2
    assert "model directory not found" in capsys.readouterr().err  # not "no config.json": the folder is missing
    assert cli.main(["generate", "--model", str(model_dir)]) == 2
    assert "--prompt" in capsys.readouterr().err


def _record_prompts(monkeypatch) -> list[str]:
    seen = []
    from gptforge import generate as generate_module
    real_stream = generate_module.stream

    def recording_stream(model, prompt, tokenizer, **kwargs):
        seen.append(prompt if isinstance(prompt, str) else tokenizer.decode(prompt))
        yield from real_stream(model, prompt, tokenizer, **kwargs)

    monkeypatch.setattr(generate_module, "stream", recording_stream)
    return seen


def test_chat_streams_keeps_history_resets_and_exits(model_dir, tmp_path, monkeypatch):
    import shutil

    from gptforge.tokenizer import CHATML_TEMPLATE, Tokenizer

    chat_dir = tmp_path / "chat-model"  # the same model with a chat template, as a chat fine-tune saves it
    shutil.copytree(model_dir, chat_dir)
    tok = Tokenizer.from_file(chat_dir)
    tok.chat_template = CHATML_TEMPLATE
    tok.save(chat_dir)
    seen = _record_prompts(monkeypatch)
    parser = cli.build_parser(["chat"])[0]
    args = parser.parse_args(["chat", "--model", str(chat_dir), "--system", "be brief", "--max-new-tokens", "4"])
    stdout = io.StringIO()
    stdin = io.StringIO("hello\nhow are you\n/reset\nagain\n/exit\nnever read\n")
    assert chat.run(args, stdin=stdin, stdout=stdout) == 0
    assert len(seen) == 3
    assert seen[0].startswith("<|im_start|>system\nbe brief<|im_end|>") and seen[0].endswith("<|im_start|>assistant\n")
    assert "hello" in seen[1] and "how are you" in seen[1]  # history kept
    assert "hello" not in seen[2] and "again" in seen[2] and "be brief" in seen[2]  # reset keeps the system prompt
    assert stdout.getvalue().count("assistant> ") == 3 and "(history cleared)" in stdout.getvalue()


def test_chat_with_a_base_model_continues_the_running_text(model_dir, monkeypatch, capsys):
    seen = _record_prompts(monkeypatch)
    parser = cli.build_parser(["chat"])[0]
    args = parser.parse_args(["chat", "--model", str(model_dir), "--max-new-tokens", "4", "--seed", "1"])
    stdout = io.StringIO()
    assert chat.run(args, stdin=io.StringIO("def add(a, b):\n    return\n"), stdout=stdout) == 0
    assert "no chat template" in capsys.readouterr().err  # says it is a base model, once
    assert seen[0] == "def add(a, b):\n" and seen[1].startswith("def add(a, b):\n") and "    return\n" in seen[1]
    assert "<|im_start|>" not in "".join(seen)


@pytest.mark.slow
def test_chat_ctrl_c_stops_the_reply_and_ctrl_d_leaves_on_a_new_line(tmp_path):
    """In a real terminal (a pty): Ctrl-C during a reply returns to the prompt; Ctrl-D exits cleanly."""
    import os
    import pty
    import select
    import sys
    import time

    import torch

    from gptforge.config import Config
    from gptforge.loading import save
    from gptforge.model import GPT
    from gptforge.tokenizer import Tokenizer

    tok = Tokenizer.train_bpe(["hello there friend " * 40], vocab_size=300)
    torch.manual_seed(0)
    save(tmp_path / "long", GPT(Config(vocab_size=tok.vocab_size, block_size=4096, n_layer=1, n_head=2, n_embd=32)),
         tok)
    bans = sum((["--logit-bias", f"{t}=-100"] for t in tok.stop_token_ids()), [])
    pid, fd = pty.fork()
    if pid == 0:  # the child: a chat whose reply would take thousands of tokens
        os.execv(sys.executable, [sys.executable, "-m", "gptforge.cli", "chat", "--model", str(tmp_path / "long"),
                                  "--max-new-tokens", "4000", "--do-sample", "--seed", "1", *bans])

    def read_until(marker: str, timeout: float = 60.0) -> str:
        seen, deadline = "", time.monotonic() + timeout
        while marker not in seen and time.monotonic() < deadline:
            ready, _, _ = select.select([fd], [], [], 0.2)
            if ready:
                try:
                    seen += os.read(fd, 4096).decode(errors="replace")
                except OSError:
                    break
        return seen

    try:
        assert "you> " in read_until("you> ")
        os.write(fd, b"hello\n")
        reply = read_until("assistant> ")
        reply += read_until("e", 10)  # some of the reply has streamed
        os.write(fd, b"\x03")  # Ctrl-C
        after = read_until("you> ")
        assert "(stopped)" in after and after.rstrip().endswith("you>"), after[-300:]
        os.write(fd, b"\x04")  # Ctrl-D at the prompt
        tail = read_until("\n", 20)
        _, status = os.waitpid(pid, 0)
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
        assert tail.startswith("\r\n") or tail.startswith("\n"), repr(tail)
    finally:
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            pass
        os.close(fd)


def test_generate_suffix_fills_in_the_middle(model_dir, tmp_path, capsys):
    from gptforge.fim import FIM_SPECIAL_TOKENS, fim_tokens, infill_prompt
    from gptforge.generate import generate
    from gptforge.loading import load
    from gptforge.tokenizer import DEFAULT_SPECIAL_TOKENS

    tokenizer = Tokenizer.train_bpe(["def f(x):\n    return x + 1\n" * 20], vocab_size=300,
                                    special_tokens=[*DEFAULT_SPECIAL_TOKENS, *FIM_SPECIAL_TOKENS])
    torch.manual_seed(0)
    save(tmp_path / "fim", GPT(Config.from_name("nano").replace(vocab_size=tokenizer.vocab_size, block_size=128)),
         tokenizer)
    args = ["generate", "--model", str(tmp_path / "fim"), "--prompt", "def f(x):\n", "--suffix", "\n",
            "--max-new-tokens", "6", "--jsonl"]
    assert cli.main(args) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["prompt"] == "def f(x):\n" and record["suffix"] == "\n"
    model, tok = load(tmp_path / "fim")
    t = fim_tokens(tok)
    expected = generate(model, [infill_prompt(tok, "def f(x):\n", "\n").ids], tok, max_new_tokens=6,
                        eos_token_id=sorted({*tok.stop_token_ids(), t.prefix, t.suffix, t.middle, t.pad}))[0]
    assert record["token_ids"] == expected.token_ids and record["text"] == expected.text
    # Plain output shows the filled-in text: prefix, middle, suffix.
    assert cli.main(args[:-1]) == 0
    assert capsys.readouterr().out == "def f(x):\n" + expected.text + "\n" + "\n"
    # A model without FIM tokens: one line naming the missing tokens, exit status 2.
    assert cli.main(["generate", "--model", str(model_dir), "--prompt", "hello", "--suffix", "x"]) == 2
    assert "<fim_prefix>" in capsys.readouterr().err
