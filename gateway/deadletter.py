"""Dead-letter file: what the gateway could not use is kept as JSON lines instead of being dropped.

Two kinds of record, one JSON object per line:

* ``"kind": "message"`` — an MQTT message that failed to decode or validate, written before the
  message is acked (the pipeline calls :meth:`DeadLetterFile.sync` first);
* ``"kind": "rejected_line"`` — a line-protocol line the database refused (HTTP 400/422), with the
  server's message as ``reason`` and ``"topic": null``.

Fields: ``arrival`` (RFC 3339 UTC, nanoseconds), ``kind``, ``topic``, ``payload`` (text when it is
valid UTF-8, else base64, as said by ``payload_encoding``) and ``reason``. A payload longer than
``max_payload_bytes`` is cut there and the record gets ``"truncated": true`` and the original size as
``payload_bytes``. The file is rotated by rename at ``max_bytes``, keeping ``keep`` files in all.
"""

from __future__ import annotations

import base64
import codecs
import contextlib
import os
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import Annotated, BinaryIO, Self

import orjson
from pydantic import BaseModel, ByteSize, ConfigDict, Field

from gateway.errors import GatewayError
from gateway.stats import DeadLetterSnapshot

__all__ = ["DeadLetterConfig", "DeadLetterError", "DeadLetterFile", "format_rfc3339_ns"]

# A server's explanation for a rejected batch can be long; one record keeps the start of it.
_MAX_REASON_CHARS = 4096


class DeadLetterError(GatewayError):
    """The dead-letter file could not be written."""


class DeadLetterConfig(BaseModel):
    """The ``[deadletter]`` section: where rejected messages and lines are kept, and how much.

    Sizes accept integers (bytes) or strings such as ``"10MiB"``. ``keep`` counts every file,
    the live one included.

    >>> DeadLetterConfig(max_bytes="1MiB", keep=3).max_bytes
    1048576
    """

    model_config = ConfigDict(extra="forbid")

    path: Path = Path("/var/lib/factory-gateway/deadletter.jsonl")
    max_bytes: Annotated[ByteSize, Field(gt=0)] = ByteSize(10 << 20)
    keep: Annotated[int, Field(ge=1)] = 5
    max_payload_bytes: Annotated[ByteSize, Field(gt=0)] = ByteSize(64 << 10)


