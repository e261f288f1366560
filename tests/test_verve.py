"""GET /api/verve/accept against real servers and a real PostgreSQL: the endpoint's contract, exact unique counts
per window with several workers and instances, one report per window across instances (also when the claimer dies),
callbacks to a real HTTP server, and reports to a real Kafka-protocol broker through a network cut."""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from conftest import ROOT, Database, Server, StartServer, free_port
from httpclient import request
from verve_support import (
    WINDOW,
    Clients,
    Recorder,
    accept,
    consume_all,
    iso,
    kafka_broker,
    own_database,
    report_lines,
    wait_for,
    windows_table,
)


@pytest.fixture
def db(database: Database) -> Iterator[Database]:
    with own_database(database) as fresh:
        yield fresh


def serve(start_server: StartServer, db: Database, log: Path, *args: str, workers: int = 1,
          env: dict[str, str] | None = None, expect_errors: tuple[str, ...] = ()) -> Server:  # fmt: skip
    return start_server(
        "--verve-window", str(WINDOW), "--verve-lease", "1", "--verve-log", str(log), *args,
        workers=workers, dsn=db.dsn, env=env, expect_errors=expect_errors,
    )  # fmt: skip


def stored_ids(db: Database) -> dict[int, set[int]]:
    by_window: dict[int, set[int]] = {}
    for window, ident in db.query("SELECT window_start, id FROM verve_ids"):
        by_window.setdefault(int(window), set()).add(int(ident))  # type: ignore[call-overload]
    return by_window


def reported(db: Database) -> dict[int, int]:
    return {window: count for window, (count, _) in windows_table(db).items() if count is not None}


def test_accept_contract(start_server: StartServer, db: Database, tmp_path: Path) -> None:
    server = serve(start_server, db, tmp_path / "verve.log")
    status, headers, body = request(server.port, "GET", "/api/verve/accept?id=17")
    assert (status, body, headers["Content-Type"]) == (200, b"ok", "text/plain")
    good = [
        "id=17",  # repeated: ok, counted once
        "id=-9223372036854775808",
        "id=9223372036854775807",
        "id=18&utm_source=x&flag",  # unknown parameters are ignored
        "id=19&endpoint=http%3A%2F%2F127.0.0.1%3A9%2Fhook%3Fa%3D1",
        "endpoint=https://example.invalid/x&id=20",
    ]
    bad = [
        "", "id=", "id=abc", "id=1.5", "id=+3", "id=1e3", "id=%2031", "id=9223372036854775808",
        "id=-9223372036854775809", "ID=21", "id=22&id=23", "idx=24",
        "id=25&endpoint=", "id=26&endpoint=ftp%3A%2F%2Fa%2F", "id=27&endpoint=example.com",
        "id=28&endpoint=http%3A%2F%2F",
        "id=29&endpoint=http%3A%2F%2Fa%20b%2F", "id=30&endpoint=http%3A%2F%2Fa%2F%FF",
        "id=31&endpoint=http%3A%2F%2Fa%2F" + "x" * 2040,
        "id=32&endpoint=http%3A%2F%2F%5B%3A%3A1%2Fx", "id=33&endpoint=http%3A%2F%2F%5Bzz%5D%2F",
        "id=34&endpoint=http%3A%2F%2F%40%2Fx", "id=35&endpoint=http%3A%2F%2F%3A80%2F",
    ]  # fmt: skip
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)  # one keep-alive connection for all
    for query in good:
        assert accept(conn, query) == (200, b"ok"), query
    for query in bad:
        assert accept(conn, query) == (400, b"failed"), query
    conn.close()
    assert request(server.port, "POST", "/api/verve/accept?id=1")[0] == 405
    expected = {17, -(2**63), 2**63 - 1, 18, 19, 20}
    wait_for(lambda: set().union(*stored_ids(db).values()) == expected if stored_ids(db) else False, 10, "ids stored")
    endpoints = {str(row[0]) for row in db.query("SELECT endpoint FROM verve_endpoints")}
    assert endpoints == {"http://127.0.0.1:9/hook?a=1", "https://example.invalid/x"}
    assert sum(len(ids) for ids in stored_ids(db).values()) == len(expected), "nothing from a failed request"


