"""The ``fastedge`` command.

fastedge run [-c fastedge.toml] [--workers N|auto]  serve a config file
fastedge reverse-proxy --from A --to URL [--cache SIZE]  the one-liner, no config file
fastedge check -c FILE                    validate a config (exit 2 on errors)
fastedge demo                             the demo gateway and its services
fastedge --version
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from fastedge import __version__
from fastedge.config import ConfigError, load_config, parse_config

EXIT_CONFIG = 2  # bad config or usage: the same status argparse uses for usage errors


def _workers(value: str) -> int:
    """``--workers``: 1-64, or ``auto`` for one per usable CPU."""
    if value == "auto":
        from fastedge.workers import cpu_count

        return cpu_count()
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or 'auto', got {value!r}") from None
    if not 1 <= number <= 64:
        raise argparse.ArgumentTypeError(f"must be between 1 and 64, got {number}")
    return number


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastedge", description="A self-hosted edge proxy and API gateway."
    )
    parser.add_argument("--version", action="version", version=f"fastedge {__version__}")
    parser.add_argument("--log-level", default="info", help="debug, info, warning, error")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = sub.add_parser("run", help="serve a config file")
    run.add_argument("-c", "--config", default="fastedge.toml", help="TOML config file")
    run.add_argument("--http", choices=["auto", "h11", "fast"], help="override server.http")
    run.add_argument(
        "--workers",
        type=_workers,
        default=None,
        metavar="N",
        help="processes sharing the listener (1-64 or auto); overrides server.workers",
    )

    rp = sub.add_parser("reverse-proxy", help="proxy one address to one or more URLs")
    rp.add_argument("--from", dest="listen", default="127.0.0.1:8080", help="HOST:PORT")
    rp.add_argument(
        "--to", dest="targets", action="append", required=True, help="http(s)://HOST:PORT"
    )
    rp.add_argument("--http", choices=["auto", "h11", "fast"], default="auto")
    rp.add_argument("--admin", default="off", help="admin listener HOST:PORT, or off (the default)")
    rp.add_argument(
        "--access-log", default="off", help="'-' for stdout, a file path, or off (the default)"
    )
    rp.add_argument("--max-connections", type=int, default=None, help="pool size per target")
    rp.add_argument(
        "--cache",
        type=_cache_size,
        default=None,
        metavar="SIZE",
        help="a shared RFC 9111 cache of SIZE (e.g. 256MiB) in front of every target",
    )
    rp.add_argument(
        "--workers", type=_workers, default=1, metavar="N", help="processes (1-64 or auto)"
    )

    check = sub.add_parser("check", help="validate a config file")
    check.add_argument("-c", "--config", default="fastedge.toml")

    demo = sub.add_parser("demo", help="run the demo gateway with its demo services")
    demo.add_argument("--http", choices=["auto", "h11", "fast"], default="auto")
    return parser


def reverse_proxy_config(args: argparse.Namespace) -> dict[str, Any]:
    """The config document the one-liner stands for: every path to the ``--to`` targets,
    round robin, pooled keep-alive."""
    doc: dict[str, Any] = {
        "server": {"listen": args.listen, "http": args.http},
        "upstreams": {"default": {"targets": list(args.targets)}},
        "routes": [{"prefix": "/", "upstream": "default"}],
    }
    doc["server"]["access_log"] = False if args.access_log == "off" else args.access_log
    doc["admin"] = {"enabled": False} if args.admin == "off" else {"listen": args.admin}
    if args.max_connections is not None:
        doc["upstreams"]["default"]["pool"] = {"max_connections": args.max_connections}
    if args.cache is not None:
        # RFC 9111 defaults: only what the origin marks cacheable is stored
        # (docs/cache-and-state.md).
        doc["caches"] = {"default": {"max_bytes": args.cache}}
        doc["routes"][0]["cache"] = "default"
    return doc


def _cache_size(value: str) -> int:
    """``--cache SIZE``: a size with a unit (``256MiB``, ``1GB``), at least 64 KiB."""
    from fastedge.config import parse_size

    try:
        size = parse_size(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if size < 64 * 1024:
        raise argparse.ArgumentTypeError(f"must be at least 64KiB, got {value!r}")
    return size


def _run_workers(args: argparse.Namespace, workers: int, *, config_path: str | None) -> int:
    """``--workers N`` (N > 1): a supervisor and N worker processes (fastedge.workers)."""
    from fastedge.workers import ConfigSnapshot, read_config_file, run_supervisor

    if config_path is not None:
        # Read once more: the supervisor keeps the exact bytes it validated for its workers.
        snapshot, config = read_config_file(config_path)
    else:
        doc = reverse_proxy_config(args)
        snapshot, config = ConfigSnapshot.from_document(doc), parse_config(doc, source=None)
    return run_supervisor(
        snapshot,
        config,
        workers=workers,
        workers_from_cli=args.workers is not None and args.command == "run",
        config_path=config_path,
        http_override=args.http if args.command == "run" else None,
        log_level=args.log_level,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the process exit status."""
    parser = _build_parser()
    args = parser.parse_args(argv)
    from fastedge.observe.logging import setup_logging

    setup_logging(args.log_level)
    if args.command is None:
        parser.print_help()
        return EXIT_CONFIG
    from fastedge import server

    try:
        if args.command == "check":
            config = load_config(args.config)
            print(
                f"{args.config}: ok ({len(config.upstreams)} upstreams, "
                f"{len(config.routes)} routes)"
            )
            return 0
        if args.command == "run":
            config = load_config(args.config)
            workers = args.workers or config.server.workers
            if workers > 1:
                return _run_workers(args, workers, config_path=args.config)
            return int(
                server.run(server.serve(config, config_path=args.config, http_override=args.http))
            )
        if args.command == "reverse-proxy":
            config = parse_config(reverse_proxy_config(args), source=None)
            if args.workers > 1:
                return _run_workers(args, args.workers, config_path=None)
            return int(server.run(server.serve(config)))
        if args.command == "demo":
            from fastedge.demo import run_demo

            return int(server.run(run_demo(http=args.http)))
    except ConfigError as err:
        where = f"{err.source}: " if err.source else ""
        print(f"{where}invalid configuration:", file=sys.stderr)
        for line in err.errors:
            print(f"  {line}", file=sys.stderr)
        return EXIT_CONFIG
    except OSError as err:
        print(f"fastedge: {err}", file=sys.stderr)
        return 1
    parser.error(f"unknown command {args.command!r}")
    return EXIT_CONFIG  # parser.error exits; this line satisfies the type checker
