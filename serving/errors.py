"""Errors a request can meet, each with its HTTP status and a message saying what to do.

One exception handler turns every ``ServingError`` into ``{"error": message}`` with its status
and headers, and counts it under its ``kind`` in the metrics.
"""

from __future__ import annotations

from edgekd.errors import EdgeKDError


class ServingError(EdgeKDError):
    status: int = 400
    kind: str = "bad_request"
    headers: dict[str, str] | None = None

    def __init__(self, message: str, status: int | None = None, kind: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        if status is not None:
            self.status = status
        if kind is not None:
            self.kind = kind
        if headers is not None:
            self.headers = headers


class RequestError(ServingError):
    """The request is wrong (4xx); the message names the field and the limit."""


class TextTooLongError(ServingError):
    """A text has more tokens than max_length and the server is set to reject such texts."""

    status = 422

    def __init__(self, index: int, max_length: int):
        self.index = index
        super().__init__(
            f"texts[{index}] is longer than {max_length} tokens and this server rejects long texts "
            "(overflow=reject): shorten it, or ask for a server with overflow=truncate."
        )


class OverloadedError(ServingError):
    """More texts are waiting for the runner than the server's queue allows."""

    status = 503
    kind = "overloaded"
    headers = {"Retry-After": "1"}


class ShuttingDownError(ServingError):
    """The server is shutting down and accepts no new inference work."""

    status = 503
    kind = "overloaded"
    headers = {"Connection": "close"}


class NotReadyError(ServingError):
    """The model is not loaded yet."""

    status = 503
    kind = "not_ready"
    headers = {"Retry-After": "1"}


class DeadlineError(ServingError):
    """The model did not answer within the request time limit."""

    status = 504
    kind = "timeout"
