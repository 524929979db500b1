"""The feedback database: SQLite (WAL, several writer processes, versioned migrations) and PostgreSQL."""

import json
import os
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import sqlalchemy as sa

from gptforge.feedback.store import (MIGRATIONS, SCHEMA_VERSION, Feedback, FeedbackDBError, FeedbackStore, Generation,
                                     database_url)

SRC = str(Path(__file__).resolve().parents[2] / "src")


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path):
    if request.param == "sqlite":
        return str(tmp_path / "fb.db")
    url = request.getfixturevalue("postgres_url")
    engine = sa.create_engine(url.replace("postgresql://", "postgresql+psycopg://"))
    with engine.begin() as conn:  # a clean database for each test
        for table in ("gptforge_feedback", "gptforge_generations", "gptforge_schema"):
            conn.execute(sa.text(f"DROP TABLE IF EXISTS {table}"))
    engine.dispose()
    return url


def _generation(i: int, **kw) -> Generation:
    return Generation(id=f"chatcmpl-{i}", model="m", endpoint="chat", key_id="k1",
                      prompts=[[{"role": "user", "content": f"q{i} ünï ✓"}]],
                      choices=[{"index": 0, "text": f"a{i}", "prompt_index": 0}], **kw)


def test_round_trip_and_retention(db_url):
    store = FeedbackStore.open(db_url, retention_s=60)
    assert store.schema_version() == SCHEMA_VERSION
    store.remember(_generation(1))
    store.remember(_generation(2, expires_at=time.time() - 1))  # already expired
    got = store.generation("chatcmpl-1")
    assert got.prompts == [[{"role": "user", "content": "q1 ünï ✓"}]] and got.choices[0]["text"] == "a1"
    assert got.expires_at == pytest.approx(time.time() + 60, abs=5)
    assert store.generation("chatcmpl-2") is None and store.generation("nope") is None
    assert store.purge_expired(force=True) == 1
    fb = Feedback(model="m", endpoint="chat", prompt=[{"role": "user", "content": "q1"}], completions=["a1", "b1"],
                  rating=-1, chosen="b1", rejected="a1", edited="better", comment="meh", response_id="chatcmpl-1",
                  key_id="k1")
    store.record(fb)
    store.record(Feedback(model="other", endpoint="client", prompt="p", completions=["x"], rating=1))
    rows = store.feedback()
    assert [r.id for r in rows] == [fb.id, rows[1].id] and rows[0] == fb
    assert [r.model for r in store.feedback(model="other")] == ["other"]
    store.close()
    again = FeedbackStore.open(db_url)  # reopening migrates nothing
    assert again.schema_version() == SCHEMA_VERSION and len(again.feedback()) == 2
    again.close()


WRITER = textwrap.dedent("""
    import sys
    from gptforge.feedback.store import Feedback, FeedbackStore, Generation
    url, worker, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    store = FeedbackStore.open(url)
    for i in range(count):
        store.remember(Generation(id=f"r-{worker}-{i}", model="m", endpoint="chat", prompts=[[]], choices=[]))
        store.record(Feedback(model="m", endpoint="chat", prompt=f"w{worker}", completions=[str(i)], rating=1))
    print("ok")
""")


@pytest.mark.slow
def test_concurrent_writer_processes_lose_nothing(db_url):
    """Four processes open a fresh database at once (one migration runs) and write 40 rows each."""
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, db_url, str(w), "40"], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for w in range(4)]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outputs]
    store = FeedbackStore.open(db_url)
    rows = store.feedback()
    assert len(rows) == 160 and len({r.id for r in rows}) == 160
    assert sorted({r.prompt for r in rows}) == ["w0", "w1", "w2", "w3"]
    with store.engine.connect() as conn:
        versions = conn.execute(sa.text("SELECT version FROM gptforge_schema")).scalars().all()
        generations = conn.execute(sa.text("SELECT count(*) FROM gptforge_generations")).scalar()
    assert versions == [v for v, _, _ in MIGRATIONS] and generations == 160
    store.close()


def test_sqlite_file_is_in_wal_mode_and_a_newer_schema_is_refused(tmp_path):
    path = tmp_path / "sub" / "fb.db"
    FeedbackStore.open(path).close()  # creates the folder and the file
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        conn.execute("INSERT INTO gptforge_schema VALUES (99, 'from the future', 0)")
    with pytest.raises(FeedbackDBError, match="version 99, newer than this gptforge"):
        FeedbackStore.open(path)


