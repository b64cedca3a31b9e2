"""How the compiled kernels are loaded: an ahead-of-time build while it is current, else numba's JIT.

The kernels (:mod:`gateway.detect.kernels`, :mod:`~gateway.detect.likelihood`, :mod:`~gateway.detect.seasonal`)
are written once, decorated ``@njit(...)`` from here. In **JIT mode** that is ``numba.njit``: numba
compiles them, caching the machine code under ``NUMBA_CACHE_DIR``. In **AOT mode** numba is never
imported (importing it costs ~59 MB RSS, loading a cached function sets up LLVM for ~45 MB more): the
entry points in :data:`ENTRY_POINTS` come from ``_kernels_aot``, an extension module that
``python -m gateway.detect.aot`` compiles from these same functions with ``numba.pycc`` (no library
ships these kernels precompiled), and the helpers they call (compiled into it) stay plain functions.

AOT mode is used when the extension exists and was built from the current text of :data:`SOURCES`
(a sha256 :func:`source_digest`; editing a kernel never runs a stale build), unless
``FACTORY_GATEWAY_JIT=1``. :data:`MODE` says which.

>>> MODE in ("aot", "jit")
True
>>> len(source_digest())
64
"""

from __future__ import annotations

import functools
import hashlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["ENTRY_POINTS", "MODE", "SOURCES", "njit", "source_digest"]

HERE = Path(__file__).resolve().parent
# the files the extension is compiled from (the build script too: its options shape the code)
SOURCES = ("jit.py", "aot.py", "kernels.py", "likelihood.py", "seasonal.py")
AOT_MODULE = "gateway.detect._kernels_aot"


def _arg(dtype: str, ndim: int = 1, written: bool = False) -> tuple[str, int, bool]:
    return dtype, ndim, written


_I, _F, _B = _arg("int64"), _arg("float64"), _arg("bool")
_F2, _F3 = _arg("float64", 2), _arg("float64", 3)
_Iw, _Fw, _Bw = _arg("int64", written=True), _arg("float64", written=True), _arg("bool", written=True)
_F2w, _F3w = _arg("float64", 2, True), _arg("float64", 3, True)
_I2 = _arg("int64", 2)

# Every entry point (module.function) and its arguments as the call sites pass them: (dtype, ndim, written),
# every one a C-contiguous array; none returns a value. The build exports exactly these signatures, and
# in AOT mode a call with any other argument raises TypeError (a compiled function does not check them).
ENTRY_POINTS: dict[str, tuple[tuple[str, int, bool], ...]] = {
    "gateway.detect.kernels.step_batch": (
        _I, _I, _I, _I, _F, _I,  # order, sid, mach, ts, x, brk
        _I, _I, _I, _I, _Iw,  # ev_mach, ev_ts, ev_reg, ev_pos, ev_done
        _F2w, _F3w, _F3w, _I2, _I,  # s_state, s_lev, s_lag, s_sib, s_group
        _Iw, _Iw, _F2w, _Fw,  # m_state, m_evt, g_state, g_members
        _F, _F2w, _Fw, _Fw, _Bw,  # prm, out, expected, zout, lone
    ),
    "gateway.detect.likelihood._calibrate": (
        _I, _I, _I, _F2, _F3w, _F, _F2w, _B,  # slots, active, offsets, raw, st, prm, out, mask
    ),
    "gateway.detect.seasonal._seasonal": (
        _I, _I, _I, _F, _F, _F3w, _F2w, _F, _Fw, _B,  # slots, active, offsets, x, t, bk, hd, prm, out, mask
    ),
}


def export_name(entry: str) -> str:
    """The extension's name for an entry point: ``step_batch``, ``calibrate``, ``seasonal``."""
    return entry.rsplit(".", 1)[1].lstrip("_")


def source_digest() -> str:
    """sha256 of :data:`SOURCES` (names and bytes)."""
    h = hashlib.sha256()
    for name in SOURCES:
        h.update(name.encode() + b"\0" + (HERE / name).read_bytes() + b"\0")
    return h.hexdigest()


def _load_aot() -> Any:
    """The extension module if it is to be used, else None."""
    if os.environ.get("FACTORY_GATEWAY_JIT", "") not in ("", "0"):
        return None
    try:
        import importlib

        mod = importlib.import_module(AOT_MODULE)
        current = source_digest()
    except (ImportError, OSError):  # not built (or for another Python), or a source not readable
        return None
    return mod if mod.source_digest() == current else None


def _checked(compiled: Callable[..., None], py_func: Callable[..., None], entry: str) -> Callable[..., None]:
    """``compiled`` behind a check that every argument has the type it was compiled for."""
    spec = [(np.dtype(d), nd, w) for d, nd, w in ENTRY_POINTS[entry]]

    @functools.wraps(py_func)
    def call(*args: Any) -> None:
        if len(args) != len(spec):
            raise TypeError(f"{entry}: {len(args)} arguments, expected {len(spec)}")
        for i, (a, (dt, nd, w)) in enumerate(zip(args, spec, strict=True)):
            if not (isinstance(a, np.ndarray) and a.dtype == dt and a.ndim == nd and a.flags.c_contiguous
                    and (a.flags.writeable or not w)):
                raise TypeError(f"{entry}: argument {i} is {type(a).__name__} {getattr(a, 'dtype', '')} "
                                f"{getattr(a, 'shape', '')}, expected a C-contiguous{' writeable' if w else ''} "
                                f"{nd}-d {dt} array")
        compiled(*args)

    return call


_AOT = _load_aot()
MODE = "jit" if _AOT is None else "aot"

if _AOT is None:
    if "NUMBA_CACHE_DIR" not in os.environ:  # the package dir may be read-only (systemd ProtectSystem)
        os.environ["NUMBA_CACHE_DIR"] = str(Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
                                            / "factory-gateway" / "numba")
    import numba


def njit(**options: Any) -> Callable[[Callable[..., Any]], Any]:
    """``numba.njit(**options)`` in JIT mode; in AOT mode the extension's compiled entry point, or for a
    helper the plain function (compiled into the extension, not called from Python)."""
    def decorate(fn: Callable[..., Any]) -> Any:
        if _AOT is None:
            return numba.njit(**options)(fn)
        entry = f"{fn.__module__}.{fn.__qualname__}"
        if entry not in ENTRY_POINTS:
            return fn
        return _checked(getattr(_AOT, export_name(entry)), fn, entry)

    return decorate
