"""POST /v1/feedback: ratings, side-by-side choices and edited answers about kept responses (or given content),
stored in the feedback database; and the whole way from served answers to a DPO-tuned model."""

from __future__ import annotations

import json
import random
import sqlite3
import threading
import time

import httpx
import openai
import pytest

from gptforge.feedback.store import FeedbackStore
from gptforge.serve.app import ServerOptions

KEY, OTHER_KEY = "sk-feedback", "sk-other"
MODEL = "fb-model"


@pytest.fixture(scope="module")
def fb_server(start_server, tmp_path_factory):
    db = tmp_path_factory.mktemp("feedback") / "feedback.db"
    srv = start_server(ServerOptions(model_name=MODEL, api_keys=[KEY, OTHER_KEY], feedback_db=str(db),
                                     redact_pii="logs", max_batch=8))
    srv.db = db
    return srv


@pytest.fixture(scope="module")
def client(fb_server):
    return openai.OpenAI(base_url=f"{fb_server.base}/v1", api_key=KEY, max_retries=0, timeout=60)


def send_feedback(client: openai.OpenAI, body: dict) -> dict:
    """POST /v1/feedback through the openai client (its generic request method keeps auth and base URL)."""
    return client.post("/feedback", cast_to=httpx.Response, body=body).json()


def rows(srv) -> list:
    store = FeedbackStore.open(srv.db)
    try:
        return store.feedback()
    finally:
        store.close()


def wait_kept(srv, response_id: str, timeout: float = 10.0) -> None:
    """Streams are stored when they end, in the background: wait until the id can be rated."""
    store = FeedbackStore.open(srv.db)
    try:
        deadline = time.monotonic() + timeout
        while store.generation(response_id) is None:
            assert time.monotonic() < deadline, f"{response_id} was never kept"
            time.sleep(0.05)
    finally:
        store.close()


def test_rating_comparison_and_edit_about_a_chat_response(fb_server, client):
    messages = [{"role": "user", "content": "Write to jo.doe@example.com please"}]
    response = client.chat.completions.create(model=MODEL, messages=messages, n=2, max_tokens=6, temperature=1,
                                              seed=3)
    answers = [c.message.content for c in response.choices]
    up = send_feedback(client, {"id": response.id, "choice_index": 1, "rating": 1})
    assert up["object"] == "feedback" and up["response_id"] == response.id and up["kinds"] == ["rating"]
    pick = send_feedback(client, {"id": response.id, "chosen_index": 1})  # rejected: the other of two
    edit = send_feedback(client, {"id": response.id, "choice_index": 0, "edited": "Sure, mail jo.doe@example.com.",
                                  "comment": "too short", "rating": -1})
    assert edit["kinds"] == ["rating", "edit"]
    stored = {r.id: r for r in rows(fb_server)}
    first, second, third = stored[up["id"]], stored[pick["id"]], stored[edit["id"]]
    # masking is on (--redact-pii logs): stored prompts and edits are masked; no key, only its id
    assert first.prompt == [{"role": "user", "content": "Write to [EMAIL] please"}]
    assert first.completions == answers or first.completions == [a for a in answers]  # (no PII in the answers)
    assert first.rating == 1 and first.choice_index == 1 and first.model == MODEL and first.endpoint == "chat"
    assert first.key_id and KEY not in json.dumps(first.__dict__) and first.request_id
    assert (second.chosen, second.rejected) == (answers[1], answers[0]) and second.rating is None
    assert third.edited == "Sure, mail [EMAIL]." and third.rating == -1 and third.comment == "too short"


def test_streamed_and_text_completions_can_be_rated(fb_server, client):
    stream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=5,
                                            stream=True)
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    wait_kept(fb_server, chunks[0].id)
    got = send_feedback(client, {"id": chunks[0].id, "rating": -1})
    row = next(r for r in rows(fb_server) if r.id == got["id"])
    assert row.completions == [text] and row.prompt == [{"role": "user", "content": "Hi"}]
    # two prompts x n=2: choice 3 answers the second prompt; the comparison is between that prompt's answers
    done = client.completions.create(model=MODEL, prompt=["Once upon", "The quick"], n=2, max_tokens=4, seed=1)
    got = send_feedback(client, {"id": done.id, "chosen_index": 3, "rejected_index": 2})
    row = next(r for r in rows(fb_server) if r.id == got["id"])
    by_index = {c.index: c.text for c in done.choices}
    assert row.prompt == "The quick" and row.completions == [by_index[2], by_index[3]]
    assert (row.chosen, row.rejected) == (by_index[3], by_index[2])
    bad = httpx.post(f"{fb_server.base}/v1/feedback", headers={"Authorization": f"Bearer {KEY}"},
                     json={"id": done.id, "chosen_index": 3, "rejected_index": 0})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "rejected_index"


