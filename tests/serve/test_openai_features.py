"""Structured outputs, tool calls and embeddings, driven by the official `openai` client against a real
`gptforge serve` process. The model is random: the tests check structure (valid JSON matching the schema,
the shape of tool calls, finish reasons, vector norms), never content."""

from __future__ import annotations

import json
import re
from typing import Literal

import httpx
import jsonschema
import openai
import pytest
import torch
from pydantic import BaseModel

from serve_helpers import CORPUS
from gptforge.config import Config
from gptforge.loading import load, save
from gptforge.model import GPT
from gptforge.tokenizer import Tokenizer

API_KEY = "sk-test-0123456789"  # as configured by conftest.server
MODEL_NAME = "tiny-tools"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "additionalProperties": False, "required": ["city", "unit"],
                   "properties": {"city": {"type": "string", "maxLength": 12},
                                  "unit": {"enum": ["celsius", "fahrenheit"]}}}}}
ADD = {"type": "function", "function": {
    "name": "add", "parameters": {"type": "object", "additionalProperties": False, "required": ["a", "b"],
                                  "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}}}}
QUESTION = [{"role": "user", "content": "What is the weather in Paris?"}]


class Person(BaseModel):
    name: str
    age: int
    role: Literal["admin", "user"]
    tags: list[str]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """Like conftest's model, with a context long enough for tool definitions in the prompt."""
    torch.manual_seed(0)
    tokenizer = Tokenizer.train_bpe(CORPUS * 20, vocab_size=320)
    config = Config(name="tiny", family="llama", vocab_size=tokenizer.vocab_size, block_size=1024, n_layer=2,
                    n_head=4, n_embd=64, pos_embedding="rope", norm="rmsnorm", mlp="swiglu", bias=False)
    path = tmp_path_factory.mktemp("serve-tools") / MODEL_NAME
    save(path, GPT(config), tokenizer)
    return path


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.base}/v1", api_key=API_KEY, max_retries=0, timeout=120)


def post(server, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{server.base}{path}", json=body, headers=AUTH, timeout=120)


# ---- structured outputs -----------------------------------------------------------------------

@pytest.mark.parametrize("seed", [0, 1, 2])
def test_parse_returns_a_pydantic_object(client, seed):
    res = client.chat.completions.parse(model=MODEL_NAME, messages=[{"role": "user", "content": "A person."}],
                                        response_format=Person, max_tokens=60, temperature=1.0, seed=seed)
    choice = res.choices[0]
    assert choice.finish_reason == "stop"  # the budget forced the object closed: never "length"
    assert isinstance(choice.message.parsed, Person)
    assert res.usage.completion_tokens <= 60


def test_json_schema_streamed_and_json_object_parse(client):
    schema = {"type": "object", "required": ["id", "items"], "additionalProperties": False,
              "properties": {"id": {"type": "integer", "minimum": 1},
                             "items": {"type": "array", "items": {"type": "string"}, "maxItems": 3}}}
    for seed in (3, 4):
        stream = client.chat.completions.create(
            model=MODEL_NAME, messages=[{"role": "user", "content": "JSON"}], max_tokens=40, seed=seed, stream=True,
            response_format={"type": "json_schema", "json_schema": {"name": "order", "schema": schema, "strict": True}})
        chunks = list(stream)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        jsonschema.validate(json.loads(text), schema)
        assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]
    for max_tokens in (6, 24):  # JSON mode closes the object within a small budget too
        res = client.chat.completions.create(model=MODEL_NAME, messages=QUESTION, max_tokens=max_tokens, seed=5,
                                             response_format={"type": "json_object"})
        assert isinstance(json.loads(res.choices[0].message.content), dict)


def test_regex_and_choice_extensions_on_chat_and_completions(client):
    for seed in range(3):
        res = client.chat.completions.create(model=MODEL_NAME, messages=QUESTION, max_tokens=30, seed=seed,
                                             extra_body={"structured_outputs": {"regex": r"[a-z]{2,8}@[a-z]{2,6}\.(com|org)"}})
        assert re.fullmatch(r"[a-z]{2,8}@[a-z]{2,6}\.(com|org)", res.choices[0].message.content)
        assert res.choices[0].finish_reason == "stop"
        res = client.completions.create(model=MODEL_NAME, prompt="Answer:", max_tokens=10, seed=seed, n=2,
                                        extra_body={"structured_outputs": {"choice": ["yes", "no", "maybe so"]}})
        assert all(c.text in ("yes", "no", "maybe so") and c.finish_reason == "stop" for c in res.choices)


@pytest.mark.parametrize("body,param", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}},
     "response_format.json_schema.schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format.json_schema.schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#/nowhere"}}}},
     "response_format.json_schema.schema"),
    ({"structured_outputs": {"regex": "(unclosed"}}, "structured_outputs.regex"),
    ({"structured_outputs": {"grammar": "start: undefined_rule"}}, "structured_outputs.grammar"),
    ({"structured_outputs": {"choice": []}}, "structured_outputs.choice"),
    ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs"),
    ({"structured_outputs": {"regex": "a"}, "response_format": {"type": "json_object"}}, "structured_outputs"),
    ({"structured_outputs": {"json": {"type": "object", "properties": {"a": None}}}}, "structured_outputs.json"),
])
def test_invalid_grammars_are_400_naming_the_field(server, body, param):
    r = post(server, "/v1/chat/completions", {"model": MODEL_NAME, "messages": QUESTION, "max_tokens": 4, **body})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_deep_and_recursive_schemas(server):
    deep: dict = {"type": "string"}
    for _ in range(300):  # far deeper than any real schema: refused before the compiler recurses into it
        deep = {"type": "object", "properties": {"a": deep}}
    r = post(server, "/v1/chat/completions", {"model": MODEL_NAME, "messages": QUESTION, "response_format": {
        "type": "json_schema", "json_schema": {"name": "deep", "schema": deep}}})
    assert r.status_code == 400 and "deeper" in r.json()["error"]["message"]
    tree = {"$defs": {"n": {"type": "object", "required": ["kids"], "additionalProperties": False,
                            "properties": {"kids": {"type": "array", "items": {"$ref": "#/$defs/n"}}}}},
            "$ref": "#/$defs/n"}
    r = post(server, "/v1/chat/completions", {"model": MODEL_NAME, "messages": QUESTION, "max_tokens": 30, "seed": 1,
                                              "response_format": {"type": "json_schema",
                                                                  "json_schema": {"name": "tree", "schema": tree}}})
    assert r.status_code == 200
    jsonschema.validate(json.loads(r.json()["choices"][0]["message"]["content"]), tree)


