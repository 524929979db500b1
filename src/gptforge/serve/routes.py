"""Thin HTTP routes: parse, call the endpoint's serving class, return JSON or a server-sent event stream."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse

from .errors import APIError
from .protocol import (ChatCompletionRequest, ChatCompletionResponse, CompletionRequest, CompletionResponse,
                       DetokenizeRequest, DetokenizeResponse, EmbeddingRequest, EmbeddingResponse, FeedbackRequest,
                       FeedbackResponse, InfillRequest, ModelList, TokenizeRequest, TokenizeResponse, TokenizerInfo)

router = APIRouter()

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def _endpoints(request: Request) -> Any:
    state = request.app.state.server
    if state.endpoints is None:
        raise APIError(503, "model is still loading", code="loading", headers={"Retry-After": "5"})
    return state.endpoints


def _key_id(request: Request) -> str:
    return getattr(request.state, "key_id", None) or "anonymous"


def _remember(request: Request, endpoint: str, body: Any, result: Any) -> Any:
    """With feedback on, the response is kept (by id) for later feedback; returns `result` (a stream wrapped)."""
    feedback = request.app.state.server.feedback
    if feedback is None:
        return result
    return feedback.remember(endpoint, body, result, getattr(request.state, "request_id", None), _key_id(request))


def _reply(result: Any) -> Response:
    if isinstance(result, dict):
        return JSONResponse(result)
    return StreamingResponse(result, media_type="text/event-stream", headers=SSE_HEADERS)


@router.get("/health", tags=["operations"])
async def health(request: Request) -> Response:
    """200 when the model is loaded and the engine runs; 503 while loading or shutting down."""
    state = request.app.state.server
    if state.endpoints is None:
        return JSONResponse({"status": "loading" if state.load_error is None else "failed"}, status_code=503)
    return JSONResponse({"status": "ok", "running": state.engine.num_running, "waiting": state.engine.num_waiting})


@router.get("/metrics", tags=["operations"])
async def metrics(request: Request) -> Response:
    """Prometheus text exposition."""
    m = request.app.state.server.metrics
    return Response(m.render(), media_type=m.content_type)


@router.get("/v1/models", response_model=ModelList, tags=["openai"])
async def list_models(request: Request) -> Response:
    return JSONResponse(_endpoints(request).tokenization.models())


@router.get("/v1/models/{model_id:path}", tags=["openai"])
async def get_model(model_id: str, request: Request) -> Response:
    return JSONResponse(_endpoints(request).tokenization.model(model_id))


@router.post("/v1/completions", response_model=CompletionResponse, tags=["openai"])
async def completions(body: CompletionRequest, request: Request) -> Response:
    request.state.user = body.user
    result = await _endpoints(request).completions.create(body, request, _key_id(request))
    return _reply(_remember(request, "completions", body, result))


@router.post("/v1/chat/completions", response_model=ChatCompletionResponse, tags=["openai"])
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
    request.state.user = body.user
    result = await _endpoints(request).chat.create(body, request, _key_id(request))
    return _reply(_remember(request, "chat", body, result))


@router.post("/infill", tags=["llama.cpp"])
async def infill(body: InfillRequest, request: Request) -> Response:
    """Fill in the middle, as llama.cpp's server does (editor plugins: llama.vscode, llama.vim); docs/serve.md."""
    return _reply(await _endpoints(request).infill.create(body, request, _key_id(request)))


@router.post("/v1/embeddings", response_model=EmbeddingResponse, tags=["openai"])
async def embeddings(body: EmbeddingRequest, request: Request) -> Response:
    request.state.user = body.user
    return JSONResponse(await _endpoints(request).embeddings.create(body, request, _key_id(request)))


@router.get("/v1/feedback", tags=["feedback"])
async def feedback_settings(request: Request) -> Response:
    """Whether feedback is on (the chat page shows its buttons then) and how long responses are kept."""
    serving = request.app.state.server.feedback
    if serving is None:
        raise APIError(404, "feedback is not enabled on this server: start it with --feedback-db", code="not_enabled")
    return JSONResponse({"object": "feedback.settings", "enabled": True,
                         "retention_seconds": serving.store.retention_s})


@router.post("/v1/feedback", response_model=FeedbackResponse, tags=["feedback"])
async def feedback(body: FeedbackRequest, request: Request) -> Response:
    """A rating, a choice between two answers or a better answer (gptforge extension; docs/feedback.md)."""
    serving = request.app.state.server.feedback
    if serving is None:
        raise APIError(404, "feedback is not enabled on this server: start it with --feedback-db", code="not_enabled")
    return JSONResponse(await serving.create(body, _key_id(request), getattr(request.state, "request_id", None)))


@router.post("/tokenize", response_model=TokenizeResponse, tags=["tokenizer"])
async def tokenize(body: TokenizeRequest, request: Request) -> Response:
    return JSONResponse(await _endpoints(request).tokenization.tokenize(body))


@router.post("/detokenize", response_model=DetokenizeResponse, tags=["tokenizer"])
async def detokenize(body: DetokenizeRequest, request: Request) -> Response:
    return JSONResponse(await _endpoints(request).tokenization.detokenize(body))


@router.get("/tokenizer_info", response_model=TokenizerInfo, tags=["tokenizer"])
async def tokenizer_info(request: Request) -> Response:
    return JSONResponse(_endpoints(request).tokenization.tokenizer_info())


@router.get("/", include_in_schema=False)
async def chat_page(request: Request) -> Response:
    return FileResponse(request.app.state.server.static_dir / "index.html")