def test_exact_counts_per_window_with_workers_and_keepalive_clients(
    start_server: StartServer, db: Database, tmp_path: Path
) -> None:
    log = tmp_path / "verve.log"
    server = serve(start_server, db, log, workers=2)
    ids = list(range(1_000, 1_400))
    with Clients([server.port], ids, clients=4) as clients:
        wait_for(lambda: len(clients.certain) >= 3, 30, "three windows of traffic")
    assert clients.errors == []
    assert set(clients.statuses) == {200}
    check_exact_reports(db, clients, [log])


def check_exact_reports(db: Database, clients: Clients, logs: list[Path]) -> None:
    """Every window the clients touched is reported once, with exactly the ids accepted in it."""
    windows = set(clients.certain) | {w for both in clients.ambiguous.values() for w in both}
    wait_for(lambda: windows <= set(reported(db)), 30, "reports of every window with traffic")
    stored = stored_ids(db)
    for window in sorted(windows):
        certain = clients.certain.get(window, set())
        in_db = stored.get(window, set())
        maybe = {ident for ident, both in clients.ambiguous.items() if window in both}
        assert certain <= in_db <= certain | maybe, f"window {window}"
        assert reported(db)[window] == len(in_db)
    every_accepted = set().union(*clients.certain.values(), clients.answered_ambiguous)
    assert every_accepted <= set().union(*stored.values()) <= every_accepted | set(clients.ambiguous)
    lines = report_lines(*logs)
    per_window = Counter(start for start, _, _ in lines)
    assert all(count == 1 for count in per_window.values()), per_window
    for start, seconds, count in lines:
        assert seconds == WINDOW
        window = int(time.mktime(time.strptime(start, "%Y-%m-%dT%H:%M:%SZ"))) - time.timezone
        assert reported(db)[window] == count
    assert {iso(window) for window in windows} <= set(per_window)
    # Windows without ids are reported too, with 0: every window from the first one on has exactly one line.
    first, last = min(reported(db)), max(reported(db))
    assert set(reported(db)) == set(range(first, last + WINDOW, WINDOW))


def test_two_instances_report_each_window_once_with_the_exact_count(
    start_server: StartServer, db: Database, tmp_path: Path
) -> None:
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    first = serve(start_server, db, logs[0], workers=2)
    second = serve(start_server, db, logs[1])
    ids = list(range(-200, 200))
    with Clients([first.port, second.port], ids, clients=4) as clients:
        wait_for(lambda: len(clients.certain) >= 3, 30, "three windows of traffic")
    assert clients.errors == []
    assert set(clients.statuses) == {200}
    check_exact_reports(db, clients, logs)


def test_a_claimer_killed_after_claiming_is_taken_over(start_server: StartServer, db: Database, tmp_path: Path) -> None:
    marker = tmp_path / "claimed-and-died"
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    env = {"FASTCOUNT_VERVE_FAILPOINT_DIE_AFTER_CLAIM": str(marker)}
    first = serve(start_server, db, logs[0], env=env)
    second = serve(start_server, db, logs[1], env=env)
    with Clients([first.port, second.port], list(range(50)), clients=2) as clients:
        wait_for(lambda: len(clients.certain) >= 2, 30, "two windows of traffic")
        wait_for(marker.exists, 30, "a claimer died after claiming")
    taken_over = wait_for(
        lambda: db.query("SELECT window_start FROM verve_windows WHERE claims > 1 AND unique_ids IS NOT NULL"),
        30, "the dead claimer's window reported by another process",
    )  # fmt: skip
    assert "event=verve_window_taken_over" in first.log + second.log
    assert "event=worker_died slot=0" in first.log + second.log and "code=70" in first.log + second.log
    check_exact_reports(db, clients, logs)
    assert iso(int(taken_over[0][0])) in {start for start, _, _ in report_lines(*logs)}


