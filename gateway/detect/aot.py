"""Build ``gateway/detect/_kernels_aot``: the kernels' entry points compiled ahead of time (``numba.pycc``).

Why: no library ships these kernels precompiled, and a gateway that runs them from this extension never
imports numba or LLVM (~100 MB of RSS: see :mod:`gateway.detect.jit`). The functions compiled are the
kernels' own (each njit dispatcher's ``py_func``, helpers compiled in), with the signatures of
:data:`gateway.detect.jit.ENTRY_POINTS`; the extension also returns the :func:`~gateway.detect.jit.source_digest`
it was built from, so an edited kernel falls back to JIT until the next build.

``python -m gateway.detect.aot [--force] [--target-cpu NAME]`` builds it unless it is current (what
``deploy/dev/setup.sh`` runs). It runs in JIT mode (``FACTORY_GATEWAY_JIT=1``): it needs numba's dispatchers.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from gateway.detect import jit


def built_digest() -> str | None:
    """The source digest the extension in the package was built from (None: none built, or not loadable)."""
    try:
        mod = importlib.import_module(jit.AOT_MODULE)
    except ImportError:
        return None
    digest: str = mod.source_digest()
    return digest


def build(target_cpu: str = "") -> Path:
    """Compile the extension into the package directory (replacing any earlier one atomically); return its path.

    ``target_cpu`` as LLVM names it ("" pycc's generic CPU of the host's architecture, "host" this CPU)."""
    if jit.MODE != "jit":
        raise RuntimeError("the AOT build needs the JIT kernels: run it with FACTORY_GATEWAY_JIT=1")
    import warnings

    from numba.core.errors import NumbaPendingDeprecationWarning

    with warnings.catch_warnings():  # pycc is "pending deprecation" since numba 0.57; no replacement yet
        warnings.simplefilter("ignore", NumbaPendingDeprecationWarning)
        from numba import from_dtype, types

        pycc: Any = importlib.import_module("numba.pycc")
        compiler: Any = importlib.import_module("numba.pycc.compiler")

    digest = jit.source_digest()
    name = jit.AOT_MODULE.rsplit(".", 1)[1]
    cc = pycc.CC(name, source_module=__name__)
    cc.target_cpu = target_cpu
    for entry, args in jit.ENTRY_POINTS.items():
        module, func = entry.rsplit(".", 1)
        dispatcher: Any = getattr(importlib.import_module(module), func)
        sig = types.void(*[types.Array(from_dtype(np.dtype(d)), nd, "C") for d, nd, _ in args])
        cc.export(jit.export_name(entry), sig)(dispatcher.py_func)

    def source_digest() -> str:
        return digest

    cc.export("source_digest", types.unicode_type())(source_digest)

    # pycc compiles its Python wrappers with default flags, which hold the GIL; the kernels are nogil=True
    # (the pipeline computes a batch in a worker thread while the event loop goes on decoding): release it.
    plain = compiler.Flags

    def nogil_flags(*a: Any, **kw: Any) -> Any:
        flags = plain(*a, **kw)
        flags.release_gil = True
        return flags

    out = jit.HERE / str(cc.output_file)
    with tempfile.TemporaryDirectory(prefix="aot-", dir=jit.HERE) as tmp:
        cc.output_dir = tmp
        compiler.Flags = nogil_flags
        try:
            cc.compile()
        finally:
            compiler.Flags = plain
        os.replace(Path(tmp) / out.name, out)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m gateway.detect.aot", description=__doc__.split("\n\n")[0])
    ap.add_argument("--force", action="store_true", help="build even if the extension is current")
    ap.add_argument("--target-cpu", default="", help="LLVM CPU name (default: the architecture's generic CPU)")
    args = ap.parse_args(argv)
    current = jit.source_digest()
    if not args.force and built_digest() == current:
        print(f"aot: {jit.AOT_MODULE} is current ({current[:12]})")
        return 0
    if jit.MODE != "jit":  # the kernels were loaded from an extension: build in a JIT-mode process
        os.execve(sys.executable, [sys.executable, "-m", "gateway.detect.aot", *sys.argv[1:]],
                  {**os.environ, "FACTORY_GATEWAY_JIT": "1"})
    t0 = time.monotonic()
    out = build(args.target_cpu)
    print(f"aot: built {out.name} ({current[:12]}) in {time.monotonic() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
