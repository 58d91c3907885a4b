"""The admin dashboard in a real headless browser (Debian's chromium + chromedriver, driven
by Selenium) in front of a real proxy with two origin processes behind a blue/green split.

What it proves: the page needs the token and swaps it for a session cookie; the numbers
and charts are live (they move while requests flow); upstreams, routes and traces show;
moving the blue/green slider really moves the proxy's traffic (checked through the proxy by
which origin answers, ``X-Origin-Port``); a flag's rollout can be set from the page; and a
page on another origin cannot use the session cookie to change anything (CSRF).

The proxy runs on its own event loop in a background thread, because Selenium's calls
block and the proxy must keep serving while the browser waits.
"""

from __future__ import annotations

import asyncio
import http.client
import http.server
import json
import shutil
import threading
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import pytest
import uvloop
from selenium import webdriver
from selenium.common.exceptions import TimeoutException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait

from fastedge.config import parse_config
from fastedge.server import ProxyServer
from tests.conftest import call_sync, start_origin, stop_origin

TOKEN = "dashboard-browser-test-token"
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
WAIT = 20  # seconds: upper bound for anything the page must show (normally 1-3 s)

T = TypeVar("T")


# --- a proxy on a background loop ---------------------------------------------------------


class ProxyThread:
    """A :class:`ProxyServer` on its own uvloop in a daemon thread."""

    def __init__(self, config_doc: dict[str, Any]) -> None:
        self.loop = uvloop.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

        async def start() -> ProxyServer:
            server = ProxyServer(parse_config(config_doc), admin_token=TOKEN)
            await server.start()
            return server

        self.server = self.run(start())

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=30)

    def close(self) -> None:
        try:
            self.run(self.server.shutdown(drain_timeout=1))
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout=10)
            self.loop.close()


def admin_json(stack: Stack, path: str) -> tuple[int, Any]:
    status, _, body = call_sync(stack.admin_port, "GET", path, {"Authorization": f"Bearer {TOKEN}"})
    return status, json.loads(body)


@dataclass
class Stack:
    proxy: ProxyThread
    port: int
    admin_port: int
    blue: int  # origin ports
    green: int

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}/"

    def answering_ports(self, n: int, headers: dict[str, str] | None = None) -> set[int]:
        """Which origins answered ``n`` requests to the split route."""
        ports = set()
        for _ in range(n):
            status, resp_headers, _ = call_sync(self.port, "GET", "/api/products/item", headers)
            assert status == 200
            ports.add(int(resp_headers["x-origin-port"]))
        return ports


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    blue_proc, blue = start_origin()
    green_proc, green = start_origin()
    proxy: ProxyThread | None = None
    try:
        proxy = ProxyThread(
            {
                "server": {"listen": "127.0.0.1:0", "access_log": False},
                "admin": {"listen": "127.0.0.1:0"},
                "upstreams": {
                    "products-blue": {"targets": [f"http://127.0.0.1:{blue}"]},
                    "products-green": {"targets": [f"http://127.0.0.1:{green}"]},
                },
                "traffic": {
                    "products": {
                        "versions": {"blue": "products-blue", "green": "products-green"},
                        "weights": {"blue": 100, "green": 0},
                    }
                },
                "flags": {"beta": {"percent": 10, "user": "header:X-User-Id", "header": "X-Beta"}},
                "traffic_state": {"file": False},
                "tracing": {"sample_ratio": 1.0, "memory_spans": 500},
                "routes": [
                    {
                        "prefix": "/api/products",
                        "upstream": "products-blue",
                        "strip_prefix": True,
                        "traffic": "products",
                        "flags": ["beta"],
                    },
                    {"prefix": "/", "upstream": "products-blue"},
                ],
            }
        )
        admin_port = proxy.server.admin_port
        assert admin_port is not None
        yield Stack(proxy, proxy.server.port, admin_port, blue, green)
    finally:
        if proxy is not None:
            proxy.close()
        stop_origin(blue_proc)
        stop_origin(green_proc)


# --- the browser ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser() -> Iterator[WebDriver]:
    for binary in (CHROMIUM, CHROMEDRIVER):
        if shutil.which(binary) is None:
            raise RuntimeError(
                f"{binary} is missing: install Debian's chromium and chromium-driver "
                "(.ci/run installs them)"
            )
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in (
        "--headless=new",
        "--no-sandbox",  # tests run as root in CI
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1280,2400",
        # Nothing but the loopback servers of the test: no update checks, sync, telemetry.
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-default-apps",
        "--disable-extensions",
        "--disable-sync",
        "--no-first-run",
    ):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    try:
        yield driver
    finally:
        driver.quit()


def wait_for(driver: WebDriver, what: str, check: Callable[[], T | None]) -> T:
    """Poll ``check`` (bounded by WAIT) until it returns something truthy."""
    try:
        return WebDriverWait(driver, WAIT, poll_frequency=0.1).until(lambda _: check())
    except TimeoutException:
        raise AssertionError(f"timed out waiting for {what}") from None