def test_callbacks_get_once_per_window_and_endpoint_with_statuses_recorded(
    start_server: StartServer, db: Database, tmp_path: Path
) -> None:
    hooks = Recorder()
    try:
        server = serve(start_server, db, tmp_path / "verve.log", workers=2)
        base = f"http://127.0.0.1:{hooks.port}"
        endpoints = {
            f"{base}/ok?tag=a": "2xx",
            f"{base}/status/500": "5xx",
            f"{base}/status/302": "3xx",  # not followed
            "http://169.254.169.254/latest/meta-data/": "refused",
        }
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        window = None
        while window is None:
            # All requests in one window: every endpoint several times, with ids 1..5.
            start = int(time.time() // WINDOW) * WINDOW
            for ident in range(1, 6):
                for endpoint in endpoints:
                    assert accept(conn, f"id={ident}&endpoint={_quote(endpoint)}") == (200, b"ok")
            if int(time.time() // WINDOW) * WINDOW == start:
                window = start
            else:
                db.query("TRUNCATE verve_endpoints")  # straddled a boundary: try again in the next window
        conn.close()
        rows = wait_for(lambda: _callback_rows(db, window), 30, "every callback attempted and recorded")
        assert rows == {
            f"{base}/ok?tag=a": ("2xx", 200, None),
            f"{base}/status/500": ("5xx", 500, None),
            f"{base}/status/302": ("3xx", 302, None),
            "http://169.254.169.254/latest/meta-data/": ("refused", None, rows[list(endpoints)[3]][2]),
        }
        assert "link-local" in str(rows[list(endpoints)[3]][2])
        count = reported(db)[window]
        assert count == 5
        assert sorted(hooks.requests) == sorted(
            [("GET", f"/ok?tag=a&count={count}", b""), ("GET", f"/status/500?count={count}", b""),
             ("GET", f"/status/302?count={count}", b"")]
        ), "each endpoint once, no redirect followed"  # fmt: skip
        assert "event=verve_callback" in server.log
    finally:
        hooks.close()


def test_callbacks_post_json_and_the_allow_list(start_server: StartServer, db: Database, tmp_path: Path) -> None:
    hooks = Recorder()
    try:
        server = serve(start_server, db, tmp_path / "verve.log", "--verve-callback-method", "post",
                       "--verve-callback-allow", "127.0.0.1")  # fmt: skip
        allowed = f"http://127.0.0.1:{hooks.port}/post"
        outside = f"http://localhost.localdomain.invalid:{hooks.port}/never"
        other_address = "http://10.255.255.1/never"
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        for endpoint in (allowed, outside, other_address):
            assert accept(conn, f"id=7&endpoint={_quote(endpoint)}") == (200, b"ok")
        conn.close()
        window = wait_for(lambda: db.query("SELECT window_start FROM verve_endpoints LIMIT 1"), 10)[0][0]
        rows = wait_for(lambda: _callback_rows(db, int(window), expected=3), 30, "callbacks recorded")
        assert rows[allowed] == ("2xx", 200, None)
        assert rows[other_address][0] == "refused" and "not in --verve-callback-allow" in str(rows[other_address][2])
        assert rows[outside][0] == "error"  # a name that does not resolve
        assert [(method, path, json.loads(body)) for method, path, body in hooks.requests] == [
            ("POST", "/post", {"window_start": iso(int(window)), "count": 1})
        ]
    finally:
        hooks.close()


def _quote(url: str) -> str:
    from urllib.parse import quote

    return quote(url, safe="")


def _callback_rows(db: Database, window: int, expected: int = 4) -> dict[str, tuple[object, ...]] | None:
    rows = db.query(
        "SELECT endpoint, outcome, status, error FROM verve_endpoints WHERE window_start = %s AND outcome IS NOT NULL",
        (window,),
    )
    if len(rows) < expected:
        return None
    return {str(row[0]): tuple(row[1:]) for row in rows}


def test_kafka_reports_once_per_window_across_instances_and_a_network_cut(
    start_server: StartServer, db: Database, tmp_path: Path
) -> None:
    topic = f"verve.{os.getpid()}.{int(time.time())}"
    with kafka_broker(tmp_path) as proxy:
        bootstrap = f"127.0.0.1:{proxy.port}"
        args = ("--kafka-bootstrap", bootstrap, "--kafka-topic", topic)
        logs = [tmp_path / "a.log", tmp_path / "b.log"]
        first = serve(start_server, db, logs[0], *args)
        second = serve(start_server, db, logs[1], *args)
        conn = http.client.HTTPConnection("127.0.0.1", first.port, timeout=10)
        assert accept(conn, "id=1") == (200, b"ok")
        before_cut = wait_for(lambda: [w for w, (n, p) in windows_table(db).items() if p is not None and n], 30,
                              "a published report")  # fmt: skip
        proxy.cut()
        cut_window = None
        for ident in range(2, 100):  # one id known to be in one window (the request did not straddle a boundary)
            before = int(time.time() // WINDOW) * WINDOW
            assert accept(conn, f"id={ident}") == (200, b"ok")
            if int(time.time() // WINDOW) * WINDOW == before:
                cut_window = before
                break
        assert cut_window is not None
        conn.close()
        # The window closes and is reported during the cut, but stays unpublished.
        wait_for(lambda: windows_table(db).get(cut_window, (None, None))[0] is not None, 30, "report during the cut")
        assert windows_table(db)[cut_window][1] is None
        proxy.restore()
        wait_for(lambda: windows_table(db)[cut_window][1] is not None, 60, "published after the cut")
        for server in (first, second):
            assert server.stop() == 0
        messages = consume_all(bootstrap, topic)
    by_key = Counter(key for key, _ in messages)
    assert all(count == 1 for count in by_key.values()), by_key
    published = {w for w, (_, p) in windows_table(db).items() if p is not None}
    assert {key.decode() for key in by_key} == {iso(w) for w in published}
    values = {json.loads(value)["window_start_unix"]: json.loads(value) for _, value in messages}
    assert values[cut_window] == {"window_start": iso(cut_window), "window_start_unix": cut_window,
                                  "window_seconds": WINDOW, "unique_ids": reported(db)[cut_window]}  # fmt: skip
    assert reported(db)[cut_window] >= 1 and before_cut


def test_sigkill_after_ok_still_counts(start_server: StartServer, db: Database, tmp_path: Path) -> None:
    server = serve(start_server, db, tmp_path / "verve.log", "--flush-interval", "600")
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    window = int(time.time() // WINDOW) * WINDOW
    for ident in range(100, 110):
        assert accept(conn, f"id={ident}&endpoint=http%3A%2F%2F127.0.0.1%3A9%2F") == (200, b"ok")
    alone = [*range(200, 210), -5, 2**63 - 1, -(2**63)]  # an id alone is journaled by another record than the above
    for ident in alone:
        assert accept(conn, f"id={ident}") == (200, b"ok")
    conn.close()
    for pid in server.worker_pids():
        os.kill(pid, signal.SIGKILL)
    ids = wait_for(lambda: set().union(*stored_ids(db).values()) if stored_ids(db) else None, 30, "journal recovered")
    assert ids == set(range(100, 110)) | set(alone)
    assert min(stored_ids(db)) >= window
    # once per window: the ten requests may straddle a window boundary, and then the endpoint is new in each
    endpoints = db.query("SELECT window_start, endpoint FROM verve_endpoints")
    assert {endpoint for _, endpoint in endpoints} == {"http://127.0.0.1:9/"}
    assert len(endpoints) == len({window for window, _ in endpoints}) == len(stored_ids(db))


def test_a_bad_report_log_path_is_logged_and_the_job_keeps_trying(
    start_server: StartServer, db: Database, tmp_path: Path
) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("a file where the log's directory should be")
    log = blocker / "verve.log"
    admin = free_port()
    server = serve(
        start_server, db, log, "--admin-port", str(admin),
        expect_errors=(r"event=verve_job_failed step=report", r"^Traceback"),
    )  # fmt: skip
    server.wait_for_log(r"event=verve_job_failed step=report", timeout=30)
    assert "Traceback" in server.log  # logged as an error, with its cause
    # counted where the README's alert looks (new-user trial: it stayed 0 while no report could be written)
    wait_for(lambda: _job_failures(admin) > 0, 10, "fastcount_background_job_failures_total counting the failed step")
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    assert accept(conn, "id=1") == (200, b"ok")
    conn.close()
    blocker.unlink()  # the path becomes usable: the job, still running, reports
    wait_for(lambda: report_lines(log), 60, "a report line once the log path is writable")
    assert server.process.poll() is None


def test_the_databases_window_is_kept_by_a_reload_and_another_is_refused_at_start(
    start_server: StartServer, db: Database, tmp_path: Path
) -> None:
    """New-user trial: a reload from 20 to 30 s windows reported a window that never held ids and left two that did
    unreported; an instance started with another window wrote its rows into the shared table. A database keeps the
    window of its first start."""
    env_file = tmp_path / "fastcount.env"
    env_file.write_text(f"FASTCOUNT_VERVE_WINDOW={WINDOW}\n")
    log = tmp_path / "verve.log"
    server = start_server(
        "--env-file", str(env_file), "--verve-lease", "1", "--verve-log", str(log), workers=1, dsn=db.dsn
    )  # fmt: skip
    env_file.write_text(f"FASTCOUNT_VERVE_WINDOW={WINDOW + 1}\n")
    server.process.send_signal(signal.SIGHUP)
    server.wait_for_log(r"event=reload_done generation=1")
    assert "event=reload_settings_need_restart settings=verve_window" in server.log
    reloaded_at = time.time()
    wait_for(lambda: [line for line in report_lines(log) if _unix(line[0]) > reloaded_at], 30, "a report after it")
    assert {int(seconds) for (seconds,) in db.query("SELECT DISTINCT window_seconds FROM verve_windows")} == {WINDOW}  # type: ignore[call-overload]
    refused = subprocess.run(
        [sys.executable, "-m", "fastcount", "serve", "--dsn", db.dsn, "--verve-window", str(WINDOW + 1),
         "--port", str(free_port()), "--admin-port", "0"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert refused.returncode == 2, refused.stderr
    assert f"--verve-window {WINDOW + 1} differs from this database's window, {WINDOW} s" in refused.stderr
    # Started without the flag, the message says where 60 came from (new-user trial: a flag never typed was named).
    refused = subprocess.run(
        [sys.executable, "-m", "fastcount", "serve", "--dsn", db.dsn, "--port", str(free_port()), "--admin-port", "0"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert refused.returncode == 2, refused.stderr
    assert f"--verve-window 60 (the default) differs from this database's window, {WINDOW} s (kept" in refused.stderr


def test_a_reload_keeps_the_default_window_too(start_server: StartServer, db: Database, tmp_path: Path) -> None:
    """Review: a window left at its default (60 s) is in no settings dict, so the reload took the env file's new one."""
    env_file = tmp_path / "fastcount.env"
    env_file.write_text("FASTCOUNT_MAX_BODY=100000\n")
    server = start_server("--env-file", str(env_file), workers=1, dsn=db.dsn)
    env_file.write_text("FASTCOUNT_MAX_BODY=100000\nFASTCOUNT_VERVE_WINDOW=7\n")
    server.process.send_signal(signal.SIGHUP)
    server.wait_for_log(r"event=reload_done generation=1")
    assert "event=reload_settings_need_restart settings=verve_window" in server.log
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    assert accept(conn, "id=1") == (200, b"ok")
    time.sleep(1.5)  # 7 s windows would put the two ids in different windows, at least one not a minute's start
    assert accept(conn, "id=2") == (200, b"ok")
    conn.close()
    windows = wait_for(lambda: stored_ids(db) if len(set().union(*stored_ids(db).values(), set())) == 2 else None)
    assert all(window % 60 == 0 for window in windows), windows


def _unix(iso_utc: str) -> float:
    return datetime.strptime(iso_utc, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC).timestamp()


def _job_failures(admin_port: int) -> float:
    _, _, body = request(admin_port, "GET", "/metrics")
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in body.decode().splitlines()
        if line.startswith("fastcount_background_job_failures_total")
    )
