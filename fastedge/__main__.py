"""``python -m fastedge`` is the ``fastedge`` command."""

from __future__ import annotations

from fastedge.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
