"""The demo-config soak runner (``bench/soak_demo.py``) for 30 seconds: auth, rate limits
and account checks under load with no unexpected outcome and no RSS/FD growth."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import ROOT


@pytest.mark.slow
def test_soak_demo_30s() -> None:
    """Mixed load (products, token issuance, authorized and refused user reads, pipelined
    pairs, keep-alive churn) through the demo gateway. 429s from the per-user limit and
    401s from the token-less probes are expected; anything else unexpected, or >= 10% RSS
    or descriptor growth after warm-up, makes the runner exit 1. Eight connections keep a
    shared 2-core machine usable; ``python -m bench.soak_demo --duration 600`` is the long
    form."""
    result = subprocess.run(
        [sys.executable, "-m", "bench.soak_demo", "--duration", "30", "--connections", "8"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,  # 30 s of load plus start-up and the graceful stop
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "result        ok" in result.stdout
    assert "errors        0" in result.stdout
