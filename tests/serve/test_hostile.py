"""Hostile clients at the HTTP level: no input gets a 5xx, one tenant cannot fail another's requests, the
event loop never stalls, and every error is OpenAI-shaped."""

from __future__ import annotations

import json
import math
import socket
import statistics
import subprocess
import sys
import threading
import time

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gptforge.serve.app import ServerOptions
from gptforge.serve.pii import mask_pii

KEY = "sk-hostile"
MODEL = "hostile"
AUTH = {"Authorization": f"Bearer {KEY}"}
NO_EOS = {"logit_bias": {"0": -100, "3": -100}}  # bans the end tokens: streams run to max_tokens
POISON = [  # each once failed the whole batch or answered 500
    {"temperature": 1e-37, "presence_penalty": -2, "frequency_penalty": -2, "seed": 1},
    {"temperature": 1e-300},
    {"temperature": 5e-45, "seed": 3},
    {"temperature": 2, "logit_bias": {str(i): 100 for i in range(40)}, "presence_penalty": -2},
]


def is_openai_error(body: dict) -> bool:
    err = body.get("error")
    return isinstance(err, dict) and set(err) == {"message", "type", "param", "code"} and isinstance(err["message"], str)


@pytest.fixture(scope="module")
def srv(start_server, tmp_path_factory):
    return start_server(ServerOptions(model_name=MODEL, api_keys=[KEY], max_batch=16, max_queue=64,
                                      max_body_bytes=16 * 1024 * 1024, log_json=True,
                                      feedback_db=str(tmp_path_factory.mktemp("hostile") / "feedback.db")))


def post(base: str, path: str, body, **kwargs) -> httpx.Response:
    kwargs.setdefault("timeout", 120)
    if isinstance(body, (bytes, str)):
        return httpx.post(f"{base}{path}", content=body, headers={**AUTH, "Content-Type": "application/json"},
                          **kwargs)
    return httpx.post(f"{base}{path}", json=body, headers=AUTH, **kwargs)


def stream_lines(base: str, body: dict, out: list, errors: list) -> None:
    try:
        with httpx.stream("POST", f"{base}/v1/completions", json=body, headers=AUTH, timeout=120) as r:
            if r.status_code != 200:
                errors.append(r.status_code)
                return
            for line in r.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    out.append(json.loads(line[6:]))
    except Exception as exc:  # noqa: BLE001 - reported by the assertions
        errors.append(repr(exc))


