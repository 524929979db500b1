"""Server building blocks without a server: PII masking, grammars (structured outputs), tool-call parsing,
API keys, rate limits, errors."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from serve_helpers import CORPUS

from gptforge.serve.auth import APIKeyChecker, collect_keys, key_from_headers
from gptforge.serve.errors import APIError
from gptforge.serve.grammar import GrammarEngine, GrammarSpec
from gptforge.serve.tools import ToolCallStream, parse_tool_calls
from gptforge.tokenizer import Tokenizer
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


@pytest.fixture(scope="module")
def grammars():
    """The grammar engine over the test tokenizer, and its single-byte token of each byte."""
    tok = Tokenizer.train_bpe(CORPUS * 20, vocab_size=320)
    byte_token = {b[0]: i for i, b in enumerate(tok.token_bytes()) if b and len(b) == 1 and i not in tok.special_ids}
    return GrammarEngine(tok, tok.vocab_size, tok.stop_token_ids()), byte_token, tok


def feed(engine, spec, data: bytes | list[int], byte_token):
    """A constraint fed `data` (bytes as single-byte tokens, or token ids), checking each token was allowed;
    None once one is not."""
    constraint = engine.constraint(engine.compile(spec))
    for t in data:
        t = byte_token[t] if isinstance(data, bytes) else t
        if not allows(constraint.allowed(10_000), t):
            return None
        constraint.advance(t)
    return constraint


def allows(step, token: int) -> bool:
    """Whether a constraint's answer (a forced id, a bool mask or a logit bias) lets `token` come next."""
    if isinstance(step, int):
        return step == token
    return bool(step[token]) if step.dtype == torch.bool else bool(step[token] == 0)


def closed_text(engine, constraint, tok, data: bytes) -> bytes:
    path = engine.closing_path(constraint.matcher, 200)
    assert path is not None
    return data + b"".join(tok.token_bytes()[t] for t in path if t not in tok.special_ids)


@settings(max_examples=100, deadline=None)
@given(st.dictionaries(st.text(max_size=5), json_values, max_size=4), st.data())
def test_json_mode_accepts_every_object_and_closes_every_prefix(grammars, obj, data):
    engine, byte_token, tok = grammars
    text = json.dumps(obj, separators=(",", ":")).encode()
    done = feed(engine, GrammarSpec.json_object(), text, byte_token)
    assert done is not None and done.complete
    cut = data.draw(st.integers(0, len(text)))
    part = feed(engine, GrammarSpec.json_object(), text[:cut], byte_token)
    assert isinstance(json.loads(closed_text(engine, part, tok, text[:cut])), dict)


@pytest.mark.parametrize("bad", [b"[1]", b'{"a":01}', b'{"a":1,}', b"{'a':1}", b'{"a":tru ', b'{"a"1}', b'"x"',
                                 b'{"a": 1}'])  # compact JSON: no whitespace between tokens
def test_json_mode_rejects_non_objects(grammars, bad):
    engine, byte_token, _ = grammars
    constraint = feed(engine, GrammarSpec.json_object(), bad, byte_token)
    assert constraint is None or not constraint.complete


SCHEMA = {"type": "object", "additionalProperties": False, "required": ["name", "age", "role", "tags"],
          "properties": {"name": {"type": "string"}, "age": {"type": "integer", "minimum": 0},
                         "role": {"enum": ["admin", "user"]}, "tags": {"type": "array", "items": {"type": "string"}}}}


@settings(max_examples=40, deadline=None)
@given(st.builds(lambda name, age, role, tags: {"name": name, "age": age, "role": role, "tags": tags},  # schema order
                 st.text(max_size=6), st.integers(0, 10**6), st.sampled_from(["admin", "user"]),
                 st.lists(st.text(max_size=3), max_size=3)), st.data())
def test_json_schema_accepts_instances_and_closes_prefixes_into_instances(grammars, obj, data):
    jsonschema = pytest.importorskip("jsonschema")
    engine, byte_token, tok = grammars
    spec = GrammarSpec.json_schema(SCHEMA, "response_format.json_schema.schema")
    # Tokens as the tokenizer splits the text (where bytes are forced, llguidance admits their canonical tokens)
    ids = tok.encode(json.dumps(obj, separators=(",", ":")))
    assert feed(engine, spec, ids, byte_token).complete
    cut = data.draw(st.integers(0, len(ids)))
    prefix = b"".join(tok.token_bytes()[t] for t in ids[:cut])
    closed = json.loads(closed_text(engine, feed(engine, spec, ids[:cut], byte_token), tok, prefix))
    jsonschema.validate(closed, SCHEMA)
    for bad in ({**obj, "role": "root"}, {**obj, "age": -1}, {**obj, "extra": 1}, {"name": "x"}):
        constraint = feed(engine, spec, tok.encode(json.dumps(bad, separators=(",", ":"))), byte_token)
        assert constraint is None or not constraint.complete


