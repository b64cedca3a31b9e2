"""One root exception; adapters translate third-party errors into these with ``raise ... from``."""

from __future__ import annotations

from typing import Literal, get_args

__all__ = [
    "REJECT_REASONS",
    "CardinalityError",
    "ConfigError",
    "DecodeError",
    "GatewayError",
    "RejectReason",
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


# Why a message was rejected, as a small fixed set: it is a metric label, so free text must never get in.
RejectReason = Literal[
    "too_large", "topic", "encoding", "json", "schema", "time_window", "line_protocol", "cardinality", "internal",
    "protobuf", "no_birth", "alias", "datatype",  # Sparkplug B: bad payload, DATA before BIRTH, unknown alias
]
REJECT_REASONS: tuple[RejectReason, ...] = get_args(RejectReason)


class DecodeError(GatewayError):
    """A message could not be decoded; the message names the field and why, ``reason`` the kind of problem.

    >>> DecodeError("payload is not valid JSON: ...", reason="json").reason
    'json'
    """

    reason: RejectReason = "schema"

    def __init__(self, message: str, *, reason: RejectReason | None = None) -> None:
        super().__init__(message)
        if reason is not None:
            self.reason = reason


class CardinalityError(DecodeError):
    """A device tried to create more series than ``max_series`` allows."""

    reason: RejectReason = "cardinality"


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
