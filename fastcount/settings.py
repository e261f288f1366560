"""Every knob of fastcount in one frozen dataclass.

Each field carries its default, its FASTCOUNT_* environment variable, its command-line help and its check, so the
CLI, the env example and the README all derive from this one table. This module reads the environment; it does not
parse argv (cli.py does).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

ENV_PREFIX = "FASTCOUNT_"
SectionT = TypeVar("SectionT")


def knob(
    default: Any,
    help: str,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    default_text: str | None = None,
    restart: bool = False,
) -> Any:
    """A setting: its default, its help line and its checks; features declare theirs with it too.
    default_text: how --help and the docs show a default that depends on the machine. restart: a reload keeps the
    value the master started with (the sockets, slots and database it holds for its whole life; a feature's own)."""
    metadata = {"help": help, "minimum": minimum, "maximum": maximum, "default_text": default_text, "restart": restart}
    return field(default=default, metadata=metadata)


_knob = knob


@dataclass(frozen=True)
class Settings:
    host: str = _knob("0.0.0.0", "address to listen on", restart=True)
    port: int = _knob(3333, "TCP port of the API", minimum=0, maximum=65535, restart=True)
    # At most 256: each worker holds several PostgreSQL connections (one per flush lane, a read pool, jobs), so a
    # mistyped count (1000 on a 2-core box) would exhaust the database and the machine rather than serve.
    workers: int = _knob(
        os.cpu_count() or 1, "worker processes", minimum=1, maximum=256, default_text="number of CPUs", restart=True
    )
    dsn: str = _knob(
        "", "PostgreSQL connection string; empty starts the embedded PostgreSQL under --data-dir", restart=True
    )
    db_wait: float = _knob(10.0, "seconds to keep trying to reach PostgreSQL at start before giving up", minimum=0)
    data_dir: str = _knob(
        "./.fastcount", "directory of the embedded PostgreSQL cluster (used when --dsn is empty)", restart=True
    )
    embedded_port: int = _knob(
        0,
        "TCP port of the embedded PostgreSQL on 127.0.0.1 (used when --dsn is empty); 0: a free one, remembered"
        " under --data-dir",
        minimum=0,
        maximum=65535,
        restart=True,
    )
    flush_interval: float = _knob(1.0, "seconds between flushes of each worker's pending counts", minimum=0.01)
    flush_max_keys: int = _knob(
        50_000,
        "distinct pending keys that trigger an early flush; verve: one flush transaction writes at most twice this"
        " many ids and endpoints (a larger batch is committed in parts)",
        minimum=1,
    )
    max_pending_keys: int = _knob(
        1_000_000,
        "pending keys per worker (unflushed + in retry) past which a key not already pending gets 503 (keys of a"
        " batch in retry are no longer pending)",
        minimum=1,
    )
    crash_journal_mb: int = _knob(
        32,
        "MiB per crash-journal region (3 per worker, memory used as filled); 0 turns the journal off",
        minimum=0,
        maximum=2047,  # a record's 4-byte length keeps its top bit for a mark (fastcount/store/journal.py, rule 3)
    )
    max_body: int = _knob(65_536, "largest request body in bytes; larger gets 413", minimum=1)
    max_header_bytes: int = _knob(8_192, "largest request line + header section in bytes; larger gets 431", minimum=256)
    keepalive_timeout: float = _knob(5.0, "seconds an idle keep-alive connection is kept open", minimum=1)
    read_timeout: float = _knob(10.0, "seconds a client may take to send one request's headers and body", minimum=1)
    graceful_timeout: float = _knob(30.0, "seconds the master waits for workers to stop, then kills", minimum=0)
    backlog: int = _knob(
        4096, "listen backlog of each worker socket (capped by net.core.somaxconn)", minimum=1, restart=True
    )
    max_connections: int = _knob(
        0,
        "client connections per worker; at the cap it stops accepting and new ones wait in the listen backlog; "
        "0: the descriptor limit (RLIMIT_NOFILE) minus 64 kept for PostgreSQL, the journal and the status pipe",
        minimum=0,
    )
    reuse_port: bool = _knob(
        True, "one SO_REUSEPORT socket per worker (false: one socket shared by all workers)", restart=True
    )
    tcp_nodelay: bool = _knob(True, "TCP_NODELAY on client connections (answers leave at once)")
    tcp_defer_accept: int = _knob(
        0, "TCP_DEFER_ACCEPT seconds: wake a worker only once a client sent data", minimum=0, restart=True
    )
    admin_host: str = _knob("127.0.0.1", "address of the admin listener (GET /metrics)", restart=True)
    admin_port: int = _knob(
        3334,
        "port of the admin listener serving Prometheus metrics; 0 turns it off",
        minimum=0,
        maximum=65535,
        restart=True,
    )
    env_file: str = _knob("", "file of FASTCOUNT_*=value lines, read at start (serve: and again on every SIGHUP)")
    log_level: str = _knob("info", "debug, info, warning or error")
    flush_timeout: float = _knob(
        30.0, "seconds one flush transaction may take (statement timeout; the batch is then retried)", minimum=1
    )
    query_timeout: float = _knob(
        30.0,
        "seconds one read of the API may take in PostgreSQL (GET /metrics, GET /counters/<key>); 503 past it",
        minimum=0.1,
    )
    # The features' own settings by name (see `section`); not a knob itself.
    sections: dict[str, Any] = field(default_factory=dict, compare=False, metadata={"internal": True})

    def __post_init__(self) -> None:
        check_knobs(self)
        if self.log_level.lower() not in ("debug", "info", "warning", "error"):
            raise SettingError(
                f"{{0}} must be debug, info, warning or error, got {braced(repr(self.log_level))}", "log_level"
            )
        if self.port and self.port == self.admin_port:
            raise SettingError(f"{{0}} and {{1}} must differ, both are {self.port}", "port", "admin_port")
        embedded_port = 0 if self.dsn else self.embedded_port  # with --dsn no embedded PostgreSQL takes it
        if 0 < embedded_port < 1024:  # PostgreSQL runs unprivileged (as root, under a service user)
            raise SettingError(f"{{0}} {embedded_port} is privileged: use 1024 or above, or 0 (any free port)",
                               "embedded_port")  # fmt: skip
        for other in ("port", "admin_port"):  # the embedded PostgreSQL would take it first, then the listener fail
            if embedded_port and embedded_port == getattr(self, other):
                raise SettingError(f"{{0}} and {{1}} must differ, both are {embedded_port}", "embedded_port", other)
        if self.flush_max_keys > self.max_pending_keys:
            raise SettingError(
                f"{{0}} ({self.flush_max_keys}) must not exceed {{1}} ({self.max_pending_keys})",
                "flush_max_keys",
                "max_pending_keys",
            )

    @staticmethod
    def env_name(field_name: str) -> str:
        return ENV_PREFIX + field_name.upper()

    @staticmethod
    def flag_name(field_name: str) -> str:
        return "--" + field_name.replace("_", "-")

    def section(self, cls: type[SectionT]) -> SectionT:
        """A feature's settings (a frozen dataclass of knobs), from the values read with the rest."""
        names = {spec.name for spec in dataclasses.fields(cls)}  # type: ignore[arg-type]
        return cls(**{name: value for name, value in self.sections.items() if name in names})

    @classmethod
    def from_sources(
        cls, overrides: dict[str, Any], environ: dict[str, str] | None = None, sections: Sequence[type] = ()
    ) -> Settings:
        """Defaults, then the env file, then FASTCOUNT_* variables, then explicit overrides (flags) win. `sections`
        are the features' settings classes, checked here too, so a bad value stops the start.

        Overrides are flag values, as typed values or as the strings argv gave. A refused value raises ValueError with
        one line naming the flag or variable it came from (`--port must be ...`, `FASTCOUNT_PORT must be ...`).
        """
        environ = dict(os.environ) if environ is None else environ
        sources: dict[str, str] = {}  # setting -> the flag or variable that gave it, to name it in messages
        try:
            env_file = overrides.get("env_file") or environ.get(cls.env_name("env_file"))
            from_file: dict[str, str] = {}
            if env_file:
                if not overrides.get("env_file"):
                    sources["env_file"] = cls.env_name("env_file")
                try:
                    from_file = read_env_file(env_file)
                except OSError as error:
                    raise SettingError(f"{{0}}: cannot read {braced(env_file)}: {error.strerror}", "env_file") from None
            fields = {spec.name: spec for _, spec in knob_fields(sections)}
            known = {cls.env_name(name) for name in fields}
            unknown = [name for name in from_file if name not in known]
            if unknown:  # a misspelt line would otherwise be ignored without a word
                raise SettingError(
                    f"{{0}}: {braced(str(env_file))} sets {braced(', '.join(unknown))}, "
                    "which fastcount does not know (see fastcount serve --help)",
                    "env_file",
                )
            unknown = [
                name
                for name in environ
                if name.startswith(ENV_PREFIX) and name not in known and not _internal_variable(name)
            ]
            if unknown:  # a misspelt variable would otherwise be ignored without a word, as in the env file
                raise SettingError(
                    f"{braced(', '.join(sorted(unknown)))} set in the environment, which fastcount does not know"
                    " (see fastcount serve --help)"
                )
            values: dict[str, Any] = {}
            for spec in fields.values():
                variable = cls.env_name(spec.name)
                if variable in environ:
                    sources[spec.name] = variable
                    values[spec.name] = _convert(spec, environ[variable])
                elif variable in from_file:
                    sources[spec.name] = f"{variable} in {env_file}"
                    values[spec.name] = _convert(spec, from_file[variable])
            for name, value in overrides.items():
                if value is not None:
                    sources[name] = cls.flag_name(name)
                    values[name] = _convert(fields[name], value) if isinstance(value, str) else value
            own = {spec.name for spec in dataclasses.fields(cls)}
            section_values = {name: value for name, value in values.items() if name not in own}
            for section in sections:
                names = {spec.name for spec in dataclasses.fields(section)}
                section(**{name: value for name, value in section_values.items() if name in names})
            return cls(**{name: value for name, value in values.items() if name in own}, sections=section_values)
        except SettingError as error:
            raise ValueError(error.naming(lambda name: sources.get(name) or cls.flag_name(name))) from None


# FASTCOUNT_* variables that are not settings: ./dev's virtual environment, the master's message to a worker, and
# knobs of the test suite (failpoints, timeouts shortened for tests).
INTERNAL_VARIABLES = frozenset(("FASTCOUNT_VENV", "FASTCOUNT_WORKER_CONFIG", "FASTCOUNT_HEARTBEAT_TIMEOUT"))


def _internal_variable(name: str) -> bool:
    return name in INTERNAL_VARIABLES or name.startswith("FASTCOUNT_TEST_") or "_FAILPOINT_" in name


def knob_fields(sections: Sequence[type] = ()) -> Iterator[tuple[type, dataclasses.Field[Any]]]:
    """Every setting: the core's, then each feature section's, as (owner class, field)."""
    for owner in (Settings, *sections):
        for spec in dataclasses.fields(owner):
            if not spec.metadata.get("internal"):
                yield owner, spec


def check_knobs(values: Any) -> None:
    """The checks every knob declares; run by each settings dataclass (the core's and the features') when built.
    Messages say {0} where a setting is named: from_sources names the flag or variable it came from."""
    for spec in dataclasses.fields(values):
        minimum, maximum = spec.metadata.get("minimum"), spec.metadata.get("maximum")
        value = getattr(values, spec.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise SettingError(f"{{0}} must be a finite number, got {value}", spec.name)
        if minimum is not None and maximum is not None and not minimum <= value <= maximum:
            raise SettingError(f"{{0}} must be from {minimum} to {maximum}, got {value}", spec.name)
        if minimum is not None and value < minimum:
            raise SettingError(f"{{0}} must be >= {minimum}, got {value}", spec.name)


class SettingError(ValueError):
    """A refused value, its message a template naming each setting as {0}, {1}, ...: the caller knows its source."""

    def __init__(self, template: str, *names: str) -> None:
        self.template = template
        self.names = names
        super().__init__(self.naming(Settings.flag_name))

    def naming(self, label: Callable[[str], str]) -> str:
        return self.template.format(*(label(name) for name in self.names))


def braced(text: str) -> str:
    """Text to put into a SettingError template as itself."""
    return text.replace("{", "{{").replace("}", "}}")


def parse_bool(raw: str) -> bool:
    lowered = raw.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{raw!r} is not a boolean (true/false, yes/no, on/off, 1/0)")


def read_env_file(path: str) -> dict[str, str]:
    """KEY=value lines as systemd's EnvironmentFile= takes them: blank lines and # comments skipped, quotes removed."""
    values: dict[str, str] = {}
    with open(path) as env_file:
        for number, line in enumerate(env_file, 1):
            line = line.strip()
            if not line or line.startswith(("#", ";")):
                continue
            name, sep, value = line.partition("=")
            if not sep:
                raise ValueError(f"{path}:{number}: expected NAME=value")
            value = value.strip()
            if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
                value = value[1:-1]
            values[name.strip()] = value
    return values


def _convert(spec: dataclasses.Field[Any], raw: str) -> Any:
    kind: type = type(spec.default)
    if kind is bool:
        try:
            return parse_bool(raw)
        except ValueError:
            raise SettingError(f"{{0}} expects true/false, got {braced(repr(raw))}", spec.name) from None
    try:
        return kind(raw)
    except ValueError:
        expected = {int: "an integer", float: "a number"}.get(kind, kind.__name__)
        raise SettingError(f"{{0}} expects {expected}, got {braced(repr(raw))}", spec.name) from None
