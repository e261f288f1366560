"""The master never turns one failure into many: workers that cannot boot, journals of dead workers, signals while
stopping, slow admin clients, and a second instance on a busy port."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

from fastcount.store.embedded import temporary_postgres

from conftest import ROOT, Database, Server, StartServer, free_port
from httpclient import request


def worker_sitecustomize(tmp_path: Path, body: str) -> dict[str, str]:
    """A sitecustomize run by worker interpreters only (not recovery processes): it stands for code on disk."""
    (tmp_path / "sitecustomize.py").write_text(
        "import os, sys, time\n"
        "if 'fastcount.server.worker' in sys.orig_argv and '--recover-only' not in sys.orig_argv:\n"
        + "".join(f"    {line}\n" for line in body.splitlines())
    )
    return {"PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}"}


def boot_fails_while(flag: Path, tmp_path: Path) -> dict[str, str]:
    return worker_sitecustomize(tmp_path, f"if os.path.exists({str(flag)!r}):\n    os._exit(1)")


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not within {timeout}s: {what}"
        time.sleep(0.05)


def metric(admin_port: int, name: str, labels: str = "") -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/metrics", timeout=5) as response:
        text = response.read().decode()
    found = re.search(rf"^{re.escape(name)}{re.escape(labels)} (\S+)$", text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


def fresh_connections_all_answer(port: int, count: int = 40) -> None:
    """Each request on a new connection, so the kernel spreads them over every slot's socket."""
    for _ in range(count):
        assert request(port, "GET", "/healthz")[0] == 200


def slot_of(server: Server, pid: int) -> int:
    found = re.search(rf"event=worker_spawned slot=(\d+) pid={pid} ", server.log)
    assert found, f"no spawn of {pid} in the log"
    return int(found.group(1))


def test_replacement_that_cannot_boot_leaves_the_other_worker_serving_and_is_retried(
    start_server: StartServer, tmp_path: Path
) -> None:
    broken = tmp_path / "broken"
    admin = free_port()
    server = start_server(
        "--admin-port", str(admin), workers=2, env=boot_fails_while(broken, tmp_path),
        expect_errors=(r"event=worker_boot_failed slot=\d pid=\d+ code=1 ",),
    )  # fmt: skip
    victim = server.worker_pids()[0]
    slot = slot_of(server, victim)
    broken.touch()  # a deploy put code on disk that does not boot
    os.kill(victim, signal.SIGKILL)
    server.wait_for_log(rf"event=worker_boot_failed slot={slot} ", count=2)  # retried, with back-off
    assert server.process.poll() is None, "one slot that cannot boot does not stop the master"
    assert "event=master_halt" not in server.log and "event=worker_killed" not in server.log
    fresh_connections_all_answer(server.port)  # none waits on the socket of the slot that cannot boot
    assert metric(admin, "fastcount_worker_boot_failures_total") >= 2

    broken.unlink()  # the fix is deployed: the next retry boots
    server.wait_for_log(rf"event=slot_resumed slot={slot} ", timeout=60)
    assert len(server.worker_pids()) == 2
    label = f'{{worker="{slot}"}}'
    before = metric(admin, "fastcount_http_requests_total", label)
    fresh_connections_all_answer(server.port, 60)
    wait_until(
        lambda: metric(admin, "fastcount_http_requests_total", label) > before,
        10,
        f"slot {slot} takes connections again",
    )


def test_reload_whose_workers_cannot_boot_rolls_back_settings_and_generation(
    start_server: StartServer, tmp_path: Path
) -> None:
    broken = tmp_path / "broken"
    env_file = tmp_path / "fastcount.env"
    env_file.write_text("FASTCOUNT_MAX_BODY=100000\n")
    server = start_server(
        "--env-file", str(env_file), workers=2, env=boot_fails_while(broken, tmp_path),
        expect_errors=(r"event=reload_aborted generation=1 ", r"event=worker_boot_failed slot=\d pid=\d+ code=1 "),
    )  # fmt: skip
    big = {"key": "rollback-" + "k" * 200, "value": 1}
    before = set(server.worker_pids())
    env_file.write_text("FASTCOUNT_MAX_BODY=100\n")
    broken.touch()
    server.process.send_signal(signal.SIGHUP)
    server.wait_for_log(r"event=reload_aborted generation=1 reason=worker_boot_failed .* rolled_back_to=0")
    assert set(server.worker_pids()) == before, "the old workers keep serving"
    # A worker that dies now is replaced with the settings and generation that serve, not the aborted ones.
    broken.unlink()
    victim = sorted(before)[0]
    os.kill(victim, signal.SIGKILL)
    server.wait_for_log(rf"event=worker_died slot=\d pid={victim} ")
    server.wait_for_log(r"event=worker_ready", count=3)
    replacement = (set(server.worker_pids()) - before).pop()
    assert re.search(rf"event=worker_spawned slot=\d pid={replacement} generation=0", server.log)
    for _ in range(30):  # fresh connections reach both workers: every one still takes bodies over 100 bytes
        assert request(server.port, "POST", "/increment", big)[0] == 202
    # The next reload is a new generation and brings the new settings in.
    server.process.send_signal(signal.SIGHUP)
    server.wait_for_log(r"event=reload_done generation=2")
    assert request(server.port, "POST", "/increment", big)[0] == 413


