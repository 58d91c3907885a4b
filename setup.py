"""Build of the compiled core (``fastedge/_core/*.pyx``) and nothing else.

All metadata lives in ``pyproject.toml``. This file exists only because the Cython
extension build needs code:

* ``FASTEDGE_NO_EXTENSIONS=1`` builds a pure-Python package (the ``*_py.py`` twins serve).
* ``FASTEDGE_CYTHON_TRACE=1`` builds with line tracing for coverage and profiling.
* Otherwise every ``.pyx`` is compiled; a missing C compiler or Cython is a hard error,
  so a slow package is never shipped by surprise.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from setuptools import Extension, setup

HERE = Path(__file__).parent
CORE = HERE / "fastedge" / "_core"
# Data-path modules compiled from their Python source (Cython's pure-Python mode, with the
# .pxd beside each declaring the hot classes as C structs). The .py file stays the
# readable source and is what runs in a FASTEDGE_NO_EXTENSIONS build.
DATA_PATH = [
    "fastedge/proxy.py",
    "fastedge/http/fast_engine.py",
    "fastedge/http/headers.py",
    "fastedge/upstream/pool.py",
    "fastedge/upstream/balancer.py",
    # A resilient upstream's per-request bookkeeping (the express lane calls it).
    "fastedge/upstream/balancers.py",
    "fastedge/upstream/breaker.py",
    "fastedge/upstream/health.py",
    "fastedge/upstream/retry.py",
    "fastedge/upstream/resilient_tier.py",
    "fastedge/upstream/express_view.py",
    "fastedge/router.py",
    "fastedge/observe/metrics.py",
    # The edge cache's hit path (the express lane answers fresh hits through it).
    "fastedge/filters/cache.py",
    "fastedge/cache/store.py",
    "fastedge/cache/policy.py",
    "fastedge/cache/edge.py",
    # Policy filters on the express lane (auth from its cache, a local limit, tracing ids).
    "fastedge/filters/express.py",
    "fastedge/filters/auth.py",
    "fastedge/filters/ratelimit.py",
    "fastedge/observe/tracecontext.py",
    "fastedge/observe/tracing.py",
]
NO_EXTENSIONS = os.environ.get("FASTEDGE_NO_EXTENSIONS", "") not in ("", "0")
TRACE = os.environ.get("FASTEDGE_CYTHON_TRACE", "") not in ("", "0")


def _extensions() -> list[Extension]:
    if NO_EXTENSIONS:
        print("fastedge: FASTEDGE_NO_EXTENSIONS set, building the pure-Python core", file=sys.stderr)
        return []
    from Cython.Build import cythonize  # a hard requirement of the compiled build

    directives = {
        "language_level": "3",
        # Indexing in the core is proven in range by construction; see each .pyx.
        "boundscheck": False,
        "wraparound": False,
        "cdivision": True,
        "embedsignature": True,
    }
    macros: list[tuple[str, str | None]] = []
    if TRACE:
        directives.update({"linetrace": True, "profile": True})
        macros += [("CYTHON_TRACE", "1"), ("CYTHON_TRACE_NOGIL", "1")]
    exts = [
        Extension(
            f"fastedge._core.{pyx.stem}",
            [str(pyx.relative_to(HERE))],
            define_macros=macros,
            extra_compile_args=["-O3"],
        )
        for pyx in sorted(CORE.glob("*.pyx"))
    ]
    # The data path is ordinary Python (negative indexes, unchecked lengths), so it keeps
    # Python's indexing semantics; only the hand-written core turns those checks off.
    data_path = [
        Extension(
            path[:-3].replace("/", "."),
            [path],
            define_macros=macros,
            # Cython's generic comparison helpers trip gcc 12's -Warray-bounds on
            # Py_None (a false positive); the warnings only bury real ones.
            extra_compile_args=["-O3", "-Wno-array-bounds"],
        )
        for path in DATA_PATH
    ]
    names = ", ".join(e.name.rsplit(".", 1)[1] for e in exts + data_path)
    print(f"fastedge: building the compiled core ({names})", file=sys.stderr)
    safe = {**directives, "boundscheck": True, "wraparound": True, "cdivision": False}
    return [
        *cythonize(exts, compiler_directives=directives, quiet=True),
        *cythonize(data_path, compiler_directives=safe, quiet=True),
    ]


setup(ext_modules=_extensions())
