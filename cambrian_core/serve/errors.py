"""The one error type every server turns into a 4xx answer, and the LLaVA protocol's error codes."""

from __future__ import annotations

import enum

__all__ = ["SERVER_ERROR_MSG", "ErrorCode", "RequestError"]

#: the LLaVA / FastChat message shown when a request cannot be served
SERVER_ERROR_MSG = "**NETWORK ERROR DUE TO HIGH TRAFFIC. PLEASE REGENERATE OR REFRESH THIS PAGE.**"


class ErrorCode(enum.IntEnum):
    """``error_code`` of a ``/worker_generate_stream`` chunk (0-3 as in LLaVA; 4 and 5 are ours)."""

    OK = 0
    WORKER_ERROR = 1  #: the worker failed while generating
    NO_WORKER = 2  #: the controller knows no worker for the model
    WORKER_TIMEOUT = 3  #: the controller lost the worker (timeout, connection dropped, worker killed)
    BAD_REQUEST = 4  #: the request itself is invalid (sent with an HTTP 4xx status)
    OVERLOADED = 5  #: the worker's queue is full (HTTP 503)


class RequestError(ValueError):
    """A request the server refuses; ``status`` is the HTTP status (400, 401, 404, 413, 503 ...).

    ``param`` names the offending field (OpenAI's ``error.param``) and ``code`` is a short machine-readable tag.
    """

    def __init__(
        self, message: str, status: int = 400, param: str | None = None, code: str | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.param = param
        self.code = code or {
            400: "invalid_request",
            401: "invalid_api_key",
            404: "not_found",
            413: "too_large",
            503: "overloaded",
        }.get(status, "error")

    @property
    def error_code(self) -> ErrorCode:
        """The LLaVA ``error_code`` matching ``status``."""
        return ErrorCode.OVERLOADED if self.status == 503 else ErrorCode.BAD_REQUEST