def text_of(driver: WebDriver, css: str) -> str:
    return str(driver.find_element(By.CSS_SELECTOR, css).text)


def number(text: str) -> float | None:
    try:
        return float(text.replace(",", "").split()[0])
    except (ValueError, IndexError):
        return None


class Load:
    """Background requests through the proxy while the page is watched."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.stop = threading.Event()
        self.sent = 0
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            while not self.stop.is_set():
                conn.request("GET", "/api/products/load")
                conn.getresponse().read()
                self.sent += 1
                self.stop.wait(0.01)  # ~100 requests/s: visible, and light on 2 cores
        finally:
            conn.close()

    def __enter__(self) -> Load:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(timeout=15)


# --- the tests ------------------------------------------------------------------------------


def test_dashboard_live_numbers_and_blue_green_control(stack: Stack, browser: WebDriver) -> None:
    driver = browser
    assert stack.answering_ports(10) == {stack.blue}  # the config: 100% blue

    with Load(stack.port):
        driver.get(f"{stack.dashboard}?token={TOKEN}")
        # The token leaves the address bar at once; the session cookie replaces it.
        wait_for(
            driver, "the token to leave the URL", lambda: driver.current_url == stack.dashboard
        )
        cookie = driver.get_cookie("fastedge_admin")
        assert cookie is not None
        assert cookie["httpOnly"] is True and cookie["sameSite"] == "Strict"
        assert TOKEN not in cookie["value"]

        # Live numbers: the request counter keeps moving while the load runs, and the
        # rate card and chart show real traffic.
        first = wait_for(driver, "a request total", lambda: number(text_of(driver, "#total")))
        wait_for(
            driver,
            "the request total to grow",
            lambda: (n := number(text_of(driver, "#total"))) is not None and n > first,
        )
        wait_for(driver, "a non-zero rate", lambda: (number(text_of(driver, "#rps")) or 0) > 0)
        wait_for(driver, "a p99 latency", lambda: text_of(driver, "#p99").endswith("ms"))
        samples = int(
            driver.find_element(By.CSS_SELECTOR, "#chart-rate").get_attribute("data-points") or 0
        )
        wait_for(
            driver,
            "the rate chart to gain points",
            lambda: (
                int(
                    driver.find_element(By.CSS_SELECTOR, "#chart-rate").get_attribute("data-points")
                    or 0
                )
                > samples
            ),
        )
        assert driver.find_elements(By.CSS_SELECTOR, "#chart-rate polyline.rate")
        assert driver.find_elements(By.CSS_SELECTOR, "#chart-latency polyline.p99")

    # Routes and recent traces.
    wait_for(driver, "the routes table", lambda: "/api/products" in text_of(driver, "#routes"))
    wait_for(
        driver,
        "traces of the load",
        lambda: driver.find_elements(By.CSS_SELECTOR, "#traces tr[data-trace]"),
    )
    assert "GET" in text_of(driver, "#traces")

    # Upstreams: every target with its state, or a clear "not configured".
    status, data = admin_json(stack, "/upstreams")
    if status == 404:
        wait_for(driver, "the upstreams notice", lambda: "not" in text_of(driver, "#upstreams"))
    else:
        assert status == 200
        for port in (stack.blue, stack.green):
            wait_for(
                driver,
                f"target {port} in the upstreams table",
                lambda port=port: f"127.0.0.1:{port}" in text_of(driver, "#upstreams"),
            )
        assert "healthy" in text_of(driver, "#upstreams")

    # The blue/green slider: all the way to green (End key), released = applied.
    slider = wait_for(
        driver,
        "the products slider",
        lambda: driver.find_elements(By.CSS_SELECTOR, 'input.split-range[data-split="products"]'),
    )[0]
    assert slider.get_attribute("value") == "0"
    slider.send_keys(Keys.END)
    status_css = '.split[data-split="products"] .save-status'
    wait_for(
        driver, "the split to be saved", lambda: text_of(driver, status_css).startswith("saved")
    )
    status, data = admin_json(stack, "/traffic")
    assert status == 200
    (split,) = [s for s in data["splits"] if s["name"] == "products"]
    assert split["weights"] == {"blue": 0, "green": 100}
    assert stack.answering_ports(20) == {stack.green}  # the proxy really moved

    # And back with the number inputs and the Apply button.
    inputs = {
        e.get_attribute("data-version"): e
        for e in driver.find_elements(By.CSS_SELECTOR, '.split[data-split="products"] input.weight')
    }
    for version, weight in (("blue", "100"), ("green", "0")):
        inputs[version].clear()
        inputs[version].send_keys(weight)
    driver.find_element(By.CSS_SELECTOR, '.split[data-split="products"] button.apply').click()
    wait_for(
        driver,
        "the slider to follow the saved split",
        lambda: (
            driver.find_element(
                By.CSS_SELECTOR, 'input.split-range[data-split="products"]'
            ).get_attribute("value")
            == "0"
        ),
    )
    assert stack.answering_ports(20) == {stack.blue}

    # A flag's rollout from the page.
    percent = wait_for(
        driver,
        "the beta flag",
        lambda: driver.find_elements(By.CSS_SELECTOR, 'input.flag-percent[data-flag="beta"]'),
    )[0]
    assert percent.get_attribute("value") == "10"
    percent.clear()
    percent.send_keys("100")
    driver.find_element(By.CSS_SELECTOR, 'tr[data-flag="beta"] button.apply').click()
    wait_for(
        driver,
        "the flag to be saved",
        lambda: text_of(driver, 'tr[data-flag="beta"] .save-status').startswith("saved"),
    )
    status, data = admin_json(stack, "/flags")
    (flag,) = [f for f in data["flags"] if f["name"] == "beta"]
    assert flag["percent"] == 100
    status, _, body = call_sync(stack.port, "GET", "/api/products/echo", {"X-User-Id": "anyone"})
    assert status == 200
    echoed = {name.lower(): value for name, value in json.loads(body)["headers"]}
    assert "x-beta" in echoed  # every user is in at 100%: the upstream is told


ATTACK_PAGE = """<!doctype html>
<html><body>
<form id="f" method="POST" action="{target}" enctype="text/plain">
<input type="hidden" name='{{"blue": 0, "green": 100, "x": "' value='"}}'>
</form>
<script>
  // What any other origin can try with the victim's browser: a fetch with the cookie
  // (blocked by CORS, since PUT needs a preflight nobody grants) ...
  window.fetchResult = "pending";
  fetch("{target}", {{method: "PUT", credentials: "include",
                      headers: {{"Content-Type": "application/json"}},
                      body: JSON.stringify({{blue: 0, green: 100}})}})
    .then(r => {{ window.fetchResult = "status " + r.status; }})
    .catch(e => {{ window.fetchResult = "blocked: " + e.name; }});