def test_poisoned_requests_while_8_streams_run(srv):
    """8 normal streams all finish normally while other clients send sampling parameters that overflow."""
    results = [[] for _ in range(8)]
    errors: list = []
    threads = [threading.Thread(target=stream_lines, args=(srv.base, {
        "model": MODEL, "prompt": f"Once upon {i}", "max_tokens": 40, "stream": True, "seed": i, **NO_EOS},
        results[i], errors)) for i in range(8)]
    for t in threads:
        t.start()
    time.sleep(0.3)
    for body in POISON:
        r = post(srv.base, "/v1/completions", {"model": MODEL, "prompt": "Hello", "max_tokens": 20, **body})
        assert r.status_code == 200, r.text  # tiny temperatures decode greedily; overflow falls back to argmax
        assert r.json()["choices"][0]["finish_reason"] in ("stop", "length")
        r = post(srv.base, "/v1/chat/completions", {"model": MODEL, "max_tokens": 8, **body,
                                                     "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 200, r.text
    for t in threads:
        t.join(120)
    assert not errors, errors
    for chunks in results:
        assert not any("error" in c for c in chunks)
        assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"][0]["finish_reason"]] == ["length"]
    health = httpx.get(f"{srv.base}/health").json()
    metrics = httpx.get(f"{srv.base}/metrics", headers=AUTH).text
    assert health["running"] == 0 and "gptforge_requests_running 0.0" in metrics  # no stale gauge


@pytest.mark.parametrize("path,body,param", [
    ("/v1/completions", {"model": MODEL, "prompt": "a\ud800b"}, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": ["ok", "a\udfffb"]}, "prompt[1]"),
    ("/v1/completions", {"model": "m\ud800", "prompt": "hi"}, "model"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x\ud800"}]},
     "messages[0].content"),
    ("/tokenize", {"model": MODEL, "prompt": "\udc00"}, "prompt"),
])
def test_lone_surrogates_are_400_naming_the_field_and_the_connection_survives(srv, path, body, param):
    with httpx.Client(base_url=srv.base, headers=AUTH, timeout=30) as client:  # one keep-alive connection
        data = json.dumps(body, ensure_ascii=True)  # "\ud800" as JSON escapes, exactly as a client sends them
        r = client.post(path, content=data, headers={"Content-Type": "application/json"})
        assert r.status_code == 400, r.text
        assert is_openai_error(r.json()) and r.json()["error"]["param"] == param
        again = client.post("/v1/completions", json={"model": MODEL, "prompt": "fine", "max_tokens": 2})
        assert again.status_code == 200


def test_null_max_tokens_near_the_context(srv):
    near = list(range(10, 10 + 127))  # 127 of 128 context tokens: one left
    r = post(srv.base, "/v1/completions", {"model": MODEL, "prompt": near, "max_tokens": None, **NO_EOS})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 1
    full = list(range(10, 10 + 128))
    r = post(srv.base, "/v1/completions", {"model": MODEL, "prompt": full, "max_tokens": None})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    r = post(srv.base, "/v1/chat/completions", {"model": MODEL, "max_tokens": None,
                                                "messages": [{"role": "user", "content": "fox " * 200}]})
    assert r.status_code == 400 and "maximum context length" in r.json()["error"]["message"]


def test_limits_are_checked_before_tokenizing(srv):
    r = post(srv.base, "/v1/completions", {"model": MODEL, "prompt": ["x"] * 2000})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"  # more than MAX_PROMPTS
    r = post(srv.base, "/v1/completions", {"model": MODEL, "prompt": ["x"] * 70})
    assert r.status_code == 400 and r.json()["error"]["param"] == "n"  # more sequences than the queue holds
    r = post(srv.base, "/v1/completions", {"model": MODEL, "prompt": "hi", "stop": [str(i) for i in range(17)]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "stop"
    started = time.perf_counter()
    r = post(srv.base, "/tokenize", {"model": MODEL, "prompt": "word " * 1_500_000})  # 7.5 MB
    assert r.status_code == 400 and "cannot fit" in r.json()["error"]["message"]
    assert time.perf_counter() - started < 30  # refused from its size, never tokenized (a sanity bound)


def test_health_answers_quickly_while_megabytes_are_tokenized(srv):
    """Parsing, template rendering and tokenizing of multi-megabyte bodies never stall the event loop."""
    messages = [{"role": "user", "content": "déjà vu " * 70} for _ in range(6000)]  # ~3.5 MB of JSON
    done: list = []
    heavy = [threading.Thread(target=lambda: done.append(post(srv.base, "/tokenize", {"model": MODEL,
                                                                                      "messages": messages})))
             for _ in range(2)]
    latencies: list[float] = []
    for t in heavy:
        t.start()
    while any(t.is_alive() for t in heavy) or not latencies:
        started = time.perf_counter()
        assert httpx.get(f"{srv.base}/health", timeout=10).status_code == 200
        latencies.append(time.perf_counter() - started)
        time.sleep(0.02)
    for t in heavy:
        t.join(120)
    assert len(done) == 2 and all(r.status_code == 400 for r in done), [r.text[:200] for r in done]
    # A blocked event loop answers after the whole tokenization (~19 s for 8 MB). The median is the 1 s
    # promise; one reply may wait longer when other processes hold both cores (seen at load 10+).
    assert statistics.median(latencies) < 1.0 and max(latencies) < 3.0, latencies


def test_many_stop_strings_cost_little_and_single_request_over_the_token_budget_is_400(start_server):
    limited = start_server(ServerOptions(model_name=MODEL, api_keys=[KEY], tokens_per_minute=500))
    r = post(limited.base, "/v1/completions", {"model": MODEL, "prompt": "Once", "max_tokens": 600})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
    stops = [f"zz{i:02d}" for i in range(16)]  # the documented maximum
    r = post(limited.base, "/v1/completions", {"model": MODEL, "prompt": "Once", "max_tokens": 30, "stop": stops})
    assert r.status_code == 200


def test_json_mode_with_a_tiny_budget_says_length(srv):
    r = post(srv.base, "/v1/chat/completions", {"model": MODEL, "max_tokens": 1, "response_format":
                                                {"type": "json_object"}, "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 200
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "length"  # cut by the budget: the docs say only "stop" replies parse
    r = post(srv.base, "/v1/chat/completions", {"model": MODEL, "max_tokens": 40, "response_format":
                                                {"type": "json_object"}, "messages": [{"role": "user", "content": "x"}]})
    choice = r.json()["choices"][0]
    if choice["finish_reason"] == "stop":
        assert isinstance(json.loads(choice["message"]["content"]), dict)


def raw_http(base: str, request: bytes) -> bytes:
    host, port = base.rsplit("/", 1)[-1].split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(request)
        chunks = []
        while True:
            try:
                data = sock.recv(65536)
            except socket.timeout:
                break
            if not data:
                break
            chunks.append(data)
        return b"".join(chunks)


@pytest.mark.parametrize("request_bytes", [
    b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n{}",
    b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n{}",
    b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 100_000 + b"\r\n\r\n",
])
def test_malformed_http_gets_a_4xx_and_the_server_stays_up(srv, request_bytes):
    reply = raw_http(srv.base, request_bytes)
    status = int(reply.split(b" ", 2)[1]) if reply.startswith(b"HTTP/1.1") else None
    assert status is None or 400 <= status < 500, reply[:200]  # the HTTP parser's own 400/431 (docs/serve.md)
    assert httpx.get(f"{srv.base}/health").status_code == 200


def test_a_model_that_fails_to_load_exits_non_zero(tmp_path, model_dir):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(model_dir, broken)
    config = json.loads((broken / "config.json").read_text())
    config["gptforge"]["n_layer"] = config["num_hidden_layers"] = 3  # the weights hold 2 layers
    (broken / "config.json").write_text(json.dumps(config))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = str(probe.getsockname()[1])
    proc = subprocess.run([sys.executable, "-m", "gptforge.cli", "serve", "--model", str(broken), "--port", port],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "no tensors for layer 2" in proc.stderr


def test_pii_masking_runs_in_linear_time():
    """Each pattern scales linearly on adversarial input (10x the text costs ~10x, never ~100x)."""
    units = ["a.", "1 ", "1-", "1.", "1:", "a@", "a@b.", "+1 ", "(1) ", "1 2", "12 34 ", "x.y@", "DE89 "]

    def cost(n: int) -> float:
        best = math.inf
        for _ in range(3):
            started = time.perf_counter()
            for unit in units:
                mask_pii(unit * (n // len(unit)))
            best = min(best, time.perf_counter() - started)
        return best

    small, large = cost(20_000), cost(200_000)
    assert large < 25 * small, (small, large)  # quadratic patterns gave ~100x
    assert mask_pii("write to jo.doe+x@mail.example.com. or call +1 (555) 123-4567") == \
        "write to [EMAIL]. or call [PHONE]"


JSON_NUMBERS = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-(2**70), 2**70),
                         st.sampled_from([1e-300, 5e-45, 1e-37, 1e308, -0.0, 2**63, -(2**63) - 1]))
TEXT = st.text(alphabet=st.characters(codec=None, exclude_categories=()), max_size=20) | st.sampled_from(
    ["\ud800", "a\udfffb", "\x00", "\u202eevil", "🙂" * 5, "x" * 5000])
VALUE = st.recursive(st.none() | st.booleans() | JSON_NUMBERS | TEXT,
                     lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=3),
                     max_leaves=8)
COMPLETION_FIELDS = ["prompt", "max_tokens", "temperature", "top_p", "n", "stop", "logprobs", "echo", "logit_bias",
                     "seed", "stream", "stream_options", "top_k", "min_p", "best_of", "presence_penalty",
                     "frequency_penalty", "suffix", "user", "repetition_penalty", "structured_outputs"]
CHAT_FIELDS = ["messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "n", "stop", "logprobs",
               "top_logprobs", "logit_bias", "seed", "stream", "stream_options", "response_format", "user", "tools",
               "tool_choice", "parallel_tool_calls", "structured_outputs"]


EMBEDDING_FIELDS = ["input", "dimensions", "encoding_format", "user"]
FEEDBACK_FIELDS = ["id", "choice_index", "rating", "chosen_index", "rejected_index", "edited", "comment", "model",
                   "messages", "prompt", "completions"]
PATHS = {"completions": "/v1/completions", "chat": "/v1/chat/completions", "embeddings": "/v1/embeddings",
         "feedback": "/v1/feedback"}


@pytest.mark.slow
def test_fuzz_no_5xx_and_every_error_is_openai_shaped(srv):
    """Property: extreme numbers, unicode edge cases, nulls in every optional field, oversized values,
    completions, chat, embeddings and feedback, streaming or not: never a 5xx, and every error (also inside a stream)
    has OpenAI's shape."""
    client = httpx.Client(base_url=srv.base, headers=AUTH, timeout=120)

    def check(path: str, body: dict) -> None:
        data = json.dumps(body, ensure_ascii=True, allow_nan=True)
        r = client.post(path, content=data, headers={"Content-Type": "application/json"})
        assert r.status_code < 500, (body, r.text[:300])
        if r.status_code >= 400:
            assert is_openai_error(r.json()), r.text[:300]
        elif r.headers.get("content-type", "").startswith("text/event-stream"):
            for line in r.text.splitlines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    event = json.loads(line[6:])
                    assert "error" not in event or is_openai_error(event), line[:300]

    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.sampled_from(["completions", "chat", "embeddings", "feedback"]), st.data())
    def run(kind: str, data) -> None:
        fields = {"completions": COMPLETION_FIELDS, "chat": CHAT_FIELDS, "embeddings": EMBEDDING_FIELDS,
                  "feedback": FEEDBACK_FIELDS}[kind]
        body = data.draw(st.dictionaries(st.sampled_from(fields), VALUE, max_size=6))
        nulls = data.draw(st.lists(st.sampled_from(fields), max_size=3))
        body.update({name: None for name in nulls})
        body.setdefault("model", MODEL)
        if kind == "completions":
            body.setdefault("prompt", "Hello")
        elif kind == "chat":
            body.setdefault("messages", [{"role": "user", "content": "Hello"}])
        elif kind == "feedback":
            body.pop("model")
            if data.draw(st.booleans()):  # about a kept response, or about given content
                body.setdefault("id", responses[data.draw(st.integers(0, len(responses) - 1))])
            else:
                body.setdefault("prompt", "Hello")
                body.setdefault("completions", ["Hi", "Go away"])
            body.setdefault("rating", data.draw(st.sampled_from([1, -1, 0, 2, "up", True, None])))
        else:
            body.setdefault("input", "Hello")
        if isinstance(body.get("max_tokens"), int) and body["max_tokens"] > 16:
            body["max_tokens"] = 16  # keep generation short; huge values are drawn elsewhere too
        check(PATHS[kind], body)

    responses = [client.post("/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": "Hi"}],
                                                         "n": 2, "max_tokens": 3}).json()["id"],
                 client.post("/v1/completions", json={"model": MODEL, "prompt": ["a", "b"], "max_tokens": 3}).json()["id"]]
    run()
    client.close()
