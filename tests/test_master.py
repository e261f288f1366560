"""The master: replacing dead workers, rolling reloads under load, orderly stops."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from conftest import ROOT, Database, StartServer, free_port
from httpclient import request
from load import Load


def test_killed_worker_is_replaced_and_the_service_keeps_answering(start_server: StartServer) -> None:
    server = start_server(workers=2)
    victim = server.worker_pids()[0]
    os.kill(victim, signal.SIGKILL)
    server.wait_for_log(rf"event=worker_died slot=\d pid={victim}")
    server.wait_for_log(r"event=worker_ready", count=3)
    assert victim not in server.worker_pids()
    assert len(server.worker_pids()) == 2
    for _ in range(50):  # fresh connections land on both slots' sockets
        assert request(server.port, "GET", "/healthz")[0] == 200


def test_sighup_under_load_fails_no_request_and_counts_exactly(
    start_server: StartServer, database: Database, prefix: str
) -> None:
    server = start_server(workers=2)
    before = set(server.worker_pids())
    with Load(server.port, prefix, keys=100, clients=6) as load:
        load.wait_for_answers(200)
        server.process.send_signal(signal.SIGHUP)  # while the clients send
        server.wait_for_log(r"event=reload_done generation=1")
        load.wait_for_answers(200)
        server.process.send_signal(signal.SIGHUP)
        server.wait_for_log(r"event=reload_done generation=2")
        server.wait_for_log(r"event=worker_exited", count=4)  # both generations retired
        load.wait_for_answers(200)
    assert load.errors == []
    assert set(load.statuses) == {202}
    after = set(server.worker_pids())
    assert len(after) == 2 and not after & before, "every worker was replaced"
    assert server.stop() == 0
    assert database.counts(prefix) == dict(load.accepted)


def test_sigint_stops_gracefully_like_sigterm(start_server: StartServer, database: Database, prefix: str) -> None:
    server = start_server("--flush-interval", "600")
    assert request(server.port, "POST", "/increment", {"key": prefix + "a", "value": 3})[0] == 202
    server.process.send_signal(signal.SIGINT)
    assert server.process.wait(30) == 0
    assert database.total(prefix) == 3


def test_workers_that_cannot_boot_stop_the_master_instead_of_looping(database: Database, tmp_path: Path) -> None:
    # A sitecustomize that kills only worker interpreters stands for new code that does not import.
    (tmp_path / "sitecustomize.py").write_text(
        "import os, sys\nif 'fastcount.server.worker' in sys.orig_argv:\n    os._exit(1)\n"
    )
    command = [sys.executable, "-m", "fastcount", "serve", "--host", "127.0.0.1", "--port", str(free_port())]
    command += ["--workers", "2", "--dsn", database.dsn, "--admin-port", "0"]
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}"}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert "event=master_halt" in result.stderr and "failed to boot" in result.stderr
    assert result.stderr.count("event=worker_spawned") == 2, "no respawn loop"


def test_reload_into_code_that_cannot_boot_keeps_the_old_workers(start_server: StartServer, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    (tmp_path / "sitecustomize.py").write_text(
        "import os, sys\n"
        f"if 'fastcount.server.worker' in sys.orig_argv and os.path.exists({str(broken)!r}):\n"
        "    os._exit(1)\n"
    )
    server = start_server(
        workers=2,
        env={"PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}"},
        expect_errors=(r"event=reload_aborted generation=1 ", r"event=worker_boot_failed slot=\d pid=\d+ code=1 "),
    )
    before = set(server.worker_pids())
    broken.touch()
    server.process.send_signal(signal.SIGHUP)
    server.wait_for_log(r"event=reload_aborted")
    assert set(server.worker_pids()) == before
    assert request(server.port, "GET", "/healthz")[0] == 200
    assert server.process.poll() is None
