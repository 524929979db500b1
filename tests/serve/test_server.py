"""The real `gptforge serve` process driven by the official `openai` client (and raw HTTP for errors)."""

from __future__ import annotations

import json
import math
import re
import signal
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch
from gptforge.feedback.store import FeedbackStore

API_KEY = "sk-test-0123456789"  # as configured by conftest.server
MODEL_NAME = "tiny-chat"  # the model directory's name

AUTH = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.base}/v1", api_key=API_KEY, max_retries=0, timeout=60)


def greedy_reference(model, ids: list[int], n: int, stop_ids: list[int]) -> list[int]:
    """Greedy decoding with full recomputation (no cache, no batching): what the engine must reproduce."""
    ids = list(ids)
    out: list[int] = []
    with torch.no_grad():
        for _ in range(n):
            token = int(model(torch.tensor([ids]))[0, -1].argmax())
            out.append(token)
            if token in stop_ids:
                break
            ids.append(token)
    return out


def test_health_models_and_auth(server, client):
    assert httpx.get(f"{server.base}/health").json()["status"] == "ok"  # /health needs no key
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL_NAME]
    for path in ("/v1/models", "/metrics", "/tokenizer_info", "/docs", "/openapi.json", "/v1/nowhere"):
        r = httpx.get(f"{server.base}{path}")
        assert r.status_code == 401, path
        assert r.json()["error"]["type"] == "authentication_error"
    r = httpx.get(f"{server.base}/v1/models", headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401 and r.json()["error"]["message"] == "invalid API key"
    # keys from the environment work too
    assert httpx.get(f"{server.base}/v1/models", headers={"Authorization": "Bearer sk-env-key"}).status_code == 200
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.base}/v1", api_key="nope", max_retries=0).models.list()
    assert httpx.get(f"{server.base}/openapi.json", headers=AUTH).json()["paths"]["/v1/completions"]


def test_greedy_completion_matches_the_model(server, client, reference_model):
    model, tok = reference_model
    prompt = "The quick brown"
    res = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=12, temperature=0)
    choice = res.choices[0]
    expected = greedy_reference(model, tok.encode(prompt), 12, tok.stop_token_ids())
    text_ids = [t for t in expected if t not in tok.stop_token_ids()]
    assert choice.text == tok.decode(text_ids)
    assert choice.finish_reason == ("stop" if len(expected) < 12 or expected[-1] in tok.stop_token_ids() else "length")
    assert res.usage.prompt_tokens == len(tok.encode(prompt))
    assert res.usage.completion_tokens == len(expected)
    assert res.usage.total_tokens == res.usage.prompt_tokens + res.usage.completion_tokens


def test_prompt_forms_n_and_seed(client, reference_model):
    _, tok = reference_model
    ids = tok.encode("Hello world")
    for prompt in (["Hello world", "Once upon"], [ids, tok.encode("Once upon")]):
        res = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=5, n=2, temperature=1.0, seed=7)
        assert sorted(c.index for c in res.choices) == [0, 1, 2, 3]
        assert res.usage.prompt_tokens == len(ids) + len(tok.encode("Once upon"))
    # a token-id prompt is used as given and gives the same result as its text
    a = client.completions.create(model=MODEL_NAME, prompt=ids, max_tokens=6, temperature=0.8, seed=3)
    b = client.completions.create(model=MODEL_NAME, prompt="Hello world", max_tokens=6, temperature=0.8, seed=3)
    assert a.choices[0].text == b.choices[0].text
    # the seed makes sampling reproducible; different choices of one request differ in their seeds
    c = client.completions.create(model=MODEL_NAME, prompt=ids, max_tokens=6, temperature=0.8, seed=3, n=2)
    assert c.choices[0].text == a.choices[0].text


