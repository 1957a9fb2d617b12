"""Flynn's API error format (`pkg/httphelper`): `{"code", "message", "detail", "retry"}`.

Handlers raise a `FlynnError`; the host API's middleware turns it (and any other exception,
as `unknown_error`) into the JSON body and the status code Flynn's clients expect.
"""

from __future__ import annotations

from typing import Any

STATUS_BY_CODE = {
    "not_found": 404,
    "object_not_found": 404,
    "object_exists": 409,
    "conflict": 409,
    "precondition_failed": 412,
    "syntax_error": 400,
    "validation_error": 400,
    "request_body_too_big": 400,
    "request_timeout": 408,  # this host's: a request body that did not arrive in time
    "unauthorized": 401,
    "forbidden": 403,
    "unknown_error": 500,
    "ratelimited": 429,
    "service_unavailable": 503,
}


class FlynnError(Exception):
    """An error with a Flynn error code; `status` follows from the code."""

    def __init__(self, code: str, message: str, detail: Any = None, retry: bool = False) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.detail = detail
        self.retry = retry

    @property
    def status(self) -> int:
        return STATUS_BY_CODE.get(self.code, 500)

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.detail is not None:
            body["detail"] = self.detail
        body["retry"] = self.retry
        return body


class ValidationError(FlynnError):
    """`httphelper.ValidationError(w, field, msg)`: message is "<field> <msg>"."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(
            "validation_error",
            f"{field} {message}".strip(),
            {"field": field} if field else None,
        )
        self.field = field


def not_found(message: str) -> FlynnError:
    return FlynnError("not_found", message)


def conflict(message: str, detail: Any = None) -> FlynnError:
    return FlynnError("conflict", message, detail)