@pytest.mark.parametrize("spec,message", [
    ("mysql://u@h/db", "unsupported database 'mysql'"),
    ("postgresql://user:s3cret@127.0.0.1:1/db", "cannot migrate"),
    ("", "give a file path"),
])
def test_bad_databases_are_one_clear_error_without_the_password(spec, message):
    with pytest.raises(FeedbackDBError) as err:
        FeedbackStore.open(spec).close()
    assert message in str(err.value) and "s3cret" not in str(err.value)


def test_urls():
    assert database_url("x.db").drivername == "sqlite" and database_url("x.db").database.endswith("/x.db")
    assert database_url("postgres://u@h/d").drivername == "postgresql+psycopg"
    assert database_url("postgresql+psycopg://u@h/d").drivername == "postgresql+psycopg"
    assert database_url("sqlite:///a/b.db").database == "a/b.db"


def test_export_cli_on_a_database(tmp_path, capsys):
    from gptforge.cli import main

    store = FeedbackStore.open(tmp_path / "fb.db")
    chat = [{"role": "user", "content": "Say hi"}]
    store.record(Feedback(model="m", endpoint="chat", prompt=chat, completions=["hi!", "go away"], chosen="hi!",
                          rejected="go away", response_id="c1"))
    store.record(Feedback(model="m", endpoint="completions", prompt="2+2=", completions=["5"], rating=-1,
                          response_id="c2"))
    store.record(Feedback(model="m", endpoint="completions", prompt="2+2=", completions=["4"], rating=-1,
                          response_id="c3"))
    store.record(Feedback(model="m", endpoint="completions", prompt="2+2=", completions=["4"], rating=1,
                          response_id="c3"))  # changed their mind: the later rating counts
    store.record(Feedback(model="m", endpoint="chat", prompt=chat, completions=["hey"], edited="Hello! How can I help?",
                          response_id="c4"))
    store.close()
    out = tmp_path / "prefs.jsonl"
    assert main(["feedback", "export", "--db", str(tmp_path / "fb.db"), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    pairs = [json.loads(line) for line in out.read_text().splitlines()]
    sft = [json.loads(line) for line in (tmp_path / "prefs.sft.jsonl").read_text().splitlines()]
    assert {"prompt": chat, "chosen": [{"role": "assistant", "content": "hi!"}],
            "rejected": [{"role": "assistant", "content": "go away"}], "source": "comparison"} in pairs
    assert {"prompt": "2+2=", "chosen": "4", "rejected": "5", "source": "ratings"} in pairs
    assert {"prompt": chat, "chosen": [{"role": "assistant", "content": "Hello! How can I help?"}],
            "rejected": [{"role": "assistant", "content": "hey"}], "source": "edit"} in pairs
    assert len(pairs) == 3
    assert {"prompt": "2+2=", "completion": "4"} in sft and \
        {"messages": chat + [{"role": "assistant", "content": "Hello! How can I help?"}]} in sft and len(sft) == 2
    assert "Read 5 feedback record(s)" in printed and "1 thumbs up and 1 thumbs down" in printed
    assert "1 earlier rating(s) replaced" in printed and "Wrote 3 preference pair(s)" in printed
    assert main(["feedback", "export", "--db", str(tmp_path / "fb.db"), "--out", str(out), "--json"]) == 0
    counts = json.loads(capsys.readouterr().out)
    assert counts["pairs"] == {"comparison": 1, "ratings": 1, "edit": 1} and counts["sft"] == 2
    # the exported pairs train directly
    from gptforge.data.preference import render_pair
    from gptforge.data.records import read_records
    from gptforge.tokenizer import Tokenizer
    import string

    tok = Tokenizer.train_char([string.printable], special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    assert all(render_pair(r, tok) for r in read_records(out))


def test_export_cli_errors(tmp_path, capsys):
    from gptforge.cli import main

    assert main(["feedback", "export", "--db", str(tmp_path / "none.db"), "--out", str(tmp_path / "p.jsonl")]) == 2
    assert "no such database file" in capsys.readouterr().err
    sqlite3.connect(tmp_path / "other.db").execute("CREATE TABLE t (x)").connection.commit()
    assert main(["feedback", "export", "--db", str(tmp_path / "other.db"), "--out", str(tmp_path / "p.jsonl")]) == 2
    assert "not a gptforge feedback database" in capsys.readouterr().err
