"""Command line: `fastcount serve` and `fastcount migrate`, with flags derived from Settings.

Flags override FASTCOUNT_* variables, which override defaults. Before the master starts, this module takes the data
directory (with no DSN: the embedded PostgreSQL, for the life of the service), waits a bounded time for PostgreSQL and
creates the schema. Whatever stops a start is one line on stderr: exit 2 for bad usage, 1 for everything else.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import math
import re
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, NoReturn

import psycopg

from fastcount import __version__
from fastcount.app import APPLICATION, check_database, schema, settings_sections
from fastcount.observability.logs import configure_logging
from fastcount.settings import Settings, knob_fields

log = logging.getLogger("fastcount")

MIGRATE_SETTINGS = ["dsn", "data_dir", "embedded_port", "db_wait", "env_file", "log_level"]
CONNECT_TIMEOUT = 5.0  # seconds one connection attempt may take; libpq rounds below 2 up to 2
WAIT_NOTICE_AFTER = 2.0  # seconds of waiting for PostgreSQL after which the wait is logged once
# What a server says while it cannot take connections yet: worth waiting for. Any other answer it gives (no such
# database, role or password) will not change by waiting.
TRANSIENT_REFUSALS = (
    "starting up",
    "shutting down",
    "recovery mode",
    "not yet accepting connections",
    "too many clients",
    "connection slots are reserved",
)
# What libpq says when something answered that does not speak PostgreSQL's protocol (an HTTP server, say): waiting
# cannot help either.
NOT_POSTGRES = ("invalid response to SSL negotiation", "expected authentication request from server")
CHECK_HINT = (
    "check that PostgreSQL is running there, the host and port, the user and password, and that the database exists"
)


class StartupError(Exception):
    """Stops a start with one line; exit_code 2 means the command line or the configuration is wrong."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line naming the flag, not the whole usage block; --help has the rest.
        self.exit(2, f"fastcount: {message} (see {self.prog} --help)\n")


def _shown_default(spec: dataclasses.Field[Any]) -> str:
    default = spec.default
    if spec.metadata.get("default_text"):
        return str(spec.metadata["default_text"])
    if isinstance(default, bool):
        return "true" if default else "false"
    return str(default) if default != "" else "empty"