def test_stop_strings(client):
    full = client.completions.create(model=MODEL_NAME, prompt="Once upon a time", max_tokens=16,
                                     temperature=0).choices[0].text
    visible = full.strip()
    assert len(visible) >= 4, full
    stop = visible[2:4]
    res = client.completions.create(model=MODEL_NAME, prompt="Once upon a time", max_tokens=16, temperature=0,
                                    stop=[stop, "never-appears"])
    assert res.choices[0].finish_reason == "stop"
    assert res.choices[0].text == full[:full.index(stop)]


def test_echo_logprobs_match_the_model(client, reference_model):
    """lm-evaluation-harness's log-likelihood request: token ids, echo, logprobs=1, max_tokens=1."""
    model, tok = reference_model
    ids = tok.encode("The quick brown fox jumps")
    res = client.completions.create(model=MODEL_NAME, prompt=[ids], max_tokens=1, temperature=0, echo=True,
                                    logprobs=1)
    lp = res.choices[0].logprobs
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert len(lp.token_logprobs) == len(ids) + 1
    with torch.no_grad():
        expected = torch.log_softmax(model(torch.tensor([ids]))[0].float(), -1)
    for t in range(1, len(ids)):
        assert math.isclose(lp.token_logprobs[t], float(expected[t - 1, ids[t]]), abs_tol=1e-4)
        assert max(lp.top_logprobs[t].values()) == pytest.approx(float(expected[t - 1].max()), abs=1e-4)
    assert lp.tokens[: len(ids)] == [tok.decode([i]) for i in ids]
    assert res.choices[0].text.startswith(tok.decode(ids))
    # echo with max_tokens=0 returns only the prompt
    res0 = client.completions.create(model=MODEL_NAME, prompt="Hello", max_tokens=0, echo=True, logprobs=0)
    assert res0.choices[0].text == "Hello" and res0.usage.completion_tokens == 0


def test_streaming_completion_with_usage(client):
    kwargs = dict(model=MODEL_NAME, prompt="Once upon a time", max_tokens=20, temperature=0)
    whole = client.completions.create(**kwargs)
    chunks = list(client.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == \
        [whole.choices[0].finish_reason]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_chat_nonstreaming_streaming_n_and_logprobs(client, reference_model):
    _, tok = reference_model
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello!"}]
    res = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_completion_tokens=10,
                                         temperature=0, logprobs=True, top_logprobs=3)
    choice = res.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason in ("stop", "length")
    assert res.usage.prompt_tokens == len(tok.apply_chat_template(messages, tokenize=True))
    content = choice.logprobs.content
    assert len(content) == res.usage.completion_tokens
    assert all(len(t.top_logprobs) >= 3 and t.logprob <= 0 for t in content)
    assert all(t.logprob == pytest.approx(max(x.logprob for x in t.top_logprobs)) for t in content)  # greedy
    stream = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=10, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == choice.message.content
    assert chunks[-1].usage.total_tokens == res.usage.total_tokens
    many = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=8, n=3, seed=1)
    assert sorted(c.index for c in many.choices) == [0, 1, 2]
    assert many.usage.completion_tokens >= 3


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_json_object_response_format_parses(client, seed):
    for max_tokens in (6, 24):
        res = client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "Give JSON."}],
                                             response_format={"type": "json_object"}, max_tokens=max_tokens,
                                             temperature=1.0, seed=seed)
        assert isinstance(json.loads(res.choices[0].message.content), dict)
        assert res.usage.completion_tokens <= max_tokens


def _post(server, path, body=None, content=None, headers=AUTH):
    return httpx.post(f"{server.base}{path}", json=body, content=content,
                      headers={**headers, "Content-Type": "application/json"}, timeout=30)


