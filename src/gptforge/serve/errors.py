"""The server's one error type, rendered in OpenAI's shape everywhere.

Every failure a client sees is `{"error": {"message", "type", "param", "code"}}` with the right status.
Handlers below turn FastAPI/Starlette/pydantic errors into that shape so no route ever answers 500
for a client mistake.
"""

from __future__ import annotations

import json
import logging
from typing import Any, Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("gptforge.serve")

# status -> OpenAI error "type"
ERROR_TYPES: dict[int, str] = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "timeout_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    499: "cancelled",
    500: "server_error",
    503: "service_unavailable",
    504: "timeout_error",
}


class APIError(Exception):
    """A client-visible error: HTTP status + OpenAI-shaped body (+ optional headers such as Retry-After)."""

    def __init__(self, status: int, message: str, *, param: Optional[str] = None, code: Optional[str] = None,
                 type: Optional[str] = None, headers: Optional[dict[str, str]] = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or ERROR_TYPES.get(status, "invalid_request_error")
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        """The JSON body `{"error": {...}}`."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        """As a JSONResponse."""
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)

    def sse(self) -> str:
        """As one server-sent event (errors that happen after a stream has started)."""
        return f"data: {json.dumps(self.body())}\n\n"


def invalid_param(param: str, message: str) -> APIError:
    """400 naming the offending parameter."""
    return APIError(400, message, param=param, code="invalid_parameter")


def _loc_to_param(loc: tuple[Any, ...]) -> Optional[str]:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    # pydantic unions add the tried member type to the location ("str", "list[int]"...): drop those.
    parts = [p for p in parts if not (p.startswith(("list[", "dict[", "function-")) or p in ("str", "int", "float", "bool"))]
    if not parts:
        return None
    out = parts[0]
    for p in parts[1:]:
        out += f"[{p}]" if p.isdigit() else f".{p}"
    return out


def validation_error(exc: RequestValidationError) -> APIError:
    """Malformed JSON -> 422; a well-formed body with a bad field -> 400 naming the field."""
    errors = exc.errors()
    for err in errors:
        if err.get("type") == "json_invalid":
            ctx = err.get("ctx", {}) or {}
            return APIError(422, f"request body is not valid JSON: {ctx.get('error', 'parse error')}",
                            code="json_invalid")
    if errors:
        # A union field (prompt: str | list[str] | ...) reports one error per member; the one that says
        # what is wrong with the value (our validators, length limits) beats "input should be a list".
        rank = {"value_error": 0, "too_long": 1, "too_short": 1}
        err = min(errors, key=lambda e: rank.get(e.get("type", ""), 2))
        param = _loc_to_param(tuple(err.get("loc", ())))
        if param is None and err.get("type") in ("model_attributes_type", "dict_type"):
            return APIError(422, "request body must be a JSON object", code="json_invalid")
        msg = err.get("msg", "invalid value")
        where = f"parameter '{param}'" if param else "request body"
        return invalid_param(param or "body", f"{where}: {msg}")
    return invalid_param("body", "invalid request")


def install_error_handlers(app: FastAPI) -> None:
    """Route every error through APIError's OpenAI shape."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return validation_error(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            err = APIError(404, f"no route {request.method} {request.url.path}", code="not_found")
        elif exc.status_code == 405:
            err = APIError(405, f"method {request.method} not allowed on {request.url.path}", code="method_not_allowed")
        else:
            err = APIError(exc.status_code, str(exc.detail))
        return err.response()

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("internal error on %s", request.url.path)
        return APIError(500, "internal server error", code="internal_error").response()
