"""Command line: `fastcount serve` and `fastcount migrate`, with flags derived from Settings.

Flags override FASTCOUNT_* variables, which override defaults. With no DSN, `serve` runs the embedded PostgreSQL for
the life of the service; this module wires that up and hands over to the master.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from typing import Any

from fastcount.app import APPLICATION, schema, settings_sections
from fastcount.observability.logs import configure_logging
from fastcount.settings import Settings, knob_fields, parse_bool

log = logging.getLogger("fastcount")


def _add_settings_flags(parser: argparse.ArgumentParser, names: list[str] | None = None) -> None:
    for _, spec in knob_fields(settings_sections()):
        if names is not None and spec.name not in names:
            continue
        default = spec.default
        parser.add_argument(
            "--" + spec.name.replace("_", "-"),
            dest=spec.name,
            type=parse_bool if isinstance(default, bool) else type(default),
            default=None,
            metavar=spec.name.upper(),
            help=f"{spec.metadata['help']} (default: {default!r}; env {Settings.env_name(spec.name)})",
        )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastcount", description="Exact, durable counting ingestion over HTTP.")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the HTTP service (master + workers)")
    _add_settings_flags(serve)
    migrate = commands.add_parser("migrate", help="create or update the schema, then exit")
    _add_settings_flags(migrate, ["dsn", "data_dir", "log_level"])
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    overrides: dict[str, Any] = {k: v for k, v in vars(args).items() if k != "command"}
    try:
        settings = Settings.from_sources(overrides, sections=settings_sections())
    except ValueError as problem:
        print(f"fastcount: {problem}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level, "master")
    if args.command == "migrate":
        return _with_database(settings, lambda dsn: _migrate(dsn))
    return _with_database(settings, lambda dsn: _serve(settings, dsn, overrides))


def _migrate(dsn: str) -> int:
    from fastcount.store.database import migrate_dsn

    asyncio.run(migrate_dsn(dsn, schema()))
    log.info("event=migrated")
    return 0


def _serve(settings: Settings, dsn: str, overrides: dict[str, Any]) -> int:
    from fastcount.server.master import Master, MasterError

    try:
        return Master(settings, dsn, overrides, APPLICATION, settings_sections()).run()
    except MasterError as error:
        log.error("event=master_failed reason=%r", str(error))
        return 1


def _with_database(settings: Settings, action: Any) -> int:
    if settings.dsn:
        return int(action(settings.dsn))
    from fastcount.store.embedded import EmbeddedPostgres, EmbeddedPostgresError

    try:
        embedded = EmbeddedPostgres(settings.data_dir)
        dsn = embedded.start()
    except EmbeddedPostgresError as error:
        log.error("event=embedded_postgres_failed reason=%r", str(error))
        return 1
    print(f"fastcount: embedded PostgreSQL data in {embedded.pgdata}, DSN {dsn}", file=sys.stderr, flush=True)
    try:
        return int(action(dsn))
    finally:
        embedded.stop()
