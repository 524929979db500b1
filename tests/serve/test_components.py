"""Server building blocks without a server: PII masking, the JSON grammar, API keys, rate limits, errors."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gptforge.serve.auth import APIKeyChecker, collect_keys, key_from_headers
from gptforge.serve.errors import APIError
from gptforge.serve.json_grammar import START, JSONConstraint, feed_bytes, shortest_completion
from gptforge.serve.pii import luhn_valid, mask_pii
from gptforge.serve.ratelimit import RateLimiter


@pytest.mark.parametrize("text,expected", [
    ("write to jane.doe+x@mail.example.co.uk today", "write to [EMAIL] today"),
    ("card 4111-1111-1111-1111 ok", "card [CARD] ok"),
    ("card 4111 1111 1111 1112 ok", "card 4111 1111 1111 1112 ok"),  # fails the Luhn check
    ("call (020) 7946 0958 or +44 20 7946 0958", "call [PHONE] or [PHONE]"),
    ("from 192.168.1.20 and 2001:db8::8a2e:370:7334.", "from [IP] and [IP]."),
    ("ssn 078-05-1120", "ssn [SSN]"),
    ("iban DE89 3704 0044 0532 0130 00", "iban [IBAN]"),
    ("in 2024 we sold 1,500 units at 3.14 each, version 1.2.3, at 12:30:45", None),
])
def test_mask_pii(text, expected):
    assert mask_pii(text) == (text if expected is None else expected)


def test_luhn():
    assert luhn_valid("4111111111111111") and luhn_valid("79927398713")
    assert not luhn_valid("4111111111111112")


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3),
    max_leaves=8)


@settings(max_examples=150, deadline=None)
@given(st.dictionaries(st.text(max_size=5), json_values, max_size=4), st.data())
def test_grammar_accepts_every_json_object_and_closes_every_prefix(obj, data):
    text = json.dumps(obj, separators=(",", ":")).encode()
    assert feed_bytes(START, text)[0] == "DONE"
    cut = data.draw(st.integers(0, len(text)))
    state = feed_bytes(START, text[:cut])
    assert state is not None
    closed = text[:cut] + shortest_completion(state)
    assert isinstance(json.loads(closed), dict)


@pytest.mark.parametrize("bad", [b"[1]", b'{"a":01}', b'{"a":1,}', b"{'a':1}", b'{"a":tru ', b'{"a"1}', b'"x"'])
def test_grammar_rejects_non_objects(bad):
    state = feed_bytes(START, bad)
    assert state is None or state[0] != "DONE"


def test_constraint_masks_and_forces_closing_tokens():
    vocab = [bytes([b]) for b in range(128)] + [b'{"', b'":', b"true", b"}}", None]
    constraint = JSONConstraint(vocab)
    allowed = constraint.allowed(START)
    assert allowed[ord("{")] and allowed[128] and not allowed[ord("[")] and not allowed[132]
    state = feed_bytes(START, b'{"ab')
    assert constraint.forced_token(state, budget=10) is None
    assert constraint.forced_token(state, budget=4) == ord('"')  # '"', ':', '0', '}' are exactly 4 tokens
    near_end = constraint.allowed_within(feed_bytes(START, b'{"a":'), budget=2)
    assert near_end[ord("0")] and near_end[130]  # a number or 'true', then '}': fits in 2 tokens
    assert not near_end[ord('"')] and not near_end[ord("[")]  # a string or array could not close in time


def test_api_keys_hashed_and_constant_time(tmp_path):
    keys_file = tmp_path / "keys.txt"
    keys_file.write_text("# team keys\nsk-file\n\n")
    keys = collect_keys(["sk-flag"], keys_file, environ={"GPTFORGE_API_KEYS": "sk-env1, sk-env2"})
    assert keys == ["sk-flag", "sk-env1", "sk-env2", "sk-file"]
    checker = APIKeyChecker(keys)
    assert checker.enabled and checker.check("sk-env2") and checker.check("sk-file")
    assert checker.check("sk-env") is None and checker.check("") is None and checker.check(None) is None
    assert "sk-flag" not in repr(vars(checker))  # only digests are kept
    assert checker.check("sk-flag") != checker.check("sk-file")  # key ids tell keys apart without revealing them
    assert key_from_headers("Bearer abc", None) == "abc" and key_from_headers(None, "xyz") == "xyz"
    assert key_from_headers("Basic abc", None) is None
    with pytest.raises(FileNotFoundError, match="api-keys-file"):
        collect_keys([], tmp_path / "missing.txt", environ={})
    (tmp_path / "empty.txt").write_text("# nothing\n")
    with pytest.raises(ValueError, match="no keys"):
        collect_keys([], tmp_path / "empty.txt", environ={})


def test_rate_limiter_sliding_window():
    now = [0.0]
    limiter = RateLimiter(requests_per_minute=2, tokens_per_minute=100, clock=lambda: now[0])
    limiter.admit("a", 10)
    now[0] = 10.0
    limiter.admit("a", 10)
    with pytest.raises(APIError) as info:
        limiter.admit("a", 10)
    assert info.value.status == 429 and info.value.headers["Retry-After"] == "50"
    limiter.admit("b", 90)  # other keys are independent
    with pytest.raises(APIError, match="tokens per minute"):
        limiter.admit("b", 20)
    with pytest.raises(APIError, match="more than the limit"):
        limiter.admit("c", 101)
    now[0] = 60.5  # the first request left the window
    limiter.admit("a", 10)
    limiter.adjust("b", 90, 5)  # b used fewer tokens than estimated
    limiter.admit("b", 20)


def test_api_error_shape():
    err = APIError(429, "slow down", code="queue_full", headers={"Retry-After": "3"})
    assert err.body() == {"error": {"message": "slow down", "type": "rate_limit_error", "param": None,
                                    "code": "queue_full"}}
    assert err.response().headers["retry-after"] == "3"
    assert json.loads(err.sse()[len("data: "):])["error"]["code"] == "queue_full"


def test_deploy_files_reference_real_metrics():
    """Alert rules, the dashboard and the HPA only use metric names the server exports."""
    import re
    from pathlib import Path

    import yaml

    from gptforge.serve.metrics import ServerMetrics

    deploy = Path(__file__).resolve().parents[2] / "deploy"
    exported = set(re.findall(r"^# TYPE (\w+) (\w+)", ServerMetrics().render().decode(), re.M))
    names = {name for name, _ in exported}
    names |= {f"{name}_{suffix}" for name, kind in exported if kind == "histogram"
              for suffix in ("bucket", "sum", "count")}
    names |= {f"{name}_total" for name, kind in exported if kind == "counter"}
    rules = yaml.safe_load((deploy / "prometheus" / "alerts.yaml").read_text())["groups"][0]["rules"]
    texts = [r["expr"] for r in rules]
    texts += [t["expr"] for p in json.loads((deploy / "grafana" / "gptforge-serve.json").read_text())["panels"]
              for t in p["targets"]]
    hpa = yaml.safe_load((deploy / "kubernetes" / "hpa.yaml").read_text())
    texts += [m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"]
    used = {name for text in texts for name in re.findall(r"\bgptforge_\w+", text)}
    assert used and used <= names, used - names
    kinds = {doc["kind"] for f in (deploy / "kubernetes").glob("*.yaml") for doc in yaml.safe_load_all(f.read_text())}
    assert {"Deployment", "Service", "HorizontalPodAutoscaler"} <= kinds
    assert "gptforge\", \"serve\"" in (deploy / "Dockerfile").read_text()


def test_served_name_is_the_run_s_name(tmp_path):
    from gptforge.commands.serve import served_name

    assert served_name(tmp_path / "runs" / "demo" / "model") == "demo"
    assert served_name(tmp_path / "runs" / "demo" / "best") == "demo-best"
    assert served_name(tmp_path / "runs" / "words-lora" / "merged") == "words-lora-merged"
    assert served_name(tmp_path / "tiny-model") == "tiny-model"


def test_serve_cli_names_a_missing_model_folder_and_policy(tmp_path, capsys):
    from gptforge.cli import main

    assert main(["serve", "--model", str(tmp_path / "runs" / "demo" / "modle")]) == 2
    assert capsys.readouterr().err.strip() == (f"gptforge serve: error: --model: model directory not found: "
                                               f"{tmp_path / 'runs' / 'demo' / 'modle'}")
