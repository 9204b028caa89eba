"""The errors a request can meet in the engine and the server, each carrying what it is about."""

from __future__ import annotations

__all__ = ["EngineClosedError", "InvalidRequestError", "QueueFullError", "RequestTooLargeError"]


# --------------------------------------------------------------------------- errors


class InvalidRequestError(ValueError):
    """A request the engine refuses as given; ``field`` names the bad field (the message its value)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


class RequestTooLargeError(InvalidRequestError):
    """A request that could never run: its peak KV need exceeds the whole pool, or its
    settings exceed the engine's limits. The message gives the need and the limit."""


class QueueFullError(RuntimeError):
    """The waiting queue is full; try again later."""


class EngineClosedError(RuntimeError):
    """The engine is shutting down, or its step loop stopped on an error."""
