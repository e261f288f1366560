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

from fastcount.app import settings_sections
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


def test_flags_override_environment_which_overrides_defaults() -> None:
    env = {"FASTCOUNT_PORT": "4000", "FASTCOUNT_FLUSH_INTERVAL": "2.5"}
    settings = Settings.from_sources({"port": 5000}, env)
    assert (settings.port, settings.flush_interval, settings.flush_max_keys) == (5000, 2.5, 50_000)


def test_bad_settings_are_refused_with_a_clear_message() -> None:
    result = run_cli("serve", "--workers", "0")
    assert result.returncode == 2 and "workers must be >= 1" in result.stderr
    result = run_cli("serve", env={"FASTCOUNT_FLUSH_INTERVAL": "soon"})
    assert result.returncode == 2 and "FASTCOUNT_FLUSH_INTERVAL='soon' is not a valid float" in result.stderr


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
        assert tables == {"counters", "fastcount_batches", "fastcount_dead_letters",
                          "verve_ids", "verve_endpoints", "verve_windows", "verve_meta"}  # fmt: skip
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
