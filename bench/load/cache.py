"""The cache-hit scenario of ``make bench-load``: fastedge's edge cache against nginx's
``proxy_cache``, both answering the same object from storage.

* The upstream nginx serves ``/cached``: the small body with
  ``Cache-Control: max-age=3600``, so both caches store it on the first request and
  answer every later one themselves (the warm-up run fills them).
* ``nginx-cache``: the benchmark's nginx proxy plus ``proxy_cache`` (a ``keys_zone``, the
  entry in a file under the run's temporary directory: nginx's normal setup; after the
  first read the file is in the page cache). It honours the upstream's ``max-age`` by
  default.
* ``fastedge-cache``: ``fastedge reverse-proxy --cache 64MiB`` (the RFC 9111 defaults).

Both run only this scenario (``ProxySpec.scenarios``); the ratio that matters is
:data:`COMPARISONS`' ``fastedge-cache`` / ``nginx-cache`` in the same round.
"""

from __future__ import annotations

from pathlib import Path

from bench.load.variants import Comparison, reverse_proxy_command

CACHED_PATH = "/cached"
SCENARIO = "cache-hit"
CACHE_CONTROL = "max-age=3600"  # fresh for the whole run: every request is a hit

COMPARISONS: tuple[Comparison, ...] = (
    Comparison("cache hits vs nginx proxy_cache hits", "fastedge-cache", "nginx-cache", SCENARIO),
)


def upstream_location(small_body_nginx: str) -> str:
    """The origin's ``/cached`` location (inside its ``server`` block)."""
    return f"""        location = {CACHED_PATH} {{
            default_type text/plain;
            add_header Cache-Control "{CACHE_CONTROL}";
            return 200 "{small_body_nginx}";
        }}
"""


def nginx_cache_command(
    workdir: Path, port: int, upstream_port: int, tools: dict[str, str]
) -> list[str]:
    """nginx as the benchmark's reverse proxy with ``proxy_cache`` on."""
    from bench.load.run import nginx_command, proxy_nginx_conf  # run imports this module

    conf = proxy_nginx_conf(
        workdir,
        port,
        upstream_port,
        http_extra=(
            f"    proxy_cache_path {workdir}/cache levels=1:2 keys_zone=bench:10m max_size=64m\n"
            "                     inactive=10m use_temp_path=off;\n"
        ),
        location_extra=(
            "            proxy_cache bench;\n"
            "            add_header Cache-Status $upstream_cache_status;\n"
        ),
    )
    return nginx_command(workdir, conf, tools["nginx"])


def fastedge_cache_command(
    workdir: Path, port: int, upstream_port: int, tools: dict[str, str]
) -> list[str]:
    """``fastedge reverse-proxy --cache 64MiB``."""
    return reverse_proxy_command(port, upstream_port, "--cache", "64MiB")