def test_feedback_about_given_content(fb_server, client):
    got = send_feedback(client, {"messages": [{"role": "user", "content": "2+2?"}], "completions": ["4", "5"],
                                 "chosen_index": 0, "model": MODEL})
    row = next(r for r in rows(fb_server) if r.id == got["id"])
    assert row.endpoint == "client" and (row.chosen, row.rejected) == ("4", "5") and row.response_id is None


@pytest.mark.parametrize("body,status,param", [
    ({"id": "chatcmpl-nope", "rating": 1}, 404, "id"),
    ({"messages": [{"role": "user", "content": "x"}], "completions": ["a"]}, 400, "rating"),
    ({"messages": [{"role": "user", "content": "x"}], "completions": ["a"], "rating": 2}, 400, "rating"),
    ({"messages": [{"role": "user", "content": "x"}], "completions": ["a"], "rating": 1, "choice_index": 1}, 400,
     "choice_index"),
    ({"messages": [{"role": "user", "content": "x"}], "completions": ["a", "b", "c"], "chosen_index": 0}, 400,
     "rejected_index"),
    ({"prompt": "p", "completions": ["a", "b"], "chosen_index": 0, "rejected_index": 0}, 400, "rejected_index"),
    ({"prompt": "p", "rating": 1}, 400, "completions"),
    ({"prompt": "p", "messages": [{"role": "user", "content": "x"}], "completions": ["a"], "rating": 1}, 400,
     "messages"),
    ({"id": "x", "prompt": "p", "completions": ["a"], "rating": 1}, 400, "prompt"),
    ({"prompt": "p", "completions": ["a"], "rating": 1, "model": "gpt-4"}, 404, "model"),
    ({"prompt": "p", "completions": ["a"], "ratting": 1}, 400, "ratting"),
    ({"prompt": "a\ud800", "completions": ["a"], "rating": 1}, 400, "prompt"),
    ({"prompt": "p", "completions": ["a"], "edited": ""}, 400, "edited"),
])
def test_bad_feedback_is_an_openai_error_naming_the_field(fb_server, body, status, param):
    r = httpx.post(f"{fb_server.base}/v1/feedback", headers={"Authorization": f"Bearer {KEY}",
                                                              "Content-Type": "application/json"},
                   content=json.dumps(body))
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["param"] == param and set(error) == {"message", "type", "param", "code"}, error


def test_feedback_needs_the_key_and_sees_only_its_own_responses(fb_server, client):
    response = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "yo"}], max_tokens=3)
    r = httpx.post(f"{fb_server.base}/v1/feedback", json={"id": response.id, "rating": 1})
    assert r.status_code == 401
    other = openai.OpenAI(base_url=f"{fb_server.base}/v1", api_key=OTHER_KEY, max_retries=0)
    with pytest.raises(openai.NotFoundError) as err:
        other.post("/feedback", cast_to=httpx.Response, body={"id": response.id, "rating": 1})
    assert err.value.status_code == 404 and err.value.body["code"] == "response_not_found"