@pytest.mark.parametrize("body,param", [
    ({"temperature": 5}, "temperature"),
    ({"n": 0}, "n"),
    ({"top_p": 0}, "top_p"),
    ({"max_tokens": -1}, "max_tokens"),
    ({"logprobs": 50}, "logprobs"),
    ({"logit_bias": {"abc": 1}}, "logit_bias"),
    ({"logit_bias": {"5": 500}}, "logit_bias"),
    ({"prompt": [[1, 2], [99999]]}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"stop": 5}, "stop"),
    ({"suffix": "x"}, "suffix"),
    ({"max_tokens": 500}, "max_tokens"),
    ({"seed": 2**70}, "seed"),
    ({"prompt": ["a"] * 10, "n": 8}, "n"),  # 80 sequences can never fit the 64-slot queue
])
def test_invalid_parameters_are_400_naming_the_param(server, body, param):
    r = _post(server, "/v1/completions", {"model": MODEL_NAME, "prompt": "hi", **body})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error"
    assert param in err["message"] or err["code"] == "invalid_parameter"


def test_error_statuses(server, client):
    # missing required field -> 400 naming it
    r = _post(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "model"
    r = _post(server, "/v1/chat/completions", {"model": MODEL_NAME, "messages": [{"role": "wizard", "content": "x"}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages[0].role"
    r = _post(server, "/v1/chat/completions", {"model": MODEL_NAME, "messages": [{"role": "user", "content": "x"}],
                                               "top_logprobs": 2})
    assert r.status_code == 400 and r.json()["error"]["param"] == "top_logprobs"
    # unknown model -> 404 (the openai client's NotFoundError)
    with pytest.raises(openai.NotFoundError) as info:
        client.completions.create(model="gpt-9", prompt="hi", max_tokens=1)
    assert info.value.body["param"] == "model"
    # unknown route -> 404 in OpenAI shape; wrong method -> 405
    r = httpx.get(f"{server.base}/v1/engines", headers=AUTH)
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
    assert httpx.get(f"{server.base}/v1/completions", headers=AUTH).status_code == 405
    # body too large -> 413 (Content-Length and chunked)
    big = json.dumps({"model": MODEL_NAME, "prompt": "x" * 70000})
    r = _post(server, "/v1/completions", content=big)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

    def chunks():
        for _ in range(20):
            yield b" " * 5000

    r = httpx.post(f"{server.base}/v1/completions", content=chunks(), headers={**AUTH, "Content-Type": "application/json"})
    assert r.status_code == 413
    # malformed JSON -> 422; a JSON non-object -> 422
    r = _post(server, "/v1/completions", content=b'{"model": "tiny-chat", "prompt": ')
    assert r.status_code == 422 and r.json()["error"]["code"] == "json_invalid"
    # prompt longer than the context -> 400 with the lengths
    r = _post(server, "/v1/completions", {"model": MODEL_NAME, "prompt": list(range(10, 140)), "max_tokens": 1})
    assert r.status_code == 400
    message = r.json()["error"]["message"]
    assert "128" in message and "130 in the prompt" in message
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "fox " * 200}])


def test_random_bodies_never_get_a_500(server):
    """Client mistakes are 4xx: random field values on both generation routes never produce a 5xx."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    scalars = st.none() | st.booleans() | st.integers(-3, 300) | st.floats(-3, 3) | st.text(max_size=6)
    values = scalars | st.lists(scalars | st.lists(st.integers(-2, 400), max_size=3), max_size=3) | \
        st.dictionaries(st.sampled_from(["type", "role", "content", "5", "x"]), scalars, max_size=2)
    fields = ["prompt", "messages", "max_tokens", "temperature", "top_p", "n", "stop", "logprobs", "echo",
              "logit_bias", "seed", "top_logprobs", "response_format", "stream", "top_k", "min_p", "best_of"]

    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.sampled_from(["/v1/completions", "/v1/chat/completions"]),
           st.dictionaries(st.sampled_from(fields), values, max_size=5))
    def check(path, body):
        body = {"model": MODEL_NAME, "max_tokens": 4, **body}
        r = _post(server, path, body)
        assert r.status_code < 500, (body, r.text)

    check()


def test_tokenizer_endpoints_work_with_lm_eval_remote_tokenizer(server, reference_model):
    from lm_eval.utils import RemoteTokenizer, check_remote_tokenizer_support

    _, tok = reference_model
    text = "Hello world! The quick fox."
    r = _post(server, "/tokenize", {"prompt": text})
    assert r.json()["tokens"] == tok.encode(text) and r.json()["count"] == len(tok.encode(text))
    assert _post(server, "/detokenize", {"tokens": tok.encode(text)}).json()["prompt"] == text
    assert _post(server, "/detokenize", {"tokens": [10**6]}).json()["error"]["param"] == "tokens"
    base = f"{server.base}/v1/completions"
    assert check_remote_tokenizer_support(base, auth_token=API_KEY)
    remote = RemoteTokenizer(base, auth_token=API_KEY)
    assert remote.encode(text) == tok.encode(text)
    assert remote.decode(tok.encode(text)) == text
    assert remote.eos_token == tok.eos_token and remote.eos_token_id == tok.eos_token_id
    assert remote.apply_chat_template([{"role": "user", "content": "hi"}]) == \
        tok.apply_chat_template([{"role": "user", "content": "hi"}])


def test_32_concurrent_requests_all_succeed_and_match_sequential(server, client):
    prompts = [f"Once upon a time {i}" for i in range(32)]

    def run(prompt):
        return client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=16, temperature=0)

    sequential = {p: run(p).choices[0].text for p in prompts[:4]}
    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(run, prompts))
    assert len(results) == 32 and all(r.usage.completion_tokens >= 1 for r in results)
    # batched decoding (cache rows, other requests joining mid-way) gives the same greedy text
    for p, r in zip(prompts[:4], results[:4]):
        assert r.choices[0].text == sequential[p]
    metrics = httpx.get(f"{server.base}/metrics", headers=AUTH).text
    assert re.search(r'gptforge_requests_total\{route="/v1/completions",status="200"\} (\d+)', metrics)
    for name in ("gptforge_time_to_first_token_seconds_bucket", "gptforge_inter_token_latency_seconds_bucket",
                 "gptforge_request_latency_seconds_bucket", "gptforge_queue_time_seconds_bucket",
                 "gptforge_requests_running", "gptforge_requests_waiting", "gptforge_prompt_tokens_total",
                 "gptforge_generation_tokens_total"):
        assert name in metrics, name
    assert 'status="401"' in metrics and 'status="413"' in metrics


def test_access_logs_are_json_with_request_ids_and_no_secrets(server):
    r = _post(server, "/v1/completions", {"model": MODEL_NAME, "prompt": "hi", "max_tokens": 2,
                                          "user": "alice@example.com"}, headers={**AUTH, "X-Request-ID": "req-42"})
    assert r.status_code == 200 and r.headers["x-request-id"] == "req-42"
    lines = [json.loads(line) for line in server.log.splitlines() if line.startswith("{")]
    entry = next(e for e in lines if e.get("request_id") == "req-42")
    assert entry["status"] == 200 and entry["path"] == "/v1/completions" and entry["prompt_tokens"] >= 1
    assert entry["user"] == "[EMAIL]" and entry["key_id"]
    assert API_KEY not in server.log and "sk-env-key" not in server.log and "alice@example.com" not in server.log


MC_RECORDS = [
    {"prompt": "The quick brown", "choices": ["fox", "dog", "world"], "answer": 0},
    {"prompt": "Hello", "choices": [" world", " fox", " time"], "answer": 0},
    {"prompt": "Once upon a", "choices": [" time", " dog", " model"], "answer": 0},
    {"prompt": "The lazy", "choices": [" dog", " fox"], "answer": 0},
    {"prompt": "a tiny model that served", "choices": [" requests", " apples"], "answer": 0},
    {"prompt": "Hello world! {\"name\":", "choices": [" \"fox\"", " \"dog\"", " tree"], "answer": 0},
]
MC_YAML = """\
task: gptforge_serve_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{prompt}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
target_delimiter: ""
metric_list:
  - metric: acc
  - metric: acc_norm
"""


@pytest.mark.slow
def test_lm_eval_local_completions_equals_in_process_harness(server, model_dir, tmp_path, monkeypatch):
    """lm-eval's `local-completions` model (token-id requests, the server's tokenizer via /tokenize) against
    the server scores a custom JSONL multiple-choice task exactly as the in-process `gptforge eval --harness`."""
    import lm_eval
    import lm_eval.models.openai_completions  # noqa: F401  (registers "local-completions")
    from lm_eval.tasks import TaskManager

    from gptforge.eval.harness import run_harness

    for name, value in {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "OPENAI_API_KEY": API_KEY,
                        "HF_DATASETS_CACHE": str(tmp_path / "hf")}.items():
        monkeypatch.setenv(name, value)
    data = tmp_path / "mc.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in MC_RECORDS))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "mc.yaml").write_text(MC_YAML.format(data=data))
    model_args = (f"model={MODEL_NAME},base_url={server.base}/v1/completions,tokenized_requests=True,"
                  f"tokenizer_backend=remote,auth_token={API_KEY},max_length=120,num_concurrent=4,max_retries=1")
    output = lm_eval.simple_evaluate(model="local-completions", model_args=model_args, tasks=["gptforge_serve_mc"],
                                     task_manager=TaskManager(include_path=str(tasks), include_defaults=False),
                                     batch_size=1, bootstrap_iters=0)
    served = output["results"]["gptforge_serve_mc"]
    local = run_harness(model_dir, ["gptforge_serve_mc"], include_path=tasks, batch_size=4)["results"]["gptforge_serve_mc"]
    assert output["n-samples"]["gptforge_serve_mc"]["effective"] == len(MC_RECORDS)
    assert served["acc,none"] == pytest.approx(local["acc"])
    assert served["acc_norm,none"] == pytest.approx(local["acc_norm"])
    print("served", served, "local", local)


CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


@pytest.mark.slow
def test_chat_page_in_headless_chromium(server, client, tmp_path):
    """The chat page in Debian's Chromium: API key field, system prompt, sampling controls, streaming, stop;
    and feedback: a thumb, a better answer and the better of two side-by-side answers reach the database."""
    import os

    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        pytest.skip("Debian's chromium and chromium-driver are not installed")
    from selenium import webdriver
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    from selenium.common.exceptions import TimeoutException

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    wait = WebDriverWait(driver, 30)
    by_id = lambda name: driver.find_element(By.ID, name)  # noqa: E731

    def set_value(name, value):
        driver.execute_script("arguments[0].value = arguments[1]; arguments[0].dispatchEvent(new Event('change'))",
                              by_id(name), value)

    try:
        driver.get(f"{server.base}/")  # the page itself loads without a key...
        wait.until(lambda d: by_id("model-name").text == "enter your API key")  # ...but the API needs one
        assert "needs an API key" in by_id("error").text
        assert not by_id("compare-label").is_displayed()  # no feedback controls until GET /v1/feedback says so
        set_value("api-key", API_KEY)
        wait.until(lambda d: by_id("model-name").text == MODEL_NAME)
        wait.until(lambda d: by_id("compare-label").is_displayed())
        set_value("system-prompt", "Be brief.")
        set_value("temperature", "0")
        set_value("max-tokens", "12")
        by_id("prompt").send_keys("Hello!")
        by_id("send").click()
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".message.assistant[data-done='true']"))
        reply = driver.find_element(By.CSS_SELECTOR, ".message.assistant")
        expected = client.chat.completions.create(
            model=MODEL_NAME, temperature=0, max_tokens=12,
            messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello!"}])
        assert reply.text == expected.choices[0].message.content.strip() or \
            driver.execute_script("return arguments[0].textContent", reply) == expected.choices[0].message.content
        assert reply.get_attribute("data-finish-reason") == expected.choices[0].finish_reason
        assert by_id("error").get_attribute("hidden") is not None
        # feedback (the server has a --feedback-db): thumbs up, then a better answer, for this reply
        first_answer = driver.find_element(By.CSS_SELECTOR, ".answer")
        first_answer.find_element(By.CSS_SELECTOR, ".thumb-up").click()
        wait.until(lambda d: first_answer.find_element(By.CSS_SELECTOR, ".feedback").get_attribute("data-sent") == "1")
        first_answer.find_element(By.CSS_SELECTOR, ".edit-toggle").click()
        better = first_answer.find_element(By.CSS_SELECTOR, ".edit textarea")
        better.clear()
        better.send_keys("Hi! How can I help?")
        first_answer.find_element(By.CSS_SELECTOR, ".edit button[type=submit]").click()
        wait.until(lambda d: first_answer.find_element(By.CSS_SELECTOR, ".feedback").get_attribute("data-sent") == "2")
        assert first_answer.find_element(By.CSS_SELECTOR, ".thumb-up").get_attribute("class").split().count("selected")
        first_text = driver.execute_script("return arguments[0].textContent", reply)
        first_id = first_answer.get_attribute("data-response-id")
        assert first_id and first_id.startswith("chatcmpl")
        # a conversation longer than the 128-token context: older turns are left out, every reply arrives
        for i in range(3):
            by_id("prompt").send_keys(f"turn {i}: " + "the quick brown fox " * 3)
            by_id("send").click()
            wait.until(lambda d, n=i + 2: len(d.find_elements(By.CSS_SELECTOR,
                                                                ".message.assistant[data-done='true']")) == n)
        replies = driver.find_elements(By.CSS_SELECTOR, ".message.assistant")
        assert all(r.get_attribute("data-finish-reason") in ("stop", "length") for r in replies), \
            [(r.get_attribute("data-finish-reason"), r.text, by_id("error").text) for r in replies]
        assert "left out" in by_id("error").text and "128-token context" in by_id("error").text
        # compare mode: two sampled answers side by side; picking B stores B as chosen and A as rejected
        by_id("clear").click()
        by_id("compare").click()
        set_value("temperature", "1")
        set_value("max-tokens", "10")
        for attempt in range(1, 4):  # a sampled answer can be empty (EOS first); the page offers no pick then
            if attempt > 1:
                by_id("clear").click()  # the same one-turn conversation again (compare mode stays on)
            by_id("prompt").send_keys("Tell me a story")
            by_id("send").click()
            wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".pair .message.assistant[data-done='true']")) == 2)
            pair = driver.find_element(By.CSS_SELECTOR, ".pair")
            try:
                WebDriverWait(driver, 10).until(lambda d: len(pair.find_elements(By.CSS_SELECTOR, ".pick")) == 2)
                break
            except TimeoutException:
                assert attempt < 3, "no pair of non-empty answers in three tries"
        a_text, b_text = (driver.execute_script("return arguments[0].textContent", m)
                          for m in pair.find_elements(By.CSS_SELECTOR, ".message.assistant"))
        pair_id = pair.find_element(By.CSS_SELECTOR, ".answer").get_attribute("data-response-id")
        pair.find_elements(By.CSS_SELECTOR, ".pick")[1].click()
        wait.until(lambda d: pair.find_elements(By.CSS_SELECTOR, ".answer.chosen"))
        assert "chosen" in pair.find_elements(By.CSS_SELECTOR, ".answer")[1].get_attribute("class")
        driver.set_window_size(1100, 760)
        driver.save_screenshot(str(tmp_path / "chat-feedback.png"))  # kept with the test's files, for a look
        assert by_id("error").get_attribute("hidden") is not None, by_id("error").text
        by_id("compare").click()  # back to one answer per message
        store = FeedbackStore.open(server.db)
        try:
            stored = store.feedback()
        finally:
            store.close()
        rated = [r for r in stored if r.response_id == first_id]
        assert sorted(((r.rating, r.edited) for r in rated), key=str) == [(1, None), (None, "Hi! How can I help?")], rated
        assert all(r.completions == [first_text] and r.endpoint == "chat" and r.model == MODEL_NAME and
                   r.prompt == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello!"}]
                   for r in rated)
        (picked,) = [r for r in stored if r.response_id == pair_id]
        assert (picked.chosen, picked.rejected) == (b_text, a_text) and picked.completions == [a_text, b_text]
        assert picked.prompt == [{"role": "system", "content": "Be brief."},
                                 {"role": "user", "content": "Tell me a story"}]
        # the stop button aborts a long reply mid-stream
        by_id("clear").click()  # a new conversation keeps the prompt short
        set_value("max-tokens", "80")
        set_value("temperature", "1")
        by_id("prompt").send_keys("Go on")
        # Deterministic race: the page's requests ban the end-of-text/turn tokens (ids 0 and 3 of the
        # fixture tokenizer), so the reply can only end by length or by Stop; Stop is clicked as soon as
        # the first streamed text lands in the reply.
        driver.execute_script("""
            const realFetch = window.fetch;
            window.fetch = (url, opts) => {
              if (opts && opts.body) {
                const body = JSON.parse(opts.body);
                body.logit_bias = {"0": -100, "3": -100};
                opts = Object.assign({}, opts, {body: JSON.stringify(body)});
              }
              return realFetch(url, opts);
            };
            const messages = document.getElementById('messages');
            const observer = new MutationObserver(() => {
              const replies = messages.querySelectorAll('.message.assistant');
              const last = replies[replies.length - 1];
              if (last && last.textContent.length > 0 && last.dataset.done !== 'true') {
                observer.disconnect();
                document.getElementById('stop').click();
              }
            });
            observer.observe(messages, {childList: true, subtree: true, characterData: true});
            document.getElementById('send').click();""")
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".message.assistant[data-done='true']"))
        (second,) = driver.find_elements(By.CSS_SELECTOR, ".message.assistant")
        assert by_id("error").get_attribute("hidden") is not None, by_id("error").text
        assert second.get_attribute("data-finish-reason") == "stopped"
        assert not by_id("send").get_attribute("disabled") and by_id("stop").get_attribute("disabled")
    finally:
        driver.quit()


def test_token_healing_extension(client, reference_model):
    _, tok = reference_model
    prompt = "The quick brown fox jumps over the "
    res = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=6, temperature=0,
                                    extra_body={"token_healing": True})
    plain = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=6, temperature=0)
    assert res.usage.prompt_tokens == len(tok.encode(prompt)) - 1  # the last prompt token is re-chosen
    assert plain.usage.prompt_tokens == len(tok.encode(prompt))  # off by default: the prompt as given
    assert not res.choices[0].text.startswith(" ")  # the healed space is the prompt's, never repeated


def test_graceful_shutdown_finishes_in_flight_requests(server):
    """SIGTERM while a stream is running: the stream still completes with [DONE], then the process exits."""
    body = {"model": MODEL_NAME, "prompt": "Once", "max_tokens": 100, "n": 8, "temperature": 1.0, "stream": True,
            "seed": 0}
    events = []
    with httpx.stream("POST", f"{server.base}/v1/completions", json=body, headers=AUTH, timeout=60) as r:
        lines = r.iter_lines()
        first = next(line for line in lines if line.startswith("data: "))
        events.append(first)
        server.proc.send_signal(signal.SIGTERM)
        events += [line for line in lines if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    assert sum('"finish_reason":"length"' in e or '"finish_reason": "length"' in e for e in events) + \
        sum('"finish_reason": "stop"' in e for e in events) == 8
    # uvicorn re-raises the captured SIGTERM after its graceful shutdown, so the exit status is -SIGTERM
    assert server.proc.wait(30) in (0, -signal.SIGTERM)
    assert '"message": "server stopped"' in server.log

