"""Checkpoints of the derived state: what every stateful compute part saves, in one versioned file.

Every stateful part (series registry, detectors, features, OEE, the Sparkplug tables) has
``snapshot() -> State`` and ``restore(State)``. A :class:`State` is JSON-able ``meta`` plus named numpy
arrays; parts nest under a name (``oee/…``). A checkpoint file is an uncompressed ``.npz`` (numpy's zip,
a crc32 per member) whose member ``__header__`` is the JSON header: format name, :data:`VERSION`, a
fingerprint of the settings that shape the state, the WAL record id the state covers, and every part's
meta. It is written atomically (temp file, fsync, rename, fsync of the directory).

:func:`read_checkpoint` raises :class:`CheckpointError` with one clear reason for a corrupt file, a
newer format or other settings; the caller sets such a file aside (``*.rejected``), never mixes it in.

>>> import tempfile, numpy as np
>>> from pathlib import Path
>>> st = State({"late": 3}, {"x": np.arange(4)})
>>> root = State()
>>> root.put("oee", st)
>>> with tempfile.TemporaryDirectory() as tmp:
...     path = Path(tmp) / "checkpoint.npz"
...     size = write_checkpoint(path, root, fingerprint="abc", wal_id=42)
...     ck = read_checkpoint(path, fingerprint="abc")
...     ck.wal_id, ck.state.sub("oee").meta, ck.state.sub("oee").arrays["x"].tolist()
(42, {'late': 3}, [0, 1, 2, 3])
>>> with tempfile.TemporaryDirectory() as tmp:
...     path = Path(tmp) / "checkpoint.npz"
...     size = write_checkpoint(path, root, fingerprint="abc", wal_id=42)
...     read_checkpoint(path, fingerprint="other")
Traceback (most recent call last):
...
gateway.checkpoint.CheckpointError: written with other detector/OEE/features settings (fingerprint abc, now other)
"""

from __future__ import annotations

import hashlib
import os
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt
import orjson

from gateway.errors import GatewayError
from gateway.wal import fsync_dir

__all__ = [
    "FORMAT",
    "VERSION",
    "Checkpoint",
    "CheckpointError",
    "State",
    "Stateful",
    "fingerprint",
    "read_checkpoint",
    "set_aside",
    "write_checkpoint",
]

FORMAT = "factory-gateway-checkpoint"
VERSION = 8  # 2: the machine model keeps its state events by arrival (m_evt), the state filter its positions;
# 3: its lag fits keep the lower triangle of their normal matrix only; 4: series keep which level is
# their stopped one (S_LOWK, in place of the indicator), lag fits the one they learned with (J_LOWK);
# 5: series keep the level their last sample jumped from and the reading before it (S_XL, S_XB); 6: lag fits
# keep their last inputs (J_UP, J_LOWP), series their resolution (S_RES); 7: calibrated scores keep their tail
# (the rate beyond its start, the mean excess, the excesses seen); 8: series keep their CUSUMs' open 10-s
# blocks (S_BTZ, S_BZ, S_BTJ, S_BJ)
_HEADER = "__header__"

Arr = npt.NDArray[Any]


class CheckpointError(GatewayError):
    """A checkpoint cannot be used: corrupt, from a newer version, or made with other settings."""

    def __init__(self, why: str, *, intact: Checkpoint | None = None) -> None:
        super().__init__(why)
        self.intact = intact  # read fine but made with other settings: its series registry is still good


@dataclass(slots=True)
class State:
    """The saved state of one part: JSON-able ``meta`` and named arrays; parts nest with :meth:`put`."""

    meta: dict[str, Any] = field(default_factory=dict)
    arrays: dict[str, Arr] = field(default_factory=dict)

    def put(self, name: str, part: State) -> None:
        """Nest ``part`` under ``name`` (its arrays become ``name/<key>``)."""
        self.meta[name] = part.meta
        for key, arr in part.arrays.items():
            self.arrays[f"{name}/{key}"] = arr

    def has(self, name: str) -> bool:
        return isinstance(self.meta.get(name), dict)

    def sub(self, name: str) -> State:
        """The part nested under ``name``; KeyError if it was not saved."""
        meta = self.meta[name]
        if not isinstance(meta, dict):
            raise KeyError(name)
        prefix = name + "/"
        n = len(prefix)
        return State(meta, {k[n:]: v for k, v in self.arrays.items() if k.startswith(prefix)})

    def array(self, key: str) -> Arr:
        """One array; a missing one is a corrupt checkpoint, not a KeyError deep in a restore."""
        try:
            return self.arrays[key]
        except KeyError:
            raise CheckpointError(f"array {key!r} missing") from None


