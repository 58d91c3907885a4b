"""fastedge: a self-hosted edge proxy and API gateway with a compiled core."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