def format_rfc3339_ns(ts_ns: int) -> str:
    """Format integer nanoseconds since the epoch as RFC 3339 UTC with nine fractional digits.

    >>> format_rfc3339_ns(1763899200_000000001)
    '2025-11-23T12:00:00.000000001Z'
    """
    seconds, nanos = divmod(ts_ns, 1_000_000_000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{nanos:09d}Z"


def _encode_payload(payload: bytes, limit: int) -> dict[str, object]:
    truncated = len(payload) > limit
    cut = payload[:limit] if truncated else payload
    try:
        # A cut may split a multi-byte character: drop that partial tail rather than fall back to base64.
        text = codecs.getincrementaldecoder("utf-8")().decode(cut, final=not truncated)
        fields: dict[str, object] = {"payload": text, "payload_encoding": "utf-8"}
    except UnicodeDecodeError:
        fields = {"payload": base64.b64encode(cut).decode("ascii"), "payload_encoding": "base64"}
    if truncated:
        fields["truncated"] = True
        fields["payload_bytes"] = len(payload)
    return fields


def _json_safe(text: str) -> str:
    # Lone surrogates (e.g. from surrogateescape decoding) cannot be encoded as JSON.
    return text.encode("utf-8", "replace").decode("utf-8")


class DeadLetterFile:
    """Append-only, size-bounded, rotated JSON-lines file of rejected messages and lines.

    Parameters
    ----------
    path : path
        The live file; rotated copies are ``<path>.1`` (newest) … ``<path>.<keep-1>`` (oldest).
    max_bytes : int
        Rotate before a record would make the live file larger than this.
    keep : int
        How many files to keep in all, the live one included (``1``: rotation discards).
    max_payload_bytes : int
        Payloads are cut at this many bytes and flagged ``"truncated": true``.

    Examples
    --------
    >>> import tempfile
    >>> import orjson
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     with DeadLetterFile(Path(tmp) / "deadletter.jsonl") as dead:
    ...         dead.write("f/s1/a1/l1/m1/telemetry", b'{"ts": "x"}', "ts: bad timestamp", 1763899200 * 10**9)
    ...         dead.write("f/s1/a1/l1/m1/state", b"\\xff\\x01", "not JSON", 1763899200 * 10**9)
    ...         dead.sync()
    ...     lines = (Path(tmp) / "deadletter.jsonl").read_bytes().splitlines()
    >>> records = [orjson.loads(line) for line in lines]
    >>> records[0]["payload"], records[0]["payload_encoding"], records[0]["arrival"]
    ('{"ts": "x"}', 'utf-8', '2025-11-23T12:00:00.000000000Z')
    >>> records[1]["payload"], records[1]["payload_encoding"], records[1]["reason"]
    ('/wE=', 'base64', 'not JSON')
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        max_bytes: int = 10 << 20,
        keep: int = 5,
        max_payload_bytes: int = 64 << 10,
    ) -> None:
        if max_bytes <= 0 or keep < 1 or max_payload_bytes <= 0:
            raise ValueError("max_bytes and max_payload_bytes must be positive and keep at least 1")
        self._path = Path(path)
        self._max_bytes = int(max_bytes)
        self._keep = int(keep)
        self._max_payload = int(max_payload_bytes)
        self._lock = threading.Lock()
        self._records = 0
        self._rotations = 0
        try:
            self._path.parent.mkdir(parents=True, exist_ok=True)
            # Files beyond ``keep`` (left by a larger setting) would never be rotated away otherwise.
            for name in os.listdir(self._path.parent):
                suffix = name.removeprefix(self._path.name + ".")
                if name != suffix and suffix.isdigit() and int(suffix) >= self._keep:
                    (self._path.parent / name).unlink()
            self._file, self._size = self._open_live()
        except OSError as exc:
            raise DeadLetterError(f"cannot open dead-letter file {self._path}: {exc}") from exc
        self._closed = False

    @classmethod
    def from_config(cls, config: DeadLetterConfig) -> DeadLetterFile:
        """Open the file described by a ``[deadletter]`` config section."""
        return cls(
            config.path,
            max_bytes=config.max_bytes,
            keep=config.keep,
            max_payload_bytes=config.max_payload_bytes,
        )

    @property
    def path(self) -> Path:
        """The live file."""
        return self._path

    @property
    def records_written(self) -> int:
        """Records written since this object was opened."""
        return self._records

    def snapshot(self) -> DeadLetterSnapshot:
        """Counts for :mod:`gateway.stats`."""
        return DeadLetterSnapshot(records_written=self.records_written, rotations=self.rotations, path=str(self.path))

    @property
    def rotations(self) -> int:
        """Rotations done since this object was opened."""
        return self._rotations

    def write(self, topic: str, payload: bytes, reason: str, arrival_ns: int) -> None:
        """Write one rejected MQTT message (buffered; call :meth:`sync` before acking it)."""
        record: dict[str, object] = {
            "arrival": format_rfc3339_ns(arrival_ns),
            "kind": "message",
            "topic": _json_safe(topic),
            **_encode_payload(payload, self._max_payload),
            "reason": self._cap(reason),
        }
        with self._lock:
            self._append([orjson.dumps(record) + b"\n"])

    def write_lines(self, lines: list[bytes], reason: str, arrival_ns: int | None = None) -> None:
        """Write line-protocol lines the database rejected, one record each, with the server's reason."""
        arrival = format_rfc3339_ns(time.time_ns() if arrival_ns is None else arrival_ns)
        reason = self._cap(reason)
        encoded = [
            orjson.dumps(
                {
                    "arrival": arrival,
                    "kind": "rejected_line",
                    "topic": None,
                    **_encode_payload(line, self._max_payload),
                    "reason": reason,
                }
            )
            + b"\n"
            for line in lines
        ]
        with self._lock:
            self._append(encoded)

    def flush(self) -> None:
        """Hand buffered records to the operating system."""
        with self._lock:
            self._check_open()
            try:
                self._file.flush()
            except OSError as exc:
                raise DeadLetterError(f"cannot write dead-letter file {self._path}: {exc}") from exc

    def sync(self) -> None:
        """Flush and ``fsync``: the records written so far survive a crash."""
        with self._lock:
            self._check_open()
            try:
                self._file.flush()
                os.fsync(self._file.fileno())
            except OSError as exc:
                raise DeadLetterError(f"cannot sync dead-letter file {self._path}: {exc}") from exc

    def close(self) -> None:
        """Flush and close; idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            try:
                self._file.close()
            except OSError as exc:
                raise DeadLetterError(f"cannot close dead-letter file {self._path}: {exc}") from exc

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"DeadLetterFile({str(self._path)!r}, max_bytes={self._max_bytes}, keep={self._keep})"

    # ------------------------------------------------------------------------------ internals

    @staticmethod
    def _cap(reason: str) -> str:
        reason = reason if len(reason) <= _MAX_REASON_CHARS else reason[:_MAX_REASON_CHARS] + "…"
        return _json_safe(reason)

    def _check_open(self) -> None:
        if self._closed:
            raise DeadLetterError(f"dead-letter file {self._path} is closed")

    def _open_live(self) -> tuple[BinaryIO, int]:
        file = self._path.open("ab")
        return file, file.tell()

    def _append(self, encoded: list[bytes]) -> None:
        self._check_open()
        try:
            for line in encoded:
                if self._size > 0 and self._size + len(line) > self._max_bytes:
                    self._rotate()
                self._file.write(line)
                self._size += len(line)
                self._records += 1
        except OSError as exc:
            raise DeadLetterError(f"cannot write dead-letter file {self._path}: {exc}") from exc

    def _rotate(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        try:
            if self._keep == 1:
                self._path.unlink()
            else:
                with contextlib.suppress(FileNotFoundError):
                    Path(f"{self._path}.{self._keep - 1}").unlink()
                for index in range(self._keep - 2, 0, -1):
                    with contextlib.suppress(FileNotFoundError):
                        os.replace(f"{self._path}.{index}", f"{self._path}.{index + 1}")
                os.replace(self._path, f"{self._path}.1")
        finally:
            # Even if a rename failed, keep a live file open so later records are not lost.
            self._file, self._size = self._open_live()
        fd = os.open(self._path.parent, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        self._rotations += 1
