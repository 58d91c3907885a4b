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
    names = ", ".join(e.name.rsplit(".", 1)[1] for e in exts)
    print(f"fastedge: building the compiled core ({names})", file=sys.stderr)
    return cythonize(exts, compiler_directives=directives, quiet=True)


setup(ext_modules=_extensions())
