"""A normal install must run the compiled core; a silent fallback to Python is a bug."""

from __future__ import annotations

import os
import subprocess
import sys

import fastedge.core

COMPONENTS = ("router", "lru", "ratelimit", "hashring", "siphash")


def test_normal_install_uses_the_compiled_core() -> None:
    if os.environ.get("FASTEDGE_NO_EXTENSIONS", "") not in ("", "0"):
        # Asked for Python explicitly: then the Python twins must be what runs.
        assert not fastedge.core.USING_EXTENSIONS
        return
    assert fastedge.core.USING_EXTENSIONS, "compiled core missing: run `make build`"
    for name in (
        "PrefixRouter",
        "LRUCache",
        "TokenBucket",
        "SlidingWindow",
        "HashRing",
        "siphash128",
    ):
        module = getattr(fastedge.core, name).__module__
        assert not module.endswith("_py"), f"{name} comes from {module}"


def test_no_extensions_selects_the_python_twins() -> None:
    code = (
        "import fastedge.core as c; "
        "print(c.USING_EXTENSIONS, sorted({getattr(c, n).__module__ for n in "
        "('PrefixRouter','LRUCache','TokenBucket','SlidingWindow','HashRing',"
        "'siphash128')}))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "FASTEDGE_NO_EXTENSIONS": "1"},
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert out.startswith("False")
    for component in COMPONENTS:
        assert f"fastedge._core.{component}_py" in out


def test_data_path_is_compiled_in_a_normal_build() -> None:
    # The data-path modules are compiled from their .py source (setup.py DATA_PATH); a
    # build that silently skipped them would run ~25% slower per request.
    import importlib

    if os.environ.get("FASTEDGE_NO_EXTENSIONS", "") not in ("", "0"):
        return
    for name in (
        "fastedge.proxy",
        "fastedge.http.fast_engine",
        "fastedge.http.headers",
        "fastedge.upstream.express_view",
    ):
        module = importlib.import_module(name)
        assert str(module.__file__).endswith(".so"), f"{name} is not compiled"


def test_express_lane_scanners_follow_the_build() -> None:
    # The data path's express scanners are not public API (fastedge.core), but the same
    # rule holds: compiled in a normal build, the Python twin when asked for.
    import fastedge._core as core

    expected = (
        "fastedge._core.express_py"
        if os.environ.get("FASTEDGE_NO_EXTENSIONS", "") not in ("", "0")
        else "fastedge._core.express"
    )
    for fn in (core.scan_request, core.scan_response, core.new_request_id):
        assert getattr(fn, "__module__", None) == expected, fn


def test_compiled_proxy_keeps_the_compiled_scanners_when_python_is_asked_for() -> None:
    # A compiled fastedge.proxy is imported whatever FASTEDGE_NO_EXTENSIONS says, and it
    # is typed against the compiled ExpressRequest: it must not pick up the twin then
    # (it did once: every express request failed with a TypeError at run time).
    import fastedge.proxy

    if not str(fastedge.proxy.__file__).endswith(".so"):
        return  # a pure-Python build: the twin is all there is
    code = "import fastedge.proxy as p; print(p.scan_request.__module__)"
    out = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "FASTEDGE_NO_EXTENSIONS": "1"},
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert out == "fastedge._core.express"


def test_own_transports_follow_the_build() -> None:
    """fastedge's epoll transports (no twin: the loop's are the fallback) are there in a
    normal Linux build and never chosen when Python is asked for."""
    code = "import fastedge.transports as t; print(t.edge_available())"
    for env, expected in (({}, "True"), ({"FASTEDGE_NO_EXTENSIONS": "1"}, "False")):
        if not env and os.environ.get("FASTEDGE_NO_EXTENSIONS", "") not in ("", "0"):
            continue
        if not sys.platform.startswith("linux"):
            expected = "False"
        out = subprocess.run(
            [sys.executable, "-c", code],
            env={**os.environ, **env},
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        assert out == expected, env
