"""Queueing, cancellation, timeouts, rate limits and content PII masking, on in-process uvicorn servers
whose model is slowed down (a sleep per forward) so that requests overlap deterministically."""

from __future__ import annotations

import io
import json
import re
import threading
import time

import httpx
import pytest

from gptforge.serve.app import ServerOptions, configure_logging

KEY = "sk-limits"
AUTH = {"Authorization": f"Bearer {KEY}"}
MODEL = "tiny-chat"
NO_EOS = {"logit_bias": {"0": -100, "3": -100}}  # bans <|endoftext|> and <|im_end|>: runs to max_tokens


def completion(base, **body):
    return httpx.post(f"{base}/v1/completions", json={"model": MODEL, "prompt": "Once", **body}, headers=AUTH,
                      timeout=60)


def gauge(base, name) -> float:
    text = httpx.get(f"{base}/metrics", headers=AUTH).text
    return float(re.search(rf"^{name} (\S+)$", text, re.M).group(1))


def wait_until(predicate, timeout=10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


@pytest.fixture(scope="module")
def slow(start_server):
    """One running row, one waiting slot, 30 ms per model step."""
    return start_server(ServerOptions(model_name=MODEL, api_keys=[KEY], max_batch=1, max_queue=1,
                                      request_timeout=60), step_delay=0.03)


def test_queue_full_is_429_with_retry_after(slow):
    with httpx.stream("POST", f"{slow.base}/v1/completions", headers=AUTH, timeout=60,
                      json={"model": MODEL, "prompt": "Once", "max_tokens": 60, "stream": True, **NO_EOS}) as running:
        lines = running.iter_lines()  # kept referenced: dropping the iterator would close the stream
        next(line for line in lines if line.startswith("data: "))  # the first request now holds the row
        waiter = threading.Thread(target=completion, args=(slow.base,), kwargs={"max_tokens": 2})
        waiter.start()
        assert wait_until(lambda: gauge(slow.base, "gptforge_requests_waiting") == 1)
        r = completion(slow.base, max_tokens=2)
        assert r.status_code == 429
        assert int(r.headers["Retry-After"]) >= 1
        assert r.json()["error"] == {"message": r.json()["error"]["message"], "type": "rate_limit_error",
                                     "param": None, "code": "queue_full"}
        running.close()
    waiter.join(30)


def test_client_disconnect_cancels_and_frees_the_slot(slow):
    before = gauge(slow.base, "gptforge_generation_tokens_total")
    for stream in (True, False):
        body = {"model": MODEL, "prompt": "Once", "max_tokens": 100, "stream": stream, **NO_EOS}
        if stream:
            with httpx.stream("POST", f"{slow.base}/v1/completions", json=body, headers=AUTH, timeout=60) as r:
                next(line for line in r.iter_lines() if line.startswith("data: "))
        else:
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(f"{slow.base}/v1/completions", json=body, headers=AUTH, timeout=0.5)
        # 100 tokens take >= 3 s; the slot must be free long before
        assert wait_until(lambda: gauge(slow.base, "gptforge_requests_running") == 0, timeout=2.0)
    generated = gauge(slow.base, "gptforge_generation_tokens_total") - before
    assert generated < 100
    last = completion(slow.base, max_tokens=3)
    assert last.status_code == 200, last.text  # the freed row serves the next request


def test_request_timeout_is_504(start_server):
    srv = start_server(ServerOptions(model_name=MODEL, api_keys=[KEY], max_batch=2, request_timeout=0.3),
                       step_delay=0.03)
    r = completion(srv.base, max_tokens=100, **NO_EOS)
    assert r.status_code == 504 and r.json()["error"]["code"] == "timeout"
    assert completion(srv.base, max_tokens=2).status_code == 200


def test_per_key_rate_limits(start_server):
    srv = start_server(ServerOptions(model_name=MODEL, api_keys=[KEY, "sk-other"], requests_per_minute=2,
                                     tokens_per_minute=200))
    assert completion(srv.base, max_tokens=2).status_code == 200
    assert completion(srv.base, max_tokens=2).status_code == 200
    r = completion(srv.base, max_tokens=2)
    assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limit_exceeded"
    assert 1 <= int(r.headers["Retry-After"]) <= 60
    other = {"Authorization": "Bearer sk-other"}  # limits are per key
    r = httpx.post(f"{srv.base}/v1/completions", json={"model": MODEL, "prompt": "Once", "max_tokens": 120, **NO_EOS},
                   headers=other)  # runs to max_tokens, so it really spends 120 of the 200 tokens
    assert r.status_code == 200
    r = httpx.post(f"{srv.base}/v1/completions", json={"model": MODEL, "prompt": "Once", "max_tokens": 100},
                   headers=other)
    assert r.status_code == 429 and "tokens per minute" in r.json()["error"]["message"] and r.headers["Retry-After"]


def test_pii_is_masked_in_prompts_outputs_and_logs(start_server, reference_model):
    _, tok = reference_model
    srv = start_server(ServerOptions(model_name=MODEL, api_keys=[KEY], redact_pii="content"))
    logs = io.StringIO()
    configure_logging(srv.app.state.server.options, stream=logs)
    prompt = "Mail bob@example.com or call +1 415 555 2671, card 4111 1111 1111 1111, host 10.0.0.7."
    masked = "Mail [EMAIL] or call [PHONE], card [CARD], host [IP]."
    r = completion(srv.base, prompt=prompt, max_tokens=3, echo=True, user="carol@example.org")
    assert r.status_code == 200
    assert r.json()["choices"][0]["text"].startswith(masked)
    assert r.json()["usage"]["prompt_tokens"] == len(tok.encode(masked))  # the model saw the masked prompt
    chat = httpx.post(f"{srv.base}/v1/chat/completions", headers=AUTH, json={
        "model": MODEL, "messages": [{"role": "user", "content": prompt}], "max_tokens": 3})
    assert chat.json()["usage"]["prompt_tokens"] == len(tok.apply_chat_template(
        [{"role": "user", "content": masked}], tokenize=True))
    entries = [json.loads(line) for line in logs.getvalue().splitlines()]
    assert any(e.get("user") == "[EMAIL]" for e in entries)
    assert "carol@example.org" not in logs.getvalue() and KEY not in logs.getvalue()
    assert all(e["client"] == "[IP]" for e in entries if "client" in e)


def test_output_masking_in_streams():
    from gptforge.serve.pii import StreamRedactor

    redactor = StreamRedactor()
    pieces = ["write to al", "ice@exam", "ple.com\nthen ", "4111 1111 ", "1111 1111 ok"]
    out = "".join(redactor.push(p) for p in pieces) + redactor.flush()
    assert out == "write to [EMAIL]\nthen [CARD] ok"


def test_moderation_policy_blocks_prompts_and_outputs(start_server, reference_model, tmp_path):
    import torch

    model, tok = reference_model
    messages = [{"role": "user", "content": "Say something"}]
    ids = tok.apply_chat_template(messages, tokenize=True)
    with torch.no_grad():  # the greedy reply, to build an output rule that it trips
        out = []
        for _ in range(12):
            token = int(model(torch.tensor([ids + out]))[0, -1].argmax())
            if token in tok.stop_token_ids():
                break
            out.append(token)
    reply = tok.decode(out)
    assert len(reply) >= 6, reply
    blocked = reply[len(reply) // 2: len(reply) // 2 + 3]
    policy = tmp_path / "policy.yaml"
    policy.write_text(json.dumps({"refusal": "Refused.", "input": {"blocked_terms": ["forbidden topic"]},
                                  "output": {"blocked_patterns": [re.escape(blocked)]}}))
    srv = start_server(ServerOptions(model_name=MODEL, api_keys=[KEY], moderation=str(policy)))

    def chat(content, **extra):
        return httpx.post(f"{srv.base}/v1/chat/completions", headers=AUTH, timeout=60, json={
            "model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 12, "temperature": 0,
            **extra})

    r = chat("tell me about the Forbidden   Topic please").json()
    assert r["choices"][0]["message"]["content"] == "Refused."
    assert r["choices"][0]["finish_reason"] == "content_filter" and r["usage"]["completion_tokens"] == 0
    r = chat("Say something").json()  # the output trips the rule: replaced by the refusal
    assert r["choices"][0]["message"]["content"] == "Refused." and r["choices"][0]["finish_reason"] == "content_filter"
    streamed, finishes = "", []
    with httpx.stream("POST", f"{srv.base}/v1/chat/completions", headers=AUTH, timeout=60, json={
            "model": MODEL, "messages": messages, "max_tokens": 12, "temperature": 0, "stream": True}) as resp:
        for line in resp.iter_lines():
            if line.startswith("data: {"):
                for choice in json.loads(line[6:])["choices"]:
                    streamed += choice["delta"].get("content") or ""
                    finishes += [choice["finish_reason"]] if choice["finish_reason"] else []
    assert blocked not in streamed and reply.startswith(streamed) and finishes == ["content_filter"]
    metrics = httpx.get(f"{srv.base}/metrics", headers=AUTH).text
    assert 'gptforge_moderation_blocked_total{direction="input",kind="term"} 1.0' in metrics
