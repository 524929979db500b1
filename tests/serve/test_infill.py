"""Fill-in-the-middle serving: llama.cpp's /infill as editor plugins call it, and `suffix` on /v1/completions
through the official openai client, against a tiny model pretrained with data.fim_rate > 0."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from gptforge.fim import fim_tokens, infill_prompt
from gptforge.generate import generate
from gptforge.loading import load
from gptforge.serve.app import ServerOptions, create_app

from serve_helpers import InProcessServer, free_port

KEY = "sk-fim"
FILES = {f"m{i}.py": f"def scale_{i}(x):\n    y = x + {i}\n    return y * 2\n" for i in range(120)}
PREFIX, SUFFIX = "def scale_7(x):\n    y = x + 7\n", "\n"


@pytest.fixture(scope="module")
def fim_model(tmp_path_factory):
    """A tiny model pretrained for a few steps on FIM-transformed documents (the real pretraining path)."""
    from gptforge.train.pretrain import pretrain

    tmp = tmp_path_factory.mktemp("fim")
    src = tmp / "src"
    src.mkdir()
    for name, text in FILES.items():
        (src / name).write_text(text)
    run = pretrain({
        "model": {"preset": "nano", "n_layer": 1, "n_embd": 32, "n_head": 2, "block_size": 96},
        "data": {"sources": [str(src)], "tokenizer": "bpe", "vocab_size": 300, "split": "documents",
                 "val_fraction": 0.1, "fim_rate": 0.9, "seq_len": 48, "batch_size": 8, "eval_tokens": 500,
                 "dir": str(tmp / "data")},
        "train": {"max_steps": 20, "lr": 3e-3, "eval_every": 20, "progress": False, "seed": 0},
        "out_dir": str(tmp / "run")})
    return run / "model"


@pytest.fixture(scope="module")
def fim_server(fim_model):
    app = create_app(lambda: load(fim_model), ServerOptions(model_name="tiny-fim", api_keys=[KEY], max_batch=4))
    with InProcessServer(app, free_port()) as srv:
        yield srv


@pytest.fixture(scope="module")
def plain_server(model_dir):
    app = create_app(lambda: load(model_dir), ServerOptions(model_name="tiny-chat", api_keys=[KEY], max_batch=4))
    with InProcessServer(app, free_port()) as srv:
        yield srv


def _post(srv, path, body):
    return httpx.post(f"{srv.base}{path}", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)


def _llama_vscode_request(prefix: str, suffix: str, prompt: str, chunks: list, n_indent: int) -> dict:
    """The body llama.vscode's LlamaServer.createRequestPayload sends (defaultRequestParams spread in)."""
    return {"input_prefix": prefix, "input_suffix": suffix, "input_extra": chunks, "prompt": prompt,
            "n_predict": 16, "top_k": 40, "top_p": 0.99, "stream": False, "samplers": ["top_k", "top_p", "infill"],
            "cache_prompt": True, "n_indent": n_indent, "t_max_prompt_ms": 500, "t_max_predict_ms": 2500}


def _expected_middle(fim_model, prefix, suffix, max_new_tokens, extra=()):
    """The greedy middle from the Python API on the same weights and the same prompt."""
    model, tok = load(fim_model)
    ids = infill_prompt(tok, prefix, suffix, extra=extra).ids
    out = generate(model, [ids], tok, max_new_tokens=max_new_tokens, temperature=0,
                   eos_token_id=sorted({*tok.stop_token_ids(), fim_tokens(tok).prefix, fim_tokens(tok).suffix,
                                        fim_tokens(tok).middle, fim_tokens(tok).pad}))
    return out[0]


def test_infill_as_llama_vscode_sends_it(fim_server, fim_model):
    # llama.vscode: prefix = lines above, prompt = the current line up to the cursor, suffix = the rest.
    chunks = [{"text": FILES["m3.py"], "time": 1700000000, "filename": "m3.py"}]
    body = _llama_vscode_request("def scale_7(x):\n", "\n", "    y = x + 7\n", chunks, n_indent=4)
    body["top_k"] = 1  # greedy, to compare with the Python API
    r = _post(fim_server, "/infill", body)
    assert r.status_code == 200, r.text
    out = r.json()
    for key in ("content", "stop", "tokens", "model", "tokens_predicted", "tokens_evaluated", "truncated",
                "stop_type", "timings", "tokens_cached", "has_new_line"):
        assert key in out, key
    assert out["stop"] is True and out["truncated"] is False and out["model"] == "tiny-fim"
    assert out["timings"]["prompt_n"] == out["tokens_evaluated"] > 0
    assert out["timings"]["predicted_n"] == out["tokens_predicted"] >= 1
    assert not any(marker in out["content"] for marker in ("<fim_prefix>", "<fim_suffix>", "<fim_middle>"))
    expected = _expected_middle(fim_model, PREFIX, SUFFIX, 16, extra=[("m3.py", FILES["m3.py"])])
    # n_indent=4 cuts before a line indented less than 4 columns, as llama.cpp does.
    from gptforge.fim import cut_at_indent

    text, cut = cut_at_indent(expected.text, 4)
    assert out["content"] == text
    assert out["stop_type"] == ("limit" if cut or expected.finish_reason == "length" else "eos")
    model, tok = load(fim_model)
    assert out["prompt"] == tok.decode(infill_prompt(tok, PREFIX, SUFFIX, extra=[("m3.py", FILES["m3.py"])]).ids)


