"""One JSON error shape for every failure::

    {"error": {"code": "validation_error", "message": "...", "details": [{"field": "recipe.weight.bits", ...}]}}
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

_STATUS_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "validation_error",
    429: "too_many_requests",
    500: "internal_error",
    503: "unavailable",
}


class FieldError(BaseModel):
    field: str
    message: str
    type: str


class ErrorBody(BaseModel):
    code: str
    message: str
    details: list[FieldError] | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


class ApiError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, details: list[FieldError] | None = None):
        super().__init__(message)
        self.status = status
        self.code = code or _STATUS_CODES.get(status, "error")
        self.message = message
        self.details = details


def error_response(status: int, message: str, code: str | None = None, details: list[FieldError] | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    body = ErrorResponse(error=ErrorBody(code=code or _STATUS_CODES.get(status, "error"), message=message,
                                         details=details))
    return JSONResponse(status_code=status, content=body.model_dump(exclude_none=True), headers=headers)


def _loc_to_field(loc: Sequence[Any], drop_first: Iterable[str] = ("body", "query", "path", "header")) -> str:
    parts = list(loc)
    if parts and parts[0] in drop_first:
        parts = parts[1:]
    return ".".join(str(p) for p in parts) or "<root>"


def field_errors(errors: Iterable[dict[str, Any]], prefix: str = "") -> list[FieldError]:
    out = []
    for err in errors:
        field = _loc_to_field(err.get("loc", ()))
        if prefix:
            field = prefix if field == "<root>" else f"{prefix}.{field}"
        out.append(FieldError(field=field, message=str(err.get("msg", "invalid")), type=str(err.get("type", ""))))
    return out


def validation_error(exc: ValidationError, prefix: str = "") -> ApiError:
    details = field_errors(exc.errors(include_url=False), prefix)
    names = ", ".join(sorted({d.field for d in details}))
    return ApiError(422, f"invalid value for {names}", details=details)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return error_response(exc.status, exc.message, exc.code, exc.details, headers)

    @app.exception_handler(RequestValidationError)
    async def _request_validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        details = field_errors(exc.errors())
        names = ", ".join(sorted({d.field for d in details}))
        return error_response(422, f"invalid value for {names}", details=details)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unhandled(_: Request, exc: Exception) -> JSONResponse:
        logging.getLogger("service").exception("unhandled error: %s", type(exc).__name__)
        return error_response(500, "internal server error")


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": code.replace("_", " ")}
    for status, code in _STATUS_CODES.items()
    if status in (401, 404, 409, 413, 422)
}
