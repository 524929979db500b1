"""The FastAPI application: gateway middleware (request ids, auth, body limit, access log, metrics),
model loading in the background (`/health` answers 503 until ready) and graceful shutdown."""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles
from starlette.datastructures import Headers, MutableHeaders

from ..errors import GptforgeError
from ..safety import load_moderator
from .auth import APIKeyChecker, key_from_headers
from .errors import APIError, install_error_handlers
from .metrics import ServerMetrics
from .pii import mask_pii
from .ratelimit import RateLimiter

STATIC_DIR = Path(__file__).parent / "static"
# Reachable without a key: the liveness probe, and the chat page's static files (they hold no data;
# the page asks for the key and sends it with every API call).
PUBLIC_PATHS = ("/health",)
PUBLIC_STATIC = ("/", "/static/")
ACCESS_LOG = "gptforge.serve.access"


@dataclass
class ServerOptions:
    """Everything `gptforge serve` can set."""

    model_name: str = "gptforge"
    api_keys: list[str] = field(default_factory=list)
    max_batch: int = 8
    max_queue: int = 64
    request_timeout: float = 600.0
    max_body_bytes: int = 8 * 1024 * 1024
    requests_per_minute: Optional[int] = None
    tokens_per_minute: Optional[int] = None
    redact_pii: str = "off"  # off | logs | content (content also masks logs)
    moderation: Optional[str] = None  # a gptforge.safety policy YAML for prompts and outputs
    embedding_pooling: str = "last"  # last | mean (serving_embeddings.py says why "last")
    prefix_cache_mb: float = 256.0  # keys/values of shared prompt prefixes kept for reuse (0: off)
    lora: dict[str, str] = field(default_factory=dict)  # LoRA adapters served beside the model: name -> directory
    log_json: bool = True
    feedback_db: Optional[str] = None  # a SQLite file or database URL for POST /v1/feedback (None: off)
    feedback_retention: float = 86_400.0  # seconds a response is kept so that feedback can name its id
    prompt_lookup: int = 0  # prompt-lookup draft tokens for a sequence decoding alone (0: off; requests may override)
    prompt_lookup_ngram: int = 2  # the longest n-gram matched when drafting


class ServerState:
    """What routes reach through `app.state.server`."""

    def __init__(self, options: ServerOptions) -> None:
        self.options = options
        self.metrics = ServerMetrics()
        self.keys = APIKeyChecker(options.api_keys)
        self.rate_limiter = RateLimiter(options.requests_per_minute, options.tokens_per_minute)
        # Built before the model loads, so a bad policy file fails `gptforge serve` at once.
        self.moderator = load_moderator(options.moderation, registry=self.metrics.registry)
        self.feedback = _open_feedback(options)  # also before the model: a bad database fails at once
        self.static_dir = STATIC_DIR
        self.engine = None
        self.endpoints: Optional[Endpoints] = None
        self.load_error: Optional[BaseException] = None
        self.ready = threading.Event()
        # Called when loading fails; `run_server` makes it stop the server, so the process exits non-zero.
        self.on_load_failure: Optional[Callable[[BaseException], None]] = None


@dataclass
class Endpoints:
    """One serving object per group of routes (all share the engine)."""

    completions: Any
    chat: Any
    tokenization: Any
    embeddings: Any
    infill: Any = None


class JSONLogFormatter(logging.Formatter):
    """One JSON object per line; string values masked for PII when `redact` is set."""

    def __init__(self, redact: bool = False) -> None:
        super().__init__()
        self.redact = redact

    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {"ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
                                + f".{int(record.msecs):03d}Z", "level": record.levelname,
                                "logger": record.name, "message": record.getMessage()}
        data.update(getattr(record, "fields", {}) or {})
        if record.exc_info:
            data["exception"] = self.formatException(record.exc_info)
        if self.redact:
            data = {k: mask_pii(v) if isinstance(v, str) else v for k, v in data.items()}
        line = json.dumps(data, ensure_ascii=False)
        try:
            line.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate from a client: escape it rather than lose the line
            line = json.dumps(data, ensure_ascii=True)
        return line


def configure_logging(options: ServerOptions, stream=None) -> None:
    """JSON lines on stderr for the server's loggers (idempotent)."""
    logger = logging.getLogger("gptforge.serve")
    for handler in list(logger.handlers):
        if getattr(handler, "_gptforge", False):
            logger.removeHandler(handler)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler._gptforge = True  # type: ignore[attr-defined]
    redact = options.redact_pii != "off"
    if options.log_json:
        handler.setFormatter(JSONLogFormatter(redact=redact))
    elif redact:
        from .pii import PIIMaskingFilter

        handler.addFilter(PIIMaskingFilter())
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