def test_journal_of_a_worker_killed_while_its_successor_boots_is_recovered_at_once(
    start_server: StartServer, database: Database, prefix: str, tmp_path: Path
) -> None:
    hold = tmp_path / "hold"  # while it exists, a new worker waits in its boot
    env = worker_sitecustomize(tmp_path, f"while os.path.exists({str(hold)!r}):\n    time.sleep(0.05)")
    server = start_server("--flush-interval", "600", workers=1, env=env)
    for i in range(20):
        assert request(server.port, "POST", "/increment", {"key": f"{prefix}{i % 4}", "value": 2})[0] == 202
    [old] = server.worker_pids()
    hold.touch()
    try:
        server.process.send_signal(signal.SIGHUP)
        server.wait_for_log(r"event=worker_spawned slot=0 pid=\d+ generation=1")
        os.kill(old, signal.SIGKILL)  # the slot has a successor, still booting: the journal must not wait for it
        server.wait_for_log(rf"event=journals_recovered slot=0 pid=\d+ dead_pid={old}")
        assert database.total(prefix) == 40
        assert "event=reload_done" not in server.log, "recovered before the successor served"
    finally:
        hold.unlink()  # never leave a worker waiting in its boot
    server.wait_for_log(r"event=reload_done generation=1")
    assert server.stop() == 0
    assert database.total(prefix) == 40, "counted once"


def test_sigquit_during_a_graceful_stop_stops_at_once(start_server: StartServer, prefix: str) -> None:
    # With PostgreSQL gone the worker cannot flush, so a graceful stop waits for its whole timeout. (A start needs
    # PostgreSQL: it goes away once the server is up.)
    with temporary_postgres("fastcount-outage-") as doomed:
        server = start_server(
            "--graceful-timeout", "120", dsn=doomed.dsn,
            expect_errors=(r"event=worker_killed slot=0 pid=\d+ reason=immediate_stop", r"event=journals_lost count=1"),
            expect_exit=1,  # counts answered 202 were lost: not a clean stop
        )  # fmt: skip
        doomed.stop()
    assert request(server.port, "POST", "/increment", {"key": prefix + "a", "value": 1})[0] == 202
    server.process.send_signal(signal.SIGTERM)
    server.wait_for_log(r"event=worker_stopping")
    server.process.send_signal(signal.SIGTERM)
    server.wait_for_log(r"event=stop_already_requested signal=SIGTERM")
    server.process.send_signal(signal.SIGHUP)
    server.wait_for_log(r"event=reload_ignored reason=stopping")
    assert server.process.poll() is None, "still waiting for the worker to flush"
    server.process.send_signal(signal.SIGQUIT)
    assert server.process.wait(30) == 1  # far below the graceful timeout; 1: answered counts were lost
    assert "event=stop mode=immediate" in server.log
    assert re.search(r"event=worker_killed slot=0 pid=\d+ reason=immediate_stop", server.log)
    assert "event=journals_lost count=1" in server.log


class SlowAdminClients:
    """Keeps one admin client connected at all times, sending one byte every half second and never finishing."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.bytes_sent = 0
        self.closed_by_server = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> SlowAdminClients:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        while not self._stop.is_set():
            with socket.create_connection(("127.0.0.1", self.port), timeout=5) as sock:
                try:
                    for byte in b"GET /metrics HTTP/1.1\r\nHost: x" * 100:
                        sock.send(bytes([byte]))
                        self.bytes_sent += 1
                        if self._stop.wait(0.5):
                            return
                except OSError:
                    self.closed_by_server += 1


def test_slow_admin_client_delays_neither_reload_nor_respawn(start_server: StartServer) -> None:
    admin = free_port()
    server = start_server("--admin-port", str(admin), workers=1)
    with SlowAdminClients(admin) as slow:
        wait_until(lambda: slow.bytes_sent >= 2, 10, "the slow client is sending")
        assert metric(admin, "fastcount_workers_ready") == 1, "a scrape is answered meanwhile"
        server.process.send_signal(signal.SIGHUP)
        server.wait_for_log(r"event=reload_done generation=1", timeout=10)
        server.wait_for_log(r"event=worker_exited", timeout=10)  # the old worker, retired
        [worker] = server.worker_pids()
        os.kill(worker, signal.SIGKILL)
        server.wait_for_log(r"event=worker_ready", count=3, timeout=10)
        wait_until(lambda: slow.closed_by_server >= 1, 15, "the slow client is dropped at its deadline")
    assert "event=admin_client_timeout phase=read" in server.log
    assert request(server.port, "GET", "/healthz")[0] == 200


def serve_command(database: Database, port: int, admin_port: int) -> list[str]:
    return [
        sys.executable, "-m", "fastcount", "serve", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
        "--dsn", database.dsn, "--admin-port", str(admin_port), "--backlog", "128",
    ]  # fmt: skip


def test_second_serve_on_a_busy_port_fails_with_one_line_and_the_first_keeps_serving(
    start_server: StartServer, database: Database
) -> None:
    admin = free_port()
    first = start_server("--admin-port", str(admin), workers=2)
    pids = set(first.worker_pids())
    for port, admin_port, what in ((first.port, 0, "port"), (free_port(), admin, "admin port")):
        second = subprocess.run(
            serve_command(database, port, admin_port), cwd=ROOT, capture_output=True, text=True, timeout=60
        )
        assert second.returncode != 0
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1, second.stderr
        busy = port if what == "port" else admin
        assert f"{what} {busy} on 127.0.0.1 is already in use" in lines[0]
        assert "another fastcount" in lines[0]
    fresh_connections_all_answer(first.port, 60)
    assert set(first.worker_pids()) == pids
    assert metric(admin, "fastcount_workers_ready") == 2
