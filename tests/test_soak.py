"""The soak runner (``bench/soak.py``) for 30 seconds: no errors, no RSS/FD growth."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import ROOT


@pytest.mark.slow
def test_soak_30s() -> None:
    """Mixed load through a real ``fastedge run``; the runner exits 1 on any failed
    request or on >= 10% RSS or descriptor growth after warm-up. Eight connections keep
    a shared 2-core machine usable; ``python -m bench.soak --duration 600`` is the long
    form."""
    result = subprocess.run(
        [sys.executable, "-m", "bench.soak", "--duration", "30", "--connections", "8"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,  # 30 s of load plus start-up and the graceful stops
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "result        ok" in result.stdout
