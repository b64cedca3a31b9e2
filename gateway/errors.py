"""One root exception; adapters translate third-party errors into these with ``raise ... from``."""

from __future__ import annotations

__all__ = [
    "CardinalityError",
    "ConfigError",
    "DecodeError",
    "GatewayError",
    "SinkError",
    "SourceError",
]


class GatewayError(Exception):
    """Root of every error the gateway raises on purpose."""


class ConfigError(GatewayError):
    """The configuration is invalid; ``problems`` holds one ``key: message`` line per problem."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


class DecodeError(GatewayError):
    """A message could not be decoded; the message names the field and why."""


class CardinalityError(DecodeError):
    """A device tried to create more series than ``max_series`` allows."""


class SourceError(GatewayError):
    """The message source (MQTT broker) failed."""


class SinkError(GatewayError):
    """Writing to the database failed.

    ``retryable`` says whether the same data may succeed later (connection errors, 5xx, 429);
    ``status`` is the HTTP status when there was one; ``retry_after`` honours the server's hint.
    """

    def __init__(
        self,
        message: str,
        *,
        retryable: bool,
        status: int | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.status = status
        self.retry_after = retry_after
