"""The persistence commands of ``stock``: migrate, writer, resync, reconcile, webhooks."""

from __future__ import annotations

import argparse
import asyncio
import sys

from stock.core.config import Settings
from stock.redis.client import connect

COMMANDS = ("migrate", "writer", "resync", "reconcile", "reconcile-payments", "webhooks")


def add_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the persistence subcommands to the ``stock`` parser."""
    commands.add_parser("migrate", help="apply the PostgreSQL schema migrations")
    commands.add_parser("writer", help="drain the event streams into PostgreSQL until SIGTERM")
    resync = commands.add_parser("resync", help="rebuild Redis stock from PostgreSQL")
    resync.add_argument("skus", nargs="*", metavar="SKU", help="default: every SKU")
    resync.add_argument("--dry-run", action="store_true", help="print the diff, change nothing")
    resync.add_argument(
        "--force", action="store_true", help="resync SKUs that have unflushed events too"
    )
    resync.add_argument(
        "--wait",
        type=float,
        default=5.0,
        metavar="S",
        help="how long to wait for the writer to flush a SKU's events before refusing it",
    )
    commands.add_parser("webhooks", help="send the webhook outbox's deliveries until SIGTERM")
    reconcile = commands.add_parser("reconcile", help="compare Redis with PostgreSQL")
    reconcile.add_argument("skus", nargs="*", metavar="SKU", help="default: every SKU")
    payments = commands.add_parser(
        "reconcile-payments", help="compare a payment channel's CSV export with the orders"
    )
    payments.add_argument(
        "file", metavar="FILE", help="CSV with columns order_id, status and optionally time"
    )
    payments.add_argument("--repair", action="store_true", help="confirm or cancel what is off")
    payments.add_argument("--since", metavar="T", help="ISO 8601: sales from T must be in FILE")
    payments.add_argument("--until", metavar="T", help="ISO 8601: sales before T must be in FILE")
    payments.add_argument("--json", action="store_true", help="JSON lines instead of a table")


def run(args: argparse.Namespace, settings: Settings) -> int:
    """Run one persistence command; returns the exit status."""
    if not settings.database_url:
        print("stock: STOCK_DATABASE_URL (or --database-url) is required", file=sys.stderr)
        return 2
    return asyncio.run(_run(args, settings))


async def _run(args: argparse.Namespace, settings: Settings) -> int:
    from persist.migrate import migrate

    if args.command == "migrate":
        applied = await migrate(settings.database_url)
        print(f"migrate: applied {len(applied)} migration(s) {' '.join(applied)}".rstrip())
        return 0
    if args.command == "webhooks":
        await _webhooks(settings)
        return 0
    client = connect(settings)
    try:
        if args.command == "writer":
            await _writer(client, settings)
            return 0
        if args.command == "reconcile-payments":
            return await _reconcile_payments(args, client, settings)
        skus = args.skus or None
        if args.command == "resync":
            from persist.resync import resync

            return await resync(
                client,
                settings,
                settings.database_url,
                skus,
                dry_run=args.dry_run,
                force=args.force,
                wait_s=args.wait,
            )
        from persist.reconcile import reconcile

        return await reconcile(client, settings, settings.database_url, skus)
    finally:
        await client.aclose()


async def _writer(client: object, settings: Settings) -> None:
    from persist.writer import Writer
    from stock.loops.supervise import stop_on_signals, supervise

    stop = stop_on_signals()
    writer = Writer(client, settings, settings.database_url)
    await supervise("writer", lambda: writer.run(stop), stop)


async def _reconcile_payments(args: argparse.Namespace, client: object, settings: Settings) -> int:
    from pathlib import Path

    from persist.payments import parse_time, reconcile_payments
    from stock.core.errors import InvalidRequest
    from stock.orders.engine import StockEngine

    try:
        since = parse_time(args.since) if args.since else None
        until = parse_time(args.until) if args.until else None
        return await reconcile_payments(
            StockEngine(client, settings),
            settings.database_url,
            Path(args.file),
            repair=args.repair,
            since=since,
            until=until,
            as_json=args.json,
        )
    except (InvalidRequest, OSError) as exc:
        print(f"stock reconcile-payments: {exc}", file=sys.stderr)
        return 2


async def _webhooks(settings: Settings) -> None:
    from persist.dispatcher import Dispatcher
    from stock.loops.supervise import stop_on_signals

    await Dispatcher(settings, settings.database_url).run(stop_on_signals())