def test_constraint_forces_a_closing_path_within_the_budget(grammars):
    engine, byte_token, tok = grammars
    constraint = feed(engine, GrammarSpec.json_object(), b'{"ab":[1,{"c":"xy', byte_token)
    assert not isinstance(constraint.allowed(500), int)  # plenty of room: a mask
    budget = 12
    out = b'{"ab":[1,{"c":"xy'
    while not constraint.complete:
        step = constraint.allowed(budget)
        assert isinstance(step, int), "a short budget forces the closing tokens"
        constraint.advance(step)
        out += tok.token_bytes()[step] if step not in tok.special_ids else b""
        budget -= 1
    assert budget >= 0 and json.loads(out) == {"ab": [1, {"c": "xy"}]}


@pytest.mark.parametrize("spec,good,bad", [
    (GrammarSpec.regex(r"[a-z]+@[a-z]+\.com", "structured_outputs.regex"), b"ab@cd.com", b"ab@cd.org"),
    (GrammarSpec.choice(["yes", "no", "a|b"], "structured_outputs.choice"), b"a|b", b"a"),
    (GrammarSpec.lark('start: "x" NUM\nNUM: /[0-9]+/', "structured_outputs.grammar"), b"x42", b"y1"),
])
def test_regex_choice_and_lark_grammars(grammars, spec, good, bad):
    engine, byte_token, tok = grammars
    constraint = feed(engine, spec, tok.encode(good.decode()), byte_token)
    assert constraint is not None
    if not constraint.complete:  # the regex may go on: the end token must be allowed, and then it is complete
        assert allows(constraint.allowed(1000), engine.stop_ids[0])
        constraint.advance(engine.stop_ids[0])
    assert constraint.complete
    refused = feed(engine, spec, tok.encode(bad.decode()), byte_token)
    assert refused is None or not refused.complete


@pytest.mark.parametrize("spec,param,message", [
    (lambda: GrammarSpec.regex("(a|", "structured_outputs.regex"), "structured_outputs.regex", "regex"),
    (lambda: GrammarSpec.json_schema({"type": "foo"}, "response_format.json_schema.schema"),
     "response_format.json_schema.schema", "foo"),
    (lambda: GrammarSpec.json_schema({"$ref": "#/defs/none"}, "tools[0].function.parameters"),
     "tools[0].function.parameters", "defs"),
    (lambda: GrammarSpec.json_schema(_nested(200), "structured_outputs.json"), "structured_outputs.json", "deeper"),
    (lambda: GrammarSpec.json_schema({"enum": ["x" * 100] * 1000}, "structured_outputs.json"),
     "structured_outputs.json", "characters"),
    (lambda: GrammarSpec.lark("start: missing", "structured_outputs.grammar"), "structured_outputs.grammar",
     "missing"),
    (lambda: GrammarSpec.choice([], "structured_outputs.choice"), "structured_outputs.choice", "at least one"),
])
def test_bad_grammars_are_400_naming_the_field(grammars, spec, param, message):
    engine = grammars[0]
    with pytest.raises(APIError) as info:
        engine.compile(spec())
    assert info.value.status == 400 and info.value.param == param and message in info.value.message


def _nested(depth: int) -> dict:
    schema: dict = {"type": "string"}
    for _ in range(depth):
        schema = {"type": "object", "properties": {"a": schema}}
    return schema


def test_recursive_schema_compiles_and_generates(grammars):
    engine, byte_token, tok = grammars
    tree = {"$defs": {"node": {"type": "object", "properties": {"children": {"type": "array", "items": {
        "$ref": "#/$defs/node"}}}, "required": ["children"], "additionalProperties": False}}, "$ref": "#/$defs/node"}
    spec = GrammarSpec.json_schema(tree, "response_format.json_schema.schema")
    text = '{"children":[{"children":[]},{"children":[{"children":[]}]}]}'
    assert feed(engine, spec, tok.encode(text), byte_token).complete


def test_tool_call_text_parsing_whole_and_streamed():
    names = {"get_weather", "add"}
    text = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
            '<tool_call>\n{"name": "add", "arguments": "{\\"a\\": 1}"}\n</tool_call>\n'
            '<tool_call>{"name": "unknown", "arguments": {}}</tool_call>')
    content, calls = parse_tool_calls(text, names)
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("get_weather", {"city": "Paris"}), ("add", {"a": 1})]
    assert content.startswith("Let me check.") and "unknown" in content and "get_weather" not in content
    assert len({c.id for c in calls}) == 2 and all(c.id.startswith("call_") for c in calls)
    for size in (1, 3, 7):  # any split of the stream gives the same content and calls
        stream = ToolCallStream(names)
        shown, streamed = "", []
        for i in range(0, len(text), size):
            part, got = stream.push(text[i:i + size])
            shown, streamed = shown + part, streamed + got
        part, got = stream.flush()
        shown, streamed = shown + part, streamed + got
        assert [(c.name, c.arguments) for c in streamed] == [(c.name, c.arguments) for c in calls]
        assert shown.strip() == content
    plain = "no calls here <tool but not a tag "
    assert parse_tool_calls(plain, names) == (plain, [])
    stream = ToolCallStream(names)
    assert "".join(stream.push(plain)[0]) + stream.flush()[0] == plain
    assert parse_tool_calls('<tool_call>\n{"name": "add", "arguments": {}}', names)[1][0].name == "add"  # left open


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