class Stateful(Protocol):
    """A compute part whose state survives a restart."""

    def snapshot(self) -> State: ...

    def restore(self, state: State) -> None: ...


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """A checkpoint read back: the state, the WAL record id it covers, and its header."""

    state: State
    wal_id: int
    fingerprint: str
    created: float


def fingerprint(settings: dict[str, Any]) -> str:
    """A short stable digest of the settings that shape the saved state (JSON, sorted keys).

    >>> fingerprint({"b": 1, "a": [1.5]}) == fingerprint({"a": [1.5], "b": 1})
    True
    """
    body = orjson.dumps(settings, option=orjson.OPT_SORT_KEYS)
    return hashlib.sha256(body).hexdigest()[:16]


def write_checkpoint(path: Path, state: State, *, fingerprint: str, wal_id: int) -> int:
    """Write ``state`` atomically to ``path`` (temp file, fsync, rename, fsync dir); return its size."""
    header = {"format": FORMAT, "version": VERSION, "fingerprint": fingerprint, "wal_id": int(wal_id),
              "created": time.time(), "meta": state.meta}
    head = orjson.dumps(header, option=orjson.OPT_SERIALIZE_NUMPY)
    members: dict[str, Arr] = {_HEADER: np.frombuffer(head, np.uint8)}
    for key, arr in state.arrays.items():
        if key == _HEADER:
            raise ValueError(f"{_HEADER} is reserved")
        members[key] = arr
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        # uncompressed: state arrays barely compress and a Pi's CPU is the limit
        np.savez(fh, allow_pickle=False, **members)
        fh.flush()
        os.fsync(fh.fileno())
        size = fh.tell()
    os.replace(tmp, path)
    fsync_dir(path.parent)
    return size


def read_checkpoint(path: Path, *, fingerprint: str) -> Checkpoint:
    """Read and check a checkpoint; raise :class:`CheckpointError` saying why it cannot be used.

    Also FileNotFoundError when there is none.
    """
    if not path.exists():
        raise FileNotFoundError(path)
    try:
        with np.load(path, allow_pickle=False) as npz:
            names = list(npz.files)
            if _HEADER not in names:
                raise CheckpointError("no header (not a checkpoint)")
            header = orjson.loads(npz[_HEADER].tobytes())
            if not isinstance(header, dict) or header.get("format") != FORMAT:
                raise CheckpointError("not a factory-gateway checkpoint")
            version = header.get("version")
            if not isinstance(version, int) or version > VERSION:
                raise CheckpointError(f"format version {version} is newer than this gateway's {VERSION}")
            if version < VERSION:
                raise CheckpointError(f"format version {version} is older than this gateway's {VERSION}")
            meta = header.get("meta")
            wal_id = header.get("wal_id")
            if not isinstance(meta, dict) or not isinstance(wal_id, int):
                raise CheckpointError("header lacks meta or wal_id")
            arrays = {k: npz[k] for k in names if k != _HEADER}  # reading a member checks its crc32
    except CheckpointError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, orjson.JSONDecodeError, KeyError) as exc:
        raise CheckpointError(f"corrupt ({type(exc).__name__}: {exc})") from exc
    ck = Checkpoint(State(meta, arrays), wal_id, str(header.get("fingerprint")), float(header.get("created", 0.0)))
    if ck.fingerprint != fingerprint:
        raise CheckpointError(f"written with other detector/OEE/features settings (fingerprint {ck.fingerprint}, "
                              f"now {fingerprint})", intact=ck)
    return ck


def set_aside(path: Path) -> Path:
    """Rename a rejected checkpoint to ``<name>.rejected`` (replacing an older one); return the new path."""
    target = path.with_name(path.name + ".rejected")
    os.replace(path, target)
    return target
