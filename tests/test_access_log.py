"""Access log lines are valid JSON; buffering, flushing and process logging setup."""

from __future__ import annotations

import asyncio
import logging
import re
from pathlib import Path

import orjson
import pytest

from fastedge.observe.logging import AccessLog, setup_logging, utc_timestamp


def _record(i: int) -> dict[str, object]:
    return {
        "ts": utc_timestamp(),
        "request_id": f"r{i}",
        "client": "127.0.0.1:5000",
        "method": "GET",
        "path": '/api/users/"quoted"\n',
        "route": "/api/users",
        "upstream": "users",
        "target": "127.0.0.1:9001",
        "status": 200,
        "bytes_in": 0,
        "bytes_out": 12,
        "duration_ms": 1.25,
        "upstream_ms": None,
        "error": ValueError("not JSON-native"),
    }


def test_lines_are_json_in_a_file(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    log = AccessLog(str(path))
    assert log.enabled
    for i in range(3):
        log.log(_record(i))
    log.close()
    lines = path.read_bytes().splitlines()
    assert len(lines) == 3
    records = [orjson.loads(line) for line in lines]
    assert [r["request_id"] for r in records] == ["r0", "r1", "r2"]
    assert records[0]["path"] == '/api/users/"quoted"\n'
    assert records[0]["error"] == "not JSON-native"
    assert records[0]["upstream_ms"] is None
    log.log(_record(9))  # after close: ignored, no error
    assert len(path.read_bytes().splitlines()) == 3


def test_appends_to_existing_file(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    path.write_bytes(b'{"old":1}\n')
    log = AccessLog(str(path))
    log.log({"new": 2})
    log.close()
    assert [orjson.loads(x) for x in path.read_bytes().splitlines()] == [{"old": 1}, {"new": 2}]


async def test_buffered_in_loop_until_flush(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    # A long interval: the timer must not fire during the test, so buffering is visible.
    log = AccessLog(str(path), flush_interval=3600)
    log.log({"a": 1})
    assert path.read_bytes() == b""  # still in the buffer: no write per request
    log.flush()
    assert orjson.loads(path.read_bytes()) == {"a": 1}
    log.close()


async def test_timer_flushes(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    log = AccessLog(str(path), flush_interval=0)
    log.log({"a": 1})
    # A zero interval fires on the next loop iterations; wait for it by polling the loop,
    # not the clock.
    for _ in range(10):
        if path.read_bytes():
            break
        await asyncio.sleep(0)
    assert orjson.loads(path.read_bytes()) == {"a": 1}
    log.close()


def test_reopen_after_rotation(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    log = AccessLog(str(path))
    log.log({"n": 1})
    path.rename(tmp_path / "access.log.1")
    log.reopen()
    log.log({"n": 2})
    log.close()
    assert orjson.loads((tmp_path / "access.log.1").read_bytes()) == {"n": 1}
    assert orjson.loads(path.read_bytes()) == {"n": 2}


def test_stdout_target(capfdbinary: pytest.CaptureFixture[bytes]) -> None:
    log = AccessLog("-")
    log.log({"status": 200})
    log.close()
    assert orjson.loads(capfdbinary.readouterr().out) == {"status": 200}


def test_disabled() -> None:
    log = AccessLog(None)
    assert not log.enabled
    log.log({"a": 1})
    log.flush()
    log.close()


def test_utc_timestamp_is_rfc3339() -> None:
    assert utc_timestamp(0) == "1970-01-01T00:00:00.000Z"
    assert utc_timestamp(1_700_000_000.25) == "2023-11-14T22:13:20.250Z"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", utc_timestamp())


def test_setup_logging(capfd: pytest.CaptureFixture[str]) -> None:
    root = logging.getLogger()
    before = list(root.handlers)
    level = root.level
    try:
        setup_logging("debug")
        setup_logging("warning")  # replaces, does not stack
        added = [h for h in root.handlers if h not in before]
        assert len(added) == 1
        logging.getLogger("fastedge.test").warning("hello %s", "there")
        logging.getLogger("fastedge.test").info("hidden")
        err = capfd.readouterr().err
        assert re.search(r"^\S+Z WARNING fastedge\.test: hello there$", err, re.M)
        assert "hidden" not in err
        with pytest.raises(ValueError, match="unknown log level"):
            setup_logging("loud")
    finally:
        for handler in root.handlers:
            if handler not in before:
                root.removeHandler(handler)
        root.setLevel(level)