def test_responses_expire_and_disabled_feedback_says_so(start_server, tmp_path):
    srv = start_server(ServerOptions(model_name=MODEL, feedback_db=str(tmp_path / "short.db"), feedback_retention=0.5))
    response = httpx.post(f"{srv.base}/v1/chat/completions", timeout=60, json={
        "model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}).json()
    assert httpx.post(f"{srv.base}/v1/feedback", json={"id": response["id"], "rating": 1}).status_code == 200
    time.sleep(1.0)
    late = httpx.post(f"{srv.base}/v1/feedback", json={"id": response["id"], "rating": 1})
    assert late.status_code == 404 and "keeps responses for" in late.json()["error"]["message"]
    off = start_server(ServerOptions(model_name=MODEL))
    r = httpx.post(f"{off.base}/v1/feedback", json={"prompt": "p", "completions": ["a"], "rating": 1})
    assert r.status_code == 404 and "--feedback-db" in r.json()["error"]["message"]


def test_a_locked_database_stalls_neither_health_nor_generation(fb_server, client):
    """Another process holds the SQLite write lock: feedback waits for it off the event loop, the rest answers."""
    lock = sqlite3.connect(fb_server.db, timeout=1, isolation_level=None)
    lock.execute("BEGIN IMMEDIATE")
    result: dict = {}
    body = {"prompt": "p", "completions": ["a"], "rating": 1}
    waiting = threading.Thread(target=lambda: result.update(r=httpx.post(
        f"{fb_server.base}/v1/feedback", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)))
    try:
        waiting.start()
        time.sleep(0.3)
        assert httpx.get(f"{fb_server.base}/health", timeout=10).status_code == 200
        reply = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=3)
        assert reply.choices and waiting.is_alive()  # served while the feedback still waits for the lock
    finally:
        lock.execute("COMMIT")
        lock.close()
    waiting.join(60)
    assert result["r"].status_code == 200, result["r"].text
    wait_kept(fb_server, reply.id)  # the response queued behind the lock was kept too


# ---- from served answers to a better model -------------------------------------------------------------

GOOD = "Happy to help! Here is a short, clear answer."
TOPICS = ["cats", "dogs", "rain", "snow", "tea", "maps", "bread", "ships", "trees", "stars", "bees", "clocks",
          "kites", "lamps", "boats", "rivers", "songs", "books", "hats", "birds", "coins", "doors", "shoes", "cakes"]


@pytest.mark.slow
def test_feedback_to_a_better_model_end_to_end(fb_server, client, model_dir, tmp_path, capsys):
    """Serve a tiny model, rate its answers through the openai client and the feedback route, export the
    feedback, run DPO for a few steps, and check that the tuned model prefers the chosen answers of held-out
    prompts more than the served model did (reward accuracy and margin up)."""
    from gptforge.cli import main

    rng = random.Random(0)
    held_out = set(TOPICS[-6:])
    for topic in TOPICS:
        messages = [{"role": "user", "content": f"Tell me about {topic}."}]
        reply = client.chat.completions.create(model=MODEL, messages=messages, n=2, max_tokens=12, temperature=1,
                                               seed=rng.randint(0, 10_000))
        # the person rewrites a bad answer (pair: edit > original), prefers one sample, rates both
        send_feedback(client, {"id": reply.id, "choice_index": 0, "edited": GOOD, "rating": -1})
        if topic not in held_out:
            send_feedback(client, {"id": reply.id, "chosen_index": 1})
            send_feedback(client, {"id": reply.id, "choice_index": 1, "rating": 1})
    prefs = tmp_path / "prefs.jsonl"
    assert main(["feedback", "export", "--db", str(fb_server.db), "--out", str(prefs), "--model", MODEL]) == 0
    printed = capsys.readouterr().out
    assert "preference pair(s)" in printed and "supervised example(s)" in printed
    pairs = [json.loads(line) for line in prefs.read_text().splitlines()]
    def topic_of(pair: dict) -> str:  # the module's other tests left feedback on other prompts too
        text = pair["prompt"][-1]["content"] if isinstance(pair["prompt"], list) else pair["prompt"]
        return text.split()[-1].rstrip(".")

    train = [p for p in pairs if topic_of(p) in TOPICS and topic_of(p) not in held_out]
    val = [p for p in pairs if topic_of(p) in held_out]
    assert len(val) == 6 and all(p["source"] == "edit" for p in val) and len(train) >= 18 * 2
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(p) + "\n" for p in train))
    (tmp_path / "val.jsonl").write_text("".join(json.dumps(p) + "\n" for p in val))
    out = tmp_path / "dpo"
    assert main(["finetune", "--model", str(model_dir), "--data", str(tmp_path / "train.jsonl"), "--objective", "dpo",
                 "--out", str(out), f"--tasks.0.val_data={tmp_path / 'val.jsonl'}", "--train.max_steps=16",
                 "--train.lr=2e-3", "--train.eval_every=8", "--train.progress=false", "--data.batch_size=8",
                 "--preference.beta=0.1"]) == 0
    report = json.loads((out / "eval.json").read_text())
    before, after = report["before"], report["val"]
    assert after["val_reward_accuracy"] >= 5 / 6 > before["val_reward_accuracy"]
    assert after["val_reward_margin"] > before["val_reward_margin"] + 0.1
    assert after["val_logps_chosen"] - after["val_logps_rejected"] > \
        before["val_logps_chosen"] - before["val_logps_rejected"]
    assert (out / "reward_margin.png").is_file() and (out / "model" / "config.json").is_file()