</script>
</body></html>
"""


class AttackerSite:
    """A page on another origin (another port of 127.0.0.1: same *site*, so even a
    SameSite=Strict cookie is attached to its requests; only the CSRF rule stops them)."""

    def __init__(self, target: str) -> None:
        page = ATTACK_PAGE.format(target=target).encode()

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "text/html")
                self.send_header("Content-Length", str(len(page)))
                self.end_headers()
                self.wfile.write(page)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=10)


def test_dashboard_refuses_without_token_and_cross_site_changes(
    stack: Stack, browser: WebDriver
) -> None:
    driver = browser
    driver.get(f"{stack.dashboard}?token={TOKEN}")
    wait_for(driver, "the session", lambda: driver.get_cookie("fastedge_admin"))
    cookie = driver.get_cookie("fastedge_admin")
    assert cookie is not None
    _, before = admin_json(stack, "/traffic")
    target = f"http://127.0.0.1:{stack.admin_port}/traffic/products"

    # The cookie alone, as a forged request would carry it: refused, split unchanged.
    status, _, body = call_sync(
        stack.admin_port,
        "PUT",
        "/traffic/products",
        {"Cookie": f"fastedge_admin={cookie['value']}", "Content-Type": "application/json"},
        b'{"blue": 0, "green": 100}',
    )
    assert status == 403 and b"CSRF" in body

    # The same from a real page on another origin, in the browser that holds the cookie.
    attacker = AttackerSite(target)
    try:
        driver.get(f"http://127.0.0.1:{attacker.port}/")
        result = wait_for(
            driver,
            "the cross-origin fetch to settle",
            lambda: (r := driver.execute_script("return window.fetchResult")) != "pending" and r,
        )
        assert str(result).startswith("blocked"), result
        # A form POST needs no preflight and the browser attaches the cookie; the admin
        # server refuses it for the missing CSRF header (403), not for a missing login.
        driver.execute_script("document.getElementById('f').submit()")
        wait_for(driver, "the form answer", lambda: "status" in driver.page_source)
        answer = json.loads(driver.find_element(By.TAG_NAME, "body").text)
        assert answer["status"] == 403 and "CSRF" in answer["error"]
    finally:
        attacker.close()
    _, after = admin_json(stack, "/traffic")
    assert after == before

    # Without the cookie (or the token) the page itself is refused.
    driver.delete_all_cookies()
    driver.get(stack.dashboard)
    answer = json.loads(driver.find_element(By.TAG_NAME, "body").text)
    assert answer["status"] == 401 and answer["error"] == "missing or invalid admin token"
    driver.get(f"{stack.dashboard}?token=wrong-{TOKEN}")
    assert json.loads(driver.find_element(By.TAG_NAME, "body").text)["status"] == 401
    assert driver.get_cookie("fastedge_admin") is None
