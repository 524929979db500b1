"""The feedback database: what the server generated (kept for a bounded time) and what people said about it.

One SQLAlchemy Core schema serves SQLite (the default: one file, WAL mode, safe for several writer
processes on one host) and PostgreSQL (`postgresql://...`, for several replicas). The schema is versioned:
`MIGRATIONS` lists numbered steps, each run once inside a transaction that holds a database-wide lock
(SQLite `BEGIN IMMEDIATE`, a PostgreSQL advisory lock), so replicas that start together migrate once.

    store = FeedbackStore.open("runs/x/feedback.db")          # or "postgresql://user@host/db"
    store.remember(Generation(id="chatcmpl-1", ...))           # the server, after each response
    store.record(Feedback(response_id="chatcmpl-1", rating=1, ...))
    rows = store.feedback()                                    # `gptforge feedback export`

Rows hold text as given (the server masks PII before it stores anything when masking is on); prompts
and answers are JSON (chat messages, or prompt strings). No API key is stored, only its key id.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from ..errors import ConfigError

SQLITE_BUSY_TIMEOUT_MS = 15_000  # a writer waits this long for another process's write lock
PURGE_EVERY_S = 60.0  # expired generations are deleted at most this often (by the writer that notices)
_PG_LOCK_ID = 0x6770_7466  # pg_advisory_xact_lock key of the migrations ("gptf")


class FeedbackDBError(ConfigError):
    """The feedback database cannot be opened, migrated or written; names the database (password hidden)."""


# ---- records --------------------------------------------------------------------------------------

@dataclass
class Generation:
    """What one response generated: its prompt(s) and choices, kept so that feedback can refer to it by id."""

    id: str  # the response id (chatcmpl-..., cmpl-...)
    model: str
    endpoint: str  # chat | completions
    prompts: list[Any]  # chat: [messages]; completions: one prompt string per prompt of the request
    choices: list[dict[str, Any]]  # {"index", "text", "prompt_index"}
    key_id: str = "anonymous"
    request_id: Optional[str] = None  # the HTTP request's x-request-id
    created_at: float = field(default_factory=time.time)
    expires_at: float = 0.0


@dataclass
class Feedback:
    """One piece of feedback: a rating of an answer, a choice between two answers, and/or a better answer."""

    model: str
    endpoint: str  # chat | completions | client (content given with the feedback)
    prompt: Any  # chat messages (list) or the prompt string
    completions: list[str]  # the answers the feedback is about (the choices of that prompt)
    choice_index: int = 0  # the answer rated or edited
    rating: Optional[int] = None  # +1 thumbs up, -1 thumbs down
    chosen: Optional[str] = None  # a comparison: the better answer...
    rejected: Optional[str] = None  # ...and the worse one
    edited: Optional[str] = None  # a better answer written by the person
    comment: Optional[str] = None
    response_id: Optional[str] = None
    request_id: Optional[str] = None
    key_id: str = "anonymous"
    id: str = field(default_factory=lambda: f"fb-{uuid.uuid4().hex}")
    created_at: float = field(default_factory=time.time)

    @property
    def answer(self) -> Optional[str]:
        """The rated/edited answer (completions[choice_index])."""
        return self.completions[self.choice_index] if 0 <= self.choice_index < len(self.completions) else None


# ---- schema and migrations --------------------------------------------------------------------------

def _v1_tables(metadata: sa.MetaData) -> tuple[sa.Table, sa.Table]:
    """The tables as schema version 1 created them."""
    generations = sa.Table(
        "gptforge_generations", metadata,
        sa.Column("id", sa.String(128), primary_key=True),
        sa.Column("request_id", sa.String(128)),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("expires_at", sa.Float, nullable=False, index=True),
        sa.Column("model", sa.String(256), nullable=False),
        sa.Column("key_id", sa.String(64), nullable=False),
        sa.Column("endpoint", sa.String(32), nullable=False),
        sa.Column("prompts", sa.Text, nullable=False),  # JSON
        sa.Column("choices", sa.Text, nullable=False),  # JSON
    )
    feedback = sa.Table(
        "gptforge_feedback", metadata,
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("created_at", sa.Float, nullable=False, index=True),
        sa.Column("response_id", sa.String(128), index=True),
        sa.Column("request_id", sa.String(128)),
        sa.Column("model", sa.String(256), nullable=False),
        sa.Column("key_id", sa.String(64), nullable=False),
        sa.Column("endpoint", sa.String(32), nullable=False),
        sa.Column("prompt", sa.Text, nullable=False),  # JSON: messages or a string
        sa.Column("completions", sa.Text, nullable=False),  # JSON list of strings
        sa.Column("choice_index", sa.Integer, nullable=False),
        sa.Column("rating", sa.Integer),
        sa.Column("chosen", sa.Text),
        sa.Column("rejected", sa.Text),
        sa.Column("edited", sa.Text),
        sa.Column("comment", sa.Text),
    )
    return generations, feedback


METADATA = sa.MetaData()
SCHEMA = sa.Table("gptforge_schema", METADATA, sa.Column("version", sa.Integer, primary_key=True),
                  sa.Column("description", sa.String(200), nullable=False),
                  sa.Column("applied_at", sa.Float, nullable=False))
GENERATIONS, FEEDBACK = _v1_tables(METADATA)  # the newest schema (a later version redefines these)


def _migrate_v1(conn: Connection) -> None:
    tables = _v1_tables(sa.MetaData())
    for table in tables:
        table.create(conn)


# (version, description, step): append new versions; never edit an applied one.
MIGRATIONS: list[tuple[int, str, Callable[[Connection], None]]] = [
    (1, "generations and feedback tables", _migrate_v1),
]
SCHEMA_VERSION = MIGRATIONS[-1][0]


# ---- the store ------------------------------------------------------------------------------------

def database_url(spec: str | Path) -> sa.URL:
    """A SQLAlchemy URL from a file path, `sqlite:///...` or `postgresql://...`; others are a FeedbackDBError."""
    text = str(spec).strip()
    if "://" not in text:
        if not text:
            raise FeedbackDBError("--feedback-db: give a file path or a database URL")
        path = Path(text).expanduser().resolve()
        return sa.URL.create("sqlite", database=str(path))
    try:
        url = sa.make_url(text)
    except sa.exc.ArgumentError as exc:
        raise FeedbackDBError(f"--feedback-db {text!r}: not a database URL ({exc})") from None
    if url.drivername in ("postgres", "postgresql"):  # no driver named: psycopg 3 (the `postgres` extra)
        url = url.set(drivername="postgresql+psycopg")
    backend = url.get_backend_name()
    if backend not in ("sqlite", "postgresql"):
        raise FeedbackDBError(f"--feedback-db {url.render_as_string(hide_password=True)}: unsupported database "
                              f"{backend!r}; use a file path, sqlite:///FILE or postgresql://USER@HOST/DB")
    return url


class FeedbackStore:
    """Generations and feedback in SQLite or PostgreSQL; thread-safe (one pooled connection per call)."""

    def __init__(self, engine: Engine, name: str, retention_s: float = 86_400.0) -> None:
        self.engine, self.name, self.retention_s = engine, name, float(retention_s)
        self._last_purge = 0.0
        self._purge_lock = threading.Lock()

    @classmethod
    def open(cls, spec: str | Path, *, retention_s: float = 86_400.0, migrate: bool = True) -> "FeedbackStore":
        """Connect (SQLite: create the file, WAL mode) and bring the schema to `SCHEMA_VERSION`."""
        url = database_url(spec)
        name = url.render_as_string(hide_password=True)
        if url.get_backend_name() == "sqlite":
            if url.database and url.database != ":memory:":
                Path(url.database).parent.mkdir(parents=True, exist_ok=True)
            engine = sa.create_engine(url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000,
                                                         "check_same_thread": False})
            _sqlite_pragmas(engine)
        else:
            try:
                engine = sa.create_engine(url, pool_pre_ping=True, pool_size=4, max_overflow=4)
            except ImportError as exc:
                raise FeedbackDBError(f"--feedback-db {name}: PostgreSQL needs a driver: pip install "
                                      f"'gptforge[postgres]' ({exc})") from exc
        store = cls(engine, name, retention_s)
        if migrate:
            store.migrate()
        return store

    def _guard(self, what: str):
        return _DatabaseErrors(self.name, what)

    def migrate(self) -> int:
        """Apply the migrations this database has not had; returns the schema version."""
        with self._guard("migrate"), self.engine.begin() as conn:
            if conn.dialect.name == "postgresql":
                conn.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_LOCK_ID})
            SCHEMA.create(conn, checkfirst=True)
            current = conn.execute(sa.select(sa.func.max(SCHEMA.c.version))).scalar() or 0
            if current > SCHEMA_VERSION:
                raise FeedbackDBError(f"{self.name}: the feedback schema is version {current}, newer than this "
                                      f"gptforge knows ({SCHEMA_VERSION}); upgrade gptforge")
            for version, description, step in MIGRATIONS:
                if version > current:
                    step(conn)
                    conn.execute(SCHEMA.insert().values(version=version, description=description,
                                                        applied_at=time.time()))
        return self.schema_version()

    def schema_version(self) -> int:
        """The highest migration applied to the database."""
        with self._guard("read"), self.engine.connect() as conn:
            if not sa.inspect(conn).has_table(SCHEMA.name):
                return 0
            return conn.execute(sa.select(sa.func.max(SCHEMA.c.version))).scalar() or 0

    # ---- generations ----
    def remember(self, generation: Generation) -> None:
        """Keep a response's prompts and choices until `retention_s` from now; purges expired ones now and then."""
        now = time.time()
        row = {"id": generation.id, "request_id": generation.request_id, "created_at": generation.created_at,
               "expires_at": generation.expires_at or now + self.retention_s, "model": generation.model,
               "key_id": generation.key_id, "endpoint": generation.endpoint,
               "prompts": json.dumps(generation.prompts, ensure_ascii=False),
               "choices": json.dumps(generation.choices, ensure_ascii=False)}
        with self._guard("write"), self.engine.begin() as conn:
            conn.execute(GENERATIONS.delete().where(GENERATIONS.c.id == generation.id))
            conn.execute(GENERATIONS.insert().values(**row))
        self.purge_expired(now)

    def purge_expired(self, now: Optional[float] = None, force: bool = False) -> int:
        """Delete generations past their retention (at most every PURGE_EVERY_S unless forced); returns how many."""
        now = time.time() if now is None else now
        with self._purge_lock:
            if not force and now - self._last_purge < PURGE_EVERY_S:
                return 0
            self._last_purge = now
        with self._guard("write"), self.engine.begin() as conn:
            return conn.execute(GENERATIONS.delete().where(GENERATIONS.c.expires_at < now)).rowcount or 0

    def generation(self, response_id: str) -> Optional[Generation]:
        """The kept generation with this id, or None when unknown or expired."""
        with self._guard("read"), self.engine.connect() as conn:
            row = conn.execute(sa.select(GENERATIONS).where(GENERATIONS.c.id == response_id,
                                                            GENERATIONS.c.expires_at >= time.time())).first()
        if row is None:
            return None
        m = row._mapping
        return Generation(id=m["id"], model=m["model"], endpoint=m["endpoint"], prompts=json.loads(m["prompts"]),
                          choices=json.loads(m["choices"]), key_id=m["key_id"], request_id=m["request_id"],
                          created_at=m["created_at"], expires_at=m["expires_at"])

    # ---- feedback ----
    def record(self, item: Feedback) -> str:
        """Store one piece of feedback; returns its id."""
        row = {"id": item.id, "created_at": item.created_at, "response_id": item.response_id,
               "request_id": item.request_id, "model": item.model, "key_id": item.key_id, "endpoint": item.endpoint,
               "prompt": json.dumps(item.prompt, ensure_ascii=False),
               "completions": json.dumps(item.completions, ensure_ascii=False), "choice_index": item.choice_index,
               "rating": item.rating, "chosen": item.chosen, "rejected": item.rejected, "edited": item.edited,
               "comment": item.comment}
        with self._guard("write"), self.engine.begin() as conn:
            conn.execute(FEEDBACK.insert().values(**row))
        return item.id

    def feedback(self, model: Optional[str] = None) -> list[Feedback]:
        """All feedback (of one served model name when given), oldest first."""
        query = sa.select(FEEDBACK).order_by(FEEDBACK.c.created_at, FEEDBACK.c.id)
        if model is not None:
            query = query.where(FEEDBACK.c.model == model)
        with self._guard("read"), self.engine.connect() as conn:
            rows = conn.execute(query).all()
        out = []
        for row in rows:
            m = dict(row._mapping)
            m["prompt"], m["completions"] = json.loads(m["prompt"]), json.loads(m["completions"])
            out.append(Feedback(**m))
        return out

    def close(self) -> None:
        """Release the connections."""
        self.engine.dispose()


class _DatabaseErrors:
    """Turns driver errors into a FeedbackDBError naming the database and what was being done."""

    def __init__(self, name: str, what: str) -> None:
        self.name, self.what = name, what

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: Any, exc: Any, tb: Any) -> bool:
        if isinstance(exc, sa.exc.SQLAlchemyError):
            detail = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0][:300]
            raise FeedbackDBError(f"feedback database {self.name}: cannot {self.what}: {detail}") from exc
        return False


def _sqlite_pragmas(engine: Engine) -> None:
    """WAL, a busy timeout and BEGIN IMMEDIATE: writers queue for the lock instead of failing with 'locked'."""

    @sa.event.listens_for(engine, "connect")
    def on_connect(dbapi_conn: Any, record: Any) -> None:
        dbapi_conn.isolation_level = None  # SQLAlchemy's events below issue BEGIN themselves
        cursor = dbapi_conn.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA synchronous=NORMAL")  # durable across process crashes in WAL mode
        cursor.close()

    @sa.event.listens_for(engine, "begin")
    def on_begin(conn: Connection) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")


__all__ = ["FeedbackStore", "Generation", "Feedback", "FeedbackDBError", "database_url", "SCHEMA_VERSION",
           "MIGRATIONS"]