def _add_settings_flags(parser: argparse.ArgumentParser, names: list[str] | None = None) -> None:
    # Values stay strings here: Settings.from_sources converts and checks flags, variables and the env file alike,
    # so every message names where the value came from.
    for _, spec in knob_fields(settings_sections()):
        if names is not None and spec.name not in names:
            continue
        text = f"{spec.metadata['help']} (default: {_shown_default(spec)}; env {Settings.env_name(spec.name)})"
        parser.add_argument(
            Settings.flag_name(spec.name),
            dest=spec.name,
            default=None,
            metavar=spec.name.upper(),
            help=text.replace("%", "%%"),
        )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fastcount", description="Exact, durable counting ingestion over HTTP.")
    parser.add_argument("--version", action="version", version=f"fastcount {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="{serve,migrate}")
    serve = commands.add_parser("serve", help="run the HTTP service (master + workers)")
    _add_settings_flags(serve)
    migrate = commands.add_parser("migrate", help="create or update the schema, then exit")
    _add_settings_flags(migrate, MIGRATE_SETTINGS)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    overrides: dict[str, Any] = {k: v for k, v in vars(args).items() if k != "command"}
    try:
        settings = Settings.from_sources(overrides, sections=settings_sections())
    except ValueError as problem:
        return _fail(str(problem), 2)
    configure_logging(settings.log_level, "master")
    try:
        if args.command == "serve":
            _refuse_busy_ports(settings)  # before the database is touched: one line, nothing started
        with _database(settings) as dsn:
            prepare_database(dsn, settings.db_wait)
            if args.command == "migrate":
                return 0
            _refuse_what_the_database_cannot_serve(dsn, settings)
            return _serve(settings, dsn, overrides)
    except StartupError as error:
        return _fail(str(error), error.exit_code)
    except KeyboardInterrupt:
        return 130  # Ctrl-C before the master took over signals: the embedded cluster was stopped on the way out


def _refuse_busy_ports(settings: Settings) -> None:
    from fastcount.server.master import MasterError, refuse_a_port_in_use

    try:
        refuse_a_port_in_use(settings.host, settings.port)
        if settings.admin_port:
            refuse_a_port_in_use(settings.admin_host, settings.admin_port, "admin")
    except MasterError as error:
        raise StartupError(str(error)) from None


def _refuse_what_the_database_cannot_serve(dsn: str, settings: Settings) -> None:
    try:
        problems = asyncio.run(check_database(dsn, settings))
    except psycopg.Error as error:
        raise StartupError(f"cannot check the database {mask_dsn(dsn)}: {_reason(error, dsn)}") from None
    if problems:
        raise StartupError("; ".join(problems), 2)


def _fail(message: str, exit_code: int) -> int:
    print(f"fastcount: {message}", file=sys.stderr, flush=True)
    return exit_code


def _serve(settings: Settings, dsn: str, overrides: dict[str, Any]) -> int:
    from fastcount.server.master import Master, MasterError

    try:
        return Master(settings, dsn, overrides, APPLICATION, settings_sections()).run()
    except MasterError as error:
        log.error("event=master_failed reason=%r", str(error))
        return 1


@contextmanager
def _database(settings: Settings) -> Iterator[str]:
    """The DSN to use: --dsn as given, or the embedded cluster under --data-dir, locked, started and then stopped."""
    if settings.dsn:
        yield settings.dsn
        return
    from fastcount.store.embedded import EmbeddedPostgres, EmbeddedPostgresError

    try:
        embedded = EmbeddedPostgres(settings.data_dir, settings.embedded_port)
        dsn = embedded.start()
    except EmbeddedPostgresError as error:
        raise StartupError(str(error)) from None
    print(f"fastcount: embedded PostgreSQL data in {embedded.pgdata}, DSN {mask_dsn(dsn)}", file=sys.stderr, flush=True)
    try:
        yield dsn
    finally:
        embedded.stop()


def prepare_database(dsn: str, wait: float) -> None:
    """Reach PostgreSQL within `wait` seconds, then create or update the schema, so the first request finds it."""
    from fastcount.store.database import migrate_dsn

    reach_database(dsn, wait)
    try:
        asyncio.run(migrate_dsn(dsn, schema()))
    except psycopg.Error as error:
        raise StartupError(f"cannot create the schema in {mask_dsn(dsn)}: {_reason(error, dsn)}") from None
    log.info("event=migrated dsn=%s", mask_dsn(dsn))


def reach_database(dsn: str, wait: float) -> None:
    """Connect once, retrying for up to `wait` seconds while the server is unreachable or not accepting yet.

    A malformed DSN or a refusal that waiting cannot change (unknown database, role or password) fails at once.
    """
    started = time.monotonic()
    deadline = started + wait
    delay = 0.1
    noticed = False
    while True:
        remaining = deadline - time.monotonic()
        try:
            timeout = max(2, math.ceil(min(CONNECT_TIMEOUT, remaining)))
            psycopg.connect(dsn, connect_timeout=timeout).close()
            return
        except psycopg.ProgrammingError as error:
            reason = _reason(error, dsn)
            raise StartupError(f"{mask_dsn(dsn)} is not a valid PostgreSQL connection string: {reason}", 2) from None
        except psycopg.OperationalError as error:
            reason = _reason(error, dsn)
            refused = "FATAL:" in str(error) and not any(text in str(error) for text in TRANSIENT_REFUSALS)
            not_postgres = any(text in str(error) for text in NOT_POSTGRES)
            if refused or not_postgres or time.monotonic() + delay > deadline:
                # It answered and said no (unknown database, role, password), something else answered, or nothing
                # answered in time.
                if not_postgres:
                    failed = "answered, but not as PostgreSQL (is that the right port?)"
                else:
                    failed = "refused the connection" if refused else f"could not be reached within {wait:g}s"
                raise StartupError(f"PostgreSQL at {mask_dsn(dsn)} {failed}: {reason}; {CHECK_HINT}") from None
            if not noticed and time.monotonic() - started >= WAIT_NOTICE_AFTER:
                log.warning("event=waiting_for_postgres dsn=%s reason=%r up_to=%gs", mask_dsn(dsn), reason, wait)
                noticed = True
        time.sleep(delay)
        delay = min(delay * 2, 1.0)


_URI_USERINFO_PASSWORD = re.compile(r"^(postgres(?:ql)?://[^:@/]*:)([^@/]*)(?=@)")
_URI_QUERY_PASSWORD = re.compile(r"([?&]password=)([^&#]*)")
_KEYWORD_PASSWORD = re.compile(r"(\bpassword\s*=\s*)('(?:[^'\\]|\\.)*'|[^\s']\S*)")


def mask_dsn(dsn: str) -> str:
    """The DSN with its password shown as ***, in URI (user:***@host, ?password=***) and key=value form."""
    if re.match(r"postgres(?:ql)?://", dsn):
        return _URI_QUERY_PASSWORD.sub(r"\1***", _URI_USERINFO_PASSWORD.sub(r"\1***", dsn))
    return _KEYWORD_PASSWORD.sub(r"\1***", dsn)


def _reason(error: Exception, dsn: str) -> str:
    """libpq's message as one line, without the parts the DSN already says, and never with the password."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    reason = lines[0] if lines else type(error).__name__
    reason = reason.removeprefix("connection failed: ").removeprefix("connection is bad: ")
    reason = reason.rpartition(" failed: ")[2].replace("FATAL:", "").strip()
    reason = reason.replace(dsn, mask_dsn(dsn))
    secrets = [m.group(2).strip("'") for pattern in (_URI_USERINFO_PASSWORD, _URI_QUERY_PASSWORD, _KEYWORD_PASSWORD)
               for m in pattern.finditer(dsn)]  # fmt: skip
    for secret in secrets:
        if secret:
            reason = reason.replace(secret, "***")
    return reason
