"""Every core test runs on both implementations: the compiled module and its Python twin."""

from __future__ import annotations

import importlib
from types import ModuleType

import pytest

IMPLS = ["compiled", "python"]


def load(component: str, impl: str) -> ModuleType:
    """The module of ``component`` (``router``, ``lru``, ``ratelimit``, ``hashring``) for
    ``impl``. A missing compiled module is an error, never a silent skip."""
    suffix = "" if impl == "compiled" else "_py"
    return importlib.import_module(f"fastedge._core.{component}{suffix}")


@pytest.fixture(params=IMPLS)
def impl(request: pytest.FixtureRequest) -> str:
    """``"compiled"`` or ``"python"``; tests call :func:`load` with it."""
    return str(request.param)