def test_infill_as_llama_vim_sends_it_with_response_fields(fim_server):
    body = {"input_prefix": "def scale_7(x):\n", "input_suffix": "\n", "prompt": "    y = x + 7\n",
            "input_extra": [{"text": FILES["m1.py"], "time": 1.5, "filename": "m1.py"}], "n_predict": 8,
            "n_indent": 4, "top_k": 40, "top_p": 0.99, "stream": False, "samplers": ["top_k", "top_p", "infill"],
            "cache_prompt": True, "t_max_prompt_ms": 500, "t_max_predict_ms": 1000,
            "response_fields": ["content", "timings/prompt_n", "timings/predicted_ms", "truncated", "tokens_cached"]}
    r = _post(fim_server, "/infill", body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert set(out) == {"content", "timings/prompt_n", "timings/predicted_ms", "truncated", "tokens_cached"}
    assert isinstance(out["content"], str) and out["timings/prompt_n"] > 0


def test_infill_warmup_stream_and_truncation(fim_server):
    # n_predict 0: llama.vscode's cache warm-up request; nothing is generated.
    r = _post(fim_server, "/infill", {"input_prefix": PREFIX, "input_suffix": SUFFIX, "n_predict": 0})
    assert r.status_code == 200 and r.json()["content"] == "" and r.json()["tokens_predicted"] == 0
    # A prefix longer than the context is cut (its end kept) and reported.
    r = _post(fim_server, "/infill", {"input_prefix": PREFIX * 40, "input_suffix": SUFFIX, "n_predict": 4,
                                      "top_k": 1})
    assert r.status_code == 200 and r.json()["truncated"] is True
    assert r.json()["tokens_evaluated"] + 4 <= 96
    # Streaming: llama.cpp's event shape, the last one with stop true; the pieces add up to the answer.
    body = {"input_prefix": PREFIX, "input_suffix": SUFFIX, "n_predict": 8, "top_k": 1, "stream": True}
    with httpx.stream("POST", f"{fim_server.base}/infill", json=body, headers={"Authorization": f"Bearer {KEY}"},
                      timeout=60) as resp:
        events = [json.loads(line[6:]) for line in resp.iter_lines() if line.startswith("data: ")]
    assert events[-1]["stop"] is True and all(e["stop"] is False for e in events[:-1])
    streamed = "".join(e["content"] for e in events)
    plain = _post(fim_server, "/infill", {**body, "stream": False}).json()["content"]
    assert streamed == plain


def test_infill_refuses_bad_input(fim_server, plain_server):
    r = _post(plain_server, "/infill", {"input_prefix": "a", "input_suffix": "b", "n_predict": 4})
    assert r.status_code == 400
    err = r.json()["error"]
    assert "<fim_prefix>" in err["message"] and "<fim_middle>" in err["message"]
    r = _post(fim_server, "/infill", {"input_prefix": "a", "n_predict": 4096})
    assert r.status_code == 400 and r.json()["error"]["param"] == "n_predict"
    r = _post(fim_server, "/infill", {"input_prefix": "a", "input_extra": [{"filename": "x", "text": 3}]})
    assert r.status_code == 400
    assert httpx.post(f"{fim_server.base}/infill", json={"input_prefix": "a"}).status_code == 401


def test_completions_suffix_with_the_openai_client(fim_server, fim_model, plain_server):
    client = openai.OpenAI(base_url=f"{fim_server.base}/v1", api_key=KEY)
    resp = client.completions.create(model="tiny-fim", prompt=PREFIX, suffix=SUFFIX, max_tokens=12, temperature=0)
    expected = _expected_middle(fim_model, PREFIX, SUFFIX, 12)
    assert resp.choices[0].text == expected.text
    assert resp.choices[0].finish_reason == expected.finish_reason
    # The Python API's own suffix= gives the same middle.
    model, tok = load(fim_model)
    assert generate(model, PREFIX, tok, suffix=SUFFIX, max_new_tokens=12, temperature=0)[0].text == expected.text
    with pytest.raises(openai.BadRequestError, match="echo"):
        client.completions.create(model="tiny-fim", prompt=PREFIX, suffix=SUFFIX, echo=True, max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="text"):
        client.completions.create(model="tiny-fim", prompt=[1, 2, 3], suffix=SUFFIX, max_tokens=2)
    plain = openai.OpenAI(base_url=f"{plain_server.base}/v1", api_key=KEY)
    with pytest.raises(openai.BadRequestError, match="<fim_suffix>") as err:
        plain.completions.create(model="tiny-chat", prompt="a", suffix="b", max_tokens=2)
    assert err.value.body["param"] == "suffix"
    # An empty suffix on a model without FIM tokens is an ordinary completion.
    assert plain.completions.create(model="tiny-chat", prompt="a", suffix="", max_tokens=2).choices[0].text is not None


def test_llama_cpp_server_infills_an_exported_model_as_we_do(tmp_path):
    """llama.cpp's own server ($LLAMACPP_BIN/llama-server) reads the GGUF's FIM keys and, on /infill, builds the
    prompt we build: its greedy tokens equal ours (same weights, same request)."""
    import os
    import subprocess
    from pathlib import Path

    import torch

    from serve_helpers import wait_healthy
    from gptforge.config import Config
    from gptforge.fim import FIM_SPECIAL_TOKENS
    from gptforge.interop.gguf import export_gguf
    from gptforge.loading import save
    from gptforge.model import GPT
    from gptforge.tokenizer import DEFAULT_SPECIAL_TOKENS, Tokenizer

    binary = Path(os.environ.get("LLAMACPP_BIN", "")) / "llama-server"
    if not os.environ.get("LLAMACPP_BIN") or not binary.is_file():
        pytest.skip("set LLAMACPP_BIN to a folder with llama.cpp's llama-server to run this check")
    tok = Tokenizer.train_bpe(list(FILES.values()), vocab_size=320,
                              special_tokens=[*DEFAULT_SPECIAL_TOKENS, *FIM_SPECIAL_TOKENS])
    torch.manual_seed(0)
    config = Config.from_name("nano", vocab_size=tok.vocab_size, block_size=128, n_embd=128, n_head=2, init_std=0.2)
    model = GPT(config).eval()
    save(tmp_path / "model", model, tok)
    path = export_gguf(model, tmp_path / "m.gguf", tokenizer=tok)
    port = free_port()
    proc = subprocess.Popen([str(binary), "-m", str(path), "--port", str(port), "-c", "128", "-t", "1", "-np", "1",
                             "--no-warmup"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    app = create_app(lambda: load(tmp_path / "model"), ServerOptions(model_name="m", api_keys=[KEY]))
    try:
        wait_healthy(f"http://127.0.0.1:{port}", timeout=60, proc=proc)
        body = {"input_prefix": PREFIX, "input_suffix": "    return y * 2\n", "prompt": "", "n_predict": 12,
                "temperature": 0, "top_k": 1, "return_tokens": True, "cache_prompt": False}
        theirs = httpx.post(f"http://127.0.0.1:{port}/infill", json=body, timeout=60).json()
        with InProcessServer(app, free_port()) as srv:
            ours = _post(srv, "/infill", body).json()
    finally:
        proc.terminate()
        proc.wait(30)
    assert theirs["tokens_evaluated"] == ours["tokens_evaluated"]  # the same prompt length
    # We also stop at FIM markers (llama.cpp only at end-of-generation tokens): compare what we generated.
    mine = [t for t in ours["tokens"] if t not in tok.special_ids]
    assert mine and theirs["tokens"][:len(mine)] == mine


def test_indent_limit_on_a_stream_holds_back_a_line_until_its_indent_is_known():
    from gptforge.serve.serving_infill import IndentLimit

    limit = IndentLimit(4)
    shown = [limit.push(piece) for piece in ("    a\n", "  ", "  b\n", "  ", "c = 1\n")]
    assert shown == ["    a\n", "", "    b\n", "", ""]
    assert limit.hit and limit.text == "    a\n    b\n" and limit.flush() == ""
    plain = IndentLimit(0)
    assert [plain.push(p) for p in ("a\n", "  ", "b")] == ["a\n", "  ", "b"] and not plain.hit