# ---- tool calls -------------------------------------------------------------------------------

def check_call(call, tools=(WEATHER, ADD)) -> dict:
    """A tool call's shape; its arguments parsed and validated against the tool's parameters."""
    assert call.type == "function" and call.id.startswith("call_")
    schema = {t["function"]["name"]: t["function"]["parameters"] for t in tools}[call.function.name]
    args = json.loads(call.function.arguments)
    jsonschema.validate(args, schema)
    return args


def test_required_tool_call_then_tool_result_round_trip(client, reference_model_tools):
    tok = reference_model_tools
    res = client.chat.completions.create(model=MODEL_NAME, messages=QUESTION, tools=[WEATHER, ADD],
                                         tool_choice="required", max_tokens=80, seed=0)
    choice = res.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert choice.message.tool_calls
    for call in choice.message.tool_calls:
        check_call(call)
    messages = QUESTION + [choice.message.model_dump(exclude_none=True)] + [
        {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature": 21})}
        for call in choice.message.tool_calls]
    final = client.chat.completions.create(model=MODEL_NAME, messages=messages, tools=[WEATHER, ADD],
                                           tool_choice="none", max_tokens=8, seed=0)
    assert final.choices[0].message.tool_calls is None and final.choices[0].finish_reason in ("stop", "length")
    # the prompt the model saw holds the calls and their results (tools are not shown with tool_choice "none")
    rendered = [{"role": "user", "content": QUESTION[0]["content"]},
                {"role": "assistant", "content": "", "tool_calls": [
                    {"function": {"name": c.function.name, "arguments": json.loads(c.function.arguments)}}
                    for c in choice.message.tool_calls]}] + \
        [{"role": "tool", "content": '{"temperature": 21}'} for _ in choice.message.tool_calls]
    text = tok.apply_chat_template(rendered)
    assert "<tool_response>" in text and "<tool_call>" in text
    assert final.usage.prompt_tokens == len(tok.encode(text, add_special_tokens=False))


@pytest.fixture(scope="module")
def reference_model_tools(model_dir):
    return load(model_dir)[1]


def test_named_and_single_calls(client):
    for seed in range(3):
        res = client.chat.completions.create(model=MODEL_NAME, messages=QUESTION, tools=[WEATHER, ADD], seed=seed,
                                             tool_choice={"type": "function", "function": {"name": "add"}},
                                             max_tokens=60)
        calls = res.choices[0].message.tool_calls
        assert len(calls) == 1 and calls[0].function.name == "add" and res.choices[0].finish_reason == "tool_calls"
        check_call(calls[0])
        res = client.chat.completions.create(model=MODEL_NAME, messages=QUESTION, tools=[WEATHER, ADD], seed=seed,
                                             tool_choice="required", parallel_tool_calls=False, max_tokens=60)
        assert len(res.choices[0].message.tool_calls) == 1


def test_tool_calls_stream_as_deltas_like_the_whole_reply(client):
    kwargs = dict(model=MODEL_NAME, messages=QUESTION, tools=[WEATHER, ADD], tool_choice="required",
                  max_tokens=80, seed=7, temperature=1.0)
    whole = client.chat.completions.create(**kwargs).choices[0]
    calls: dict[int, dict] = {}
    finish = []
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        assert not delta.content  # calls never arrive inside content
        for d in delta.tool_calls or []:
            entry = calls.setdefault(d.index, {"id": d.id, "name": "", "arguments": ""})
            entry["name"] += d.function.name or ""
            entry["arguments"] += d.function.arguments or ""
        if chunk.choices[0].finish_reason:
            finish.append(chunk.choices[0].finish_reason)
    assert finish == ["tool_calls"]
    assert [(c["name"], json.loads(c["arguments"])) for _, c in sorted(calls.items())] == \
        [(c.function.name, json.loads(c.function.arguments)) for c in whole.message.tool_calls]
    assert all(c["id"].startswith("call_") for c in calls.values())


def test_auto_tool_choice_returns_content_or_valid_calls(client):
    res = client.chat.completions.create(model=MODEL_NAME, messages=QUESTION, tools=[WEATHER], max_tokens=12, seed=1,
                                         n=3)
    for choice in res.choices:  # a random model rarely writes a whole call; whatever it writes has one shape
        if choice.message.tool_calls:
            assert choice.finish_reason == "tool_calls"
            for call in choice.message.tool_calls:
                check_call(call)
        else:
            assert isinstance(choice.message.content, str) and choice.finish_reason in ("stop", "length")


@pytest.mark.parametrize("body,param", [
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": 5}}}]},
     "tools[0].function.parameters"),
    ({"tools": [WEATHER, {"type": "function", "function": {"name": "g", "parameters": {"$ref": "#/x"}}}],
      "tool_choice": "auto"}, "tools[1].function.parameters"),
    ({"tools": [WEATHER, WEATHER]}, "tools[1].function.name"),
    ({"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice"),
])
def test_invalid_tool_requests_are_400(server, body, param):
    r = post(server, "/v1/chat/completions", {"model": MODEL_NAME, "messages": QUESTION, "max_tokens": 4, **body})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_bad_function_name_is_400(server):
    tool = {"type": "function", "function": {"name": "has space", "parameters": {"type": "object"}}}
    r = post(server, "/v1/chat/completions", {"model": MODEL_NAME, "messages": QUESTION, "tools": [tool]})
    assert r.status_code == 400 and r.json()["error"]["param"].startswith("tools[0].function.name")


# ---- embeddings -------------------------------------------------------------------------------

def reference_embedding(model, ids: list[int]) -> torch.Tensor:
    """The final norm's output at the last token, unit length: computed with a full forward and a hook on
    the norm itself (not the server's code path)."""
    out = {}
    hook = model.norm_f.register_forward_hook(lambda m, a, o: out.__setitem__("h", o))
    with torch.no_grad():
        model(torch.tensor([ids]))
    hook.remove()
    return torch.nn.functional.normalize(out["h"][0, -1].float(), dim=-1)


def test_embeddings_with_the_official_client(client, model_dir):
    model, tok = load(model_dir)
    texts = ["The quick brown fox", "Hello world!", "a", "Once upon a time there was a tiny model " * 3]
    res = client.embeddings.create(model=MODEL_NAME, input=texts)  # the client asks for base64 and decodes it
    floats = client.embeddings.create(model=MODEL_NAME, input=texts, encoding_format="float")
    assert [d.index for d in res.data] == list(range(len(texts)))
    assert res.usage.prompt_tokens == sum(len(tok.encode(t)) for t in texts) == res.usage.total_tokens
    for text, b64, flt in zip(texts, res.data, floats.data):
        got = torch.tensor(b64.embedding)
        assert got.shape == (model.config.n_embd,)
        assert torch.allclose(got, torch.tensor(flt.embedding), atol=1e-6)
        assert abs(float(got.norm()) - 1) < 1e-4
        assert torch.allclose(got, reference_embedding(model, tok.encode(text)), atol=1e-4)
    ids = client.embeddings.create(model=MODEL_NAME, input=[tok.encode(texts[1])], encoding_format="float")
    assert torch.allclose(torch.tensor(ids.data[0].embedding), torch.tensor(floats.data[1].embedding), atol=1e-5)


def test_embeddings_batch_matches_one_by_one(client):
    texts = [f"{'word ' * (i % 17)}item {i}" for i in range(40)]  # many lengths: several micro-batches
    batch = client.embeddings.create(model=MODEL_NAME, input=texts, encoding_format="float")
    for i in (0, 7, 23, 39):
        one = client.embeddings.create(model=MODEL_NAME, input=texts[i], encoding_format="float")
        assert torch.allclose(torch.tensor(one.data[0].embedding), torch.tensor(batch.data[i].embedding), atol=1e-5)


@pytest.mark.parametrize("body,status,param", [
    ({"input": ""}, 400, "input"),
    ({"input": ["ok", ""]}, 400, "input[1]"),
    ({"input": [[1, 2], [99999]]}, 400, "input[1]"),
    ({"input": "fox " * 2000}, 400, "input"),
    ({"input": "x", "dimensions": 3}, 400, "dimensions"),
    ({"input": "x", "encoding_format": "int8"}, 400, "encoding_format"),
    ({"input": []}, 400, "input"),
    ({"input": "x", "model": "other"}, 404, "model"),
])
def test_embedding_errors(server, body, status, param):
    r = post(server, "/v1/embeddings", {"model": MODEL_NAME, **body})
    assert r.status_code == status, r.text
    assert r.json()["error"]["param"] == param
