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


def test_chat_streams_keeps_history_resets_and_exits(model_dir, monkeypatch):
    seen = []
    from gptforge import generate as generate_module
    real_stream = generate_module.stream

    def recording_stream(model, prompt, tokenizer, **kwargs):
        seen.append(tokenizer.decode(prompt))
        yield from real_stream(model, prompt, tokenizer, **kwargs)

    monkeypatch.setattr(generate_module, "stream", recording_stream)
    parser = cli.build_parser(["chat"])[0]
    args = parser.parse_args(["chat", "--model", str(model_dir), "--system", "be brief", "--max-new-tokens", "4"])
    stdout = io.StringIO()
    stdin = io.StringIO("hello\nhow are you\n/reset\nagain\n/exit\nnever read\n")
    assert chat.run(args, stdin=stdin, stdout=stdout) == 0
    assert len(seen) == 3
    assert seen[0].startswith("<|im_start|>system\nbe brief<|im_end|>") and seen[0].endswith("<|im_start|>assistant\n")
    assert "hello" in seen[1] and "how are you" in seen[1]  # history kept
    assert "hello" not in seen[2] and "again" in seen[2] and "be brief" in seen[2]  # reset keeps the system prompt
    assert stdout.getvalue().count("assistant> ") == 3 and "(history cleared)" in stdout.getvalue()
