"""The command line: documented flags, environment settings, migrate, and serve on the embedded PostgreSQL."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psycopg
import pytest

from fastcount import __version__
from fastcount.app import settings_sections
from fastcount.cli import mask_dsn
from fastcount.settings import Settings, knob_fields

from conftest import ROOT, Database, free_port
from httpclient import request


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fastcount", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
    )


def test_serve_help_documents_every_setting_and_its_variable() -> None:
    result = run_cli("serve", "--help")
    assert result.returncode == 0
    for _, spec in knob_fields(settings_sections()):
        assert "--" + spec.name.replace("_", "-") in result.stdout
        assert Settings.env_name(spec.name) in result.stdout.replace("\n", " ").replace("  ", "")


def test_help_shows_each_default_once_and_version_prints_the_version() -> None:
    text = " ".join(run_cli("serve", "--help").stdout.split())
    assert text.count("(default: ") == len(list(knob_fields(settings_sections()))), text
    assert "None" not in text and "(default: '" not in text
    assert "(default: number of CPUs; env FASTCOUNT_WORKERS)" in text
    assert "(default: empty; env FASTCOUNT_DSN)" in text
    assert "(default: true; env FASTCOUNT_REUSE_PORT)" in text
    result = run_cli("--version")
    assert (result.returncode, result.stdout) == (0, f"fastcount {__version__}\n")


# Never reached: the start must stop at the flag. Given so that a start that wrongly went on touches nothing.
NOWHERE = ("--dsn", "postgresql://u@127.0.0.1:1/db", "--db-wait", "0")


UNKNOWN = "which fastcount does not know (see fastcount serve --help)"


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["--port", "99999"], {}, "--port must be from 0 to 65535, got 99999"),
        (["--admin-port", "70000"], {}, "--admin-port must be from 0 to 65535, got 70000"),
        (["--flush-interval", "0.001"], {}, "--flush-interval must be >= 0.01, got 0.001"),
        (["--crash-journal-mb", "2048"], {}, "--crash-journal-mb must be from 0 to 2047, got 2048"),
        (["--reuse-port", "maybe"], {}, "--reuse-port expects true/false, got 'maybe'"),
        (["--port", "http"], {}, "--port expects an integer, got 'http'"),
        (["--flush-interval", "nan"], {}, "--flush-interval must be a finite number, got nan"),
        (["--env-file", "/nonexistent"], {}, "--env-file: cannot read /nonexistent: No such file or directory"),
        ([], {"FASTCOUNT_PORT": "99999"}, "FASTCOUNT_PORT must be from 0 to 65535, got 99999"),
        ([], {"FASTCOUNT_TCP_NODELAY": "maybe"}, "FASTCOUNT_TCP_NODELAY expects true/false, got 'maybe'"),
        ([], {"FASTCOUNT_WOKERS": "1"}, f"FASTCOUNT_WOKERS set in the environment, {UNKNOWN}"),
        (["--verve-callback-method", "put"], {}, "--verve-callback-method must be get or post, got 'put'"),
        ([], {"FASTCOUNT_VERVE_CALLBACK_ALLOW": "a b"},
         "FASTCOUNT_VERVE_CALLBACK_ALLOW: 'a b' is neither a host name nor a CIDR"),
        (["--kafka-bootstrap", "k:9092", "--kafka-topic", ""], {},
         "--kafka-topic must not be empty when --kafka-bootstrap is set"),
        (["--events-flush-max", "9"], {"FASTCOUNT_EVENTS_MAX_PENDING": "5"},
         "--events-flush-max (9) must not exceed FASTCOUNT_EVENTS_MAX_PENDING (5)"),
        (["--port", "1"], {"FASTCOUNT_PORT": "99999"}, None),  # the flag wins; nothing wrong to report
        (["--max-pending-keys", "5"], {}, "--flush-max-keys (50000) must not exceed --max-pending-keys (5)"),
        (["--port"], {}, "argument --port: expected one argument (see fastcount serve --help)"),
    ],
)  # fmt: skip
def test_a_bad_flag_or_variable_is_one_line_naming_it(
    args: list[str], env: dict[str, str], message: str | None
) -> None:
    result = run_cli("serve", *NOWHERE, *args, env=env)
    assert "Traceback" not in result.stderr
    if message is None:  # got past the settings to the (unreachable) database
        assert result.returncode == 1 and "could not be reached" in result.stderr, result.stderr
        return
    assert (result.returncode, result.stderr) == (2, f"fastcount: {message}\n")


def test_a_bad_value_in_the_env_file_names_the_variable_and_the_file(tmp_path: Path) -> None:
    env_file = tmp_path / "fastcount.env"
    env_file.write_text("# comment\nFASTCOUNT_FLUSH_INTERVAL=0\n")
    result = run_cli("migrate", *NOWHERE, "--env-file", str(env_file))
    message = f"fastcount: FASTCOUNT_FLUSH_INTERVAL in {env_file} must be >= 0.01, got 0.0\n"
    assert (result.returncode, result.stderr) == (2, message)


def test_mask_dsn_hides_the_password_in_every_form() -> None:
    assert mask_dsn("postgresql://user:pw@host:5432/db") == "postgresql://user:***@host:5432/db"
    assert mask_dsn("postgres://user@host/db?sslmode=require&password=pw") == (
        "postgres://user@host/db?sslmode=require&password=***"
    )
    assert mask_dsn("postgresql://host:5432/db") == "postgresql://host:5432/db"
    assert mask_dsn("host=h user=u password=pw dbname=d") == "host=h user=u password=*** dbname=d"
    assert mask_dsn("host=h password = 'p w\\' x' dbname=d") == "host=h password = *** dbname=d"


def test_flags_override_environment_which_overrides_defaults() -> None:
    env = {"FASTCOUNT_PORT": "4000", "FASTCOUNT_FLUSH_INTERVAL": "2.5"}
    settings = Settings.from_sources({"port": 5000}, env)
    assert (settings.port, settings.flush_interval, settings.flush_max_keys) == (5000, 2.5, 50_000)


def test_bad_settings_are_refused_with_a_clear_message() -> None:
    result = run_cli("serve", "--workers", "0")
    assert result.returncode == 2 and "--workers must be from 1 to 256, got 0" in result.stderr
    result = run_cli("serve", env={"FASTCOUNT_FLUSH_INTERVAL": "soon"})
    assert result.returncode == 2 and "FASTCOUNT_FLUSH_INTERVAL expects a number, got 'soon'" in result.stderr


def test_migrate_creates_the_schema_idempotently(database: Database) -> None:
    with psycopg.connect(database.dsn, autocommit=True) as conn:
        conn.execute("CREATE DATABASE fastcount_migrate_test")
    dsn = database.dsn.rsplit("/", 1)[0] + "/fastcount_migrate_test"
    try:
        for _ in range(2):
            result = run_cli("migrate", "--dsn", dsn)
            assert result.returncode == 0, result.stderr
        with psycopg.connect(dsn) as conn:
            tables = {row[0] for row in conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")}
        core = {"counters", "fastcount_batches", "fastcount_parts", "fastcount_dead_letters"}
        assert tables == core | {"events", "event_users", "event_rollups"} | {
            "verve_ids",
            "verve_endpoints",
            "verve_windows",
            "verve_meta",
        }
    finally:
        with psycopg.connect(database.dsn, autocommit=True) as conn:
            conn.execute("DROP DATABASE fastcount_migrate_test")


def test_serve_without_dsn_runs_and_stops_the_embedded_postgres() -> None:
    if os.environ.get("FASTCOUNT_TEST_DSN"):
        pytest.skip("checks the embedded PostgreSQL; FASTCOUNT_TEST_DSN points elsewhere")
    workdir = Path(tempfile.mkdtemp(prefix="fastcount-cli-"))
    workdir.chmod(0o755)
    port = free_port()
    command = [sys.executable, "-m", "fastcount", "serve", "--port", str(port), "--workers", "1"]
    command += ["--data-dir", str(workdir / "data"), "--flush-interval", "0.2"]
    process = subprocess.Popen(command, cwd=ROOT, stderr=subprocess.PIPE, text=True)
    try:
        assert process.stderr is not None
        lines: list[str] = []
        while not any("event=serving" in line for line in lines):
            line = process.stderr.readline()
            assert line, "".join(lines)
            lines.append(line)
        banner = next(line for line in lines if "embedded PostgreSQL data in" in line)
        dsn = re.search(r"DSN (\S+)", banner).group(1)  # type: ignore[union-attr]
        assert str(workdir / "data") in banner
        assert request(port, "POST", "/increment", {"key": "embedded", "value": 5})[0] == 202
        process.send_signal(signal.SIGTERM)
        assert process.wait(60) == 0
        rest = process.stderr.read()
        process.stderr.close()
        assert "event=embedded_postgres_stopped" in rest
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(dsn, connect_timeout=2)
        # The data survived: start again on the same directory and read it back.
        process = subprocess.Popen(command, cwd=ROOT, stderr=subprocess.DEVNULL, text=True)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                status, _, body = request(port, "GET", "/counters/embedded")
                if status == 200:
                    break
            except OSError:
                pass
            time.sleep(0.2)
        assert b'"value":5' in body
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            process.wait(60)
        shutil.rmtree(workdir, ignore_errors=True)


def test_env_example_lists_every_setting() -> None:
    example = (ROOT / "systemd" / "fastcount.env.example").read_text()
    for _, spec in knob_fields(settings_sections()):
        if spec.name != "env_file":
            assert Settings.env_name(spec.name) + "=" in example, spec.name


def test_an_env_file_line_fastcount_does_not_know_is_refused(tmp_path: Path) -> None:
    env_file = tmp_path / "fastcount.env"
    env_file.write_text("FASTCOUNT_FLUSH_INTERVL=2\n")  # misspelt: silently ignored before
    result = run_cli("serve", "--env-file", str(env_file))
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"fastcount: --env-file: {env_file} sets FASTCOUNT_FLUSH_INTERVL, which fastcount does not know "
        "(see fastcount serve --help)"
    )


def test_the_same_port_for_the_api_and_the_admin_listener_is_refused() -> None:
    result = run_cli("serve", "--port", "3399", "--admin-port", "3399")
    assert result.returncode == 2
    assert result.stderr.strip() == "fastcount: --port and --admin-port must differ, both are 3399"
    # The embedded PostgreSQL's port too (it was taken first, then the listener failed naming "another server"):
    for flag in ("--port", "--admin-port"):
        result = run_cli("serve", "--embedded-port", "3398", flag, "3398")
        assert (result.returncode, result.stderr.strip()) == (
            2,
            f"fastcount: --embedded-port and {flag} must differ, both are 3398",
        )
    # ... unless there is no embedded PostgreSQL: with --dsn the flag is unused (the DSN is then what fails)
    result = run_cli("serve", "--embedded-port", "3398", "--port", "3398", "--dsn", "postgresql://u@127.0.0.1:1/x",
                     "--db-wait", "0.2")  # fmt: skip
    assert result.returncode == 1 and "could not be reached" in result.stderr, result.stderr
