"""The ``fastedge`` command.

fastedge run [-c fastedge.toml]           serve a config file
fastedge reverse-proxy --from A --to URL  the one-liner, no config file
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
    return doc


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
            return int(
                server.run(server.serve(config, config_path=args.config, http_override=args.http))
            )
        if args.command == "reverse-proxy":
            config = parse_config(reverse_proxy_config(args), source=None)
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