class GatewayMiddleware:
    """Pure ASGI (streams stay unbuffered): request id, API key, body size limit, access log, request metrics."""

    def __init__(self, app, state: ServerState, route_paths: Callable[[], set[str]]) -> None:
        self.app = app
        self.state = state
        self.route_paths = route_paths
        self.log = logging.getLogger(ACCESS_LOG)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        request_id = headers.get("x-request-id") or uuid.uuid4().hex
        scope.setdefault("state", {})
        scope["state"]["request_id"] = request_id
        start = time.perf_counter()
        status = [500]

        async def send_with_id(message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                MutableHeaders(scope=message).append("x-request-id", request_id)
            await send(message)

        try:
            error = self._gate(scope, headers)
            if error is not None:
                await error.response()(scope, receive, send_with_id)
                return
            if "content-length" not in headers and scope.get("method") in ("POST", "PUT", "PATCH"):
                receive = await self._buffer_body(receive)
                if receive is None:
                    await self._too_large().response()(scope, receive, send_with_id)
                    return
            await self.app(scope, receive, send_with_id)
        finally:
            self._record(scope, status[0], time.perf_counter() - start, request_id, headers)

    def _gate(self, scope, headers: Headers) -> Optional[APIError]:
        path = scope["path"]
        public = path in PUBLIC_PATHS or path == "/" or path.startswith(PUBLIC_STATIC[1])
        if self.state.keys.enabled and not public:
            key = key_from_headers(headers.get("authorization"), headers.get("x-api-key"))
            key_id = self.state.keys.check(key)
            if key_id is None:
                message = "missing API key: send 'Authorization: Bearer <key>'" if key is None else "invalid API key"
                return APIError(401, message, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
            scope["state"]["key_id"] = key_id
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.state.options.max_body_bytes:
            return self._too_large()
        return None

    def _too_large(self) -> APIError:
        return APIError(413, f"request body exceeds {self.state.options.max_body_bytes} bytes",
                        code="request_too_large")

    async def _buffer_body(self, receive):
        """Read a chunked upload (no Content-Length) up front, so an oversized one gets a clean 413.

        Returns a receive callable that replays the body, or None when the body is too large."""
        limit = self.state.options.max_body_bytes
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # client went away: let the app see that
                replay = [message]
                break
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > limit:
                return None
            if not message.get("more_body", False):
                replay = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]
                break

        async def receive_replay():
            return replay.pop() if replay else await receive()

        return receive_replay

    def _record(self, scope, status: int, seconds: float, request_id: str, headers: Headers) -> None:
        path = scope["path"]
        route = path if path in self.route_paths() else ("/static" if path.startswith("/static/") else "other")
        self.state.metrics.requests.labels(route=route, status=str(status)).inc()
        st = scope.get("state", {})
        fields = {"request_id": request_id, "method": scope.get("method"), "path": path, "status": status,
                  "duration_ms": round(seconds * 1000, 2), "key_id": st.get("key_id"),
                  "client": (scope.get("client") or ("", 0))[0], "user": st.get("user")}
        usage = st.get("usage")
        if usage:
            fields["prompt_tokens"] = usage.get("prompt_tokens")
            fields["completion_tokens"] = usage.get("completion_tokens")
        self.log.info("%s %s %d", scope.get("method"), path, status, extra={"fields": fields})


ModelLoader = Callable[[], tuple[Any, Any]]  # -> (model, tokenizer)


def _endpoints(state: ServerState, engine: Any, tokenizer: Any) -> Endpoints:
    """One serving object per endpoint over the loaded engine (grammars built once, here)."""
    from .grammar import GrammarEngine
    from .serving_chat import ChatServing
    from .serving_completions import CompletionServing
    from .serving_embeddings import EmbeddingServing
    from .serving_infill import InfillServing
    from .serving_tokenize import TokenizeServing

    options = state.options
    # Built once here (about a second for a 50k vocabulary), not by the first structured request.
    grammars = GrammarEngine(tokenizer, engine.vocab_size, engine.stop_ids)
    common = dict(redact_content=options.redact_pii == "content", rate_limiter=state.rate_limiter,
                  moderator=state.moderator, grammars=grammars,
                  prompt_lookup=(options.prompt_lookup, options.prompt_lookup_ngram))
    name = options.model_name
    return Endpoints(
        completions=CompletionServing(engine, tokenizer, name, **common),
        chat=ChatServing(engine, tokenizer, name, **common),
        tokenization=TokenizeServing(engine, tokenizer, name, **common),
        embeddings=EmbeddingServing(engine, tokenizer, name, pooling=options.embedding_pooling, **common),
        infill=InfillServing(engine, tokenizer, name, **common))


def create_app(loader: ModelLoader, options: Optional[ServerOptions] = None) -> FastAPI:
    """The server app; `loader()` runs in a background thread at startup and returns (model, tokenizer)."""
    options = options or ServerOptions()
    state = ServerState(options)
    configure_logging(options)
    log = logging.getLogger("gptforge.serve")

    def load() -> None:
        from .engine import Engine

        try:
            model, tokenizer = loader()
            if tokenizer is None:
                raise ValueError("the model directory has no tokenizer.json: the server needs a tokenizer")
            adapters = None
            if options.lora:
                from .multi_lora import attach_adapters

                adapters = attach_adapters(model, options.lora)
            engine = Engine(model, tokenizer, max_batch=options.max_batch, max_queue=options.max_queue,
                            request_timeout=options.request_timeout, metrics=state.metrics,
                            prefix_cache_bytes=int(options.prefix_cache_mb * 1024 * 1024), adapters=adapters)
            state.engine = engine
            if state.feedback is not None:
                state.feedback.tokenizer = tokenizer
            state.endpoints = _endpoints(state, engine, tokenizer)
            log.info("model %s ready", options.model_name,
                     extra={"fields": {"params": model.num_params(), "block_size": engine.block_size,
                                       "max_batch": options.max_batch, "lora_adapters": list(options.lora)}})
        except BaseException as exc:  # reported by /health and the log; `gptforge serve` then exits non-zero
            state.load_error = exc
            log.error("model failed to load: %s", exc, exc_info=not isinstance(exc, GptforgeError))
            if state.on_load_failure is not None:
                state.on_load_failure(exc)
        finally:
            state.ready.set()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        threading.Thread(target=load, name="gptforge-load", daemon=True).start()
        yield
        # uvicorn has already let in-flight requests finish; now stop the engine thread.
        if state.engine is not None:
            state.engine.shutdown()
        if state.feedback is not None:
            state.feedback.close()
        log.info("server stopped")

    app = FastAPI(title="gptforge", version=_version(), lifespan=lifespan,
                  description="OpenAI-compatible text generation over a gptforge model.")
    app.state.server = state
    install_error_handlers(app)
    from .routes import router

    app.include_router(router)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    paths: set[str] = set()

    def route_paths() -> set[str]:
        if not paths:
            paths.update(getattr(r, "path", "") for r in list(app.routes) + list(router.routes))
        return paths

    app.add_middleware(GatewayMiddleware, state=state, route_paths=route_paths)
    return app


def _open_feedback(options: ServerOptions) -> Any:
    """The feedback route's serving object over the configured database, or None when feedback is off."""
    if not options.feedback_db:
        return None
    from ..feedback.store import FeedbackStore
    from .serving_feedback import FeedbackServing

    store = FeedbackStore.open(options.feedback_db, retention_s=options.feedback_retention)
    return FeedbackServing(store, options.model_name, mask=options.redact_pii != "off")


def _version() -> str:
    from .. import __version__

    return __version__


def load_model_dir(path: str | Path, dtype: Optional[str] = None) -> ModelLoader:
    """A loader for a saved model directory (config.json + safetensors + tokenizer files)."""
    def loader():
        from ..generate import prepare_for_decoding
        from ..loading import load

        model, tokenizer = load(path, dtype=dtype)
        return prepare_for_decoding(model), tokenizer

    return loader


def run_server(app: FastAPI, host: str = "127.0.0.1", port: int = 8000, graceful_timeout: float = 30.0) -> None:
    """Serve with uvicorn; SIGTERM/SIGINT stop accepting, finish in-flight requests, then stop the engine.

    When the model fails to load, the server stops and this raises the loading error (the CLI exits 2)."""
    import uvicorn

    # Keep idle connections longer than clients keep them in their pools (httpx/openai: 5 s, uvicorn's own
    # default too): with equal timeouts a client can send on a connection the server is closing, and that
    # well-formed request fails with a connection error (8 of 10,000 in benchmarks/serve_abuse.py).
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False,
                            timeout_graceful_shutdown=graceful_timeout, timeout_keep_alive=75, lifespan="on")
    server = uvicorn.Server(config)
    state: ServerState = app.state.server

    def stop(exc: BaseException) -> None:
        server.should_exit = True

    state.on_load_failure = stop
    server.run()
    if state.load_error is not None:
        raise ServerLoadError(f"the model failed to load: {state.load_error}") from state.load_error


class ServerLoadError(GptforgeError):
    """`gptforge serve` stopped because the model could not be loaded."""


__all__ = ["create_app", "ServerOptions", "load_model_dir", "run_server", "configure_logging", "ServerLoadError"]

