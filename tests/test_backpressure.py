"""Bounded memory while PostgreSQL is unreachable: the pending-keys bound and the crash journal's bound both answer
503 + Retry-After instead of growing, a full journal region is first compacted into one summing record, and once
PostgreSQL is back everything that was answered 202 is counted exactly once (also from a SIGKILLed worker's journal).
PostgreSQL is cut off by a proxy between the server and the shared database."""

from __future__ import annotations

import os
import re
import signal
import urllib.request
from collections import Counter

from conftest import Database, ProxiedDatabase, StartServer, free_port, wait_until
from httpclient import request

BIG_BODY = str(1 << 20)


def metric(admin_port: int, name: str) -> float:
    """The sum of a metric's series (every worker's); NaN (no comparison holds) before any worker published it."""
    with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/metrics", timeout=5) as response:
        text = response.read().decode()
    values = re.findall(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.MULTILINE)
    return sum(float(value) for value in values) if values else float("nan")


def post_items(port: int, items: list[tuple[str, int]]) -> tuple[int, dict[str, str]]:
    status, headers, _ = request(port, "POST", "/increment", [{"key": key, "value": value} for key, value in items])
    return status, headers


def post_counting(port: int, items: list[tuple[str, int]], accepted: Counter[str]) -> int:
    """POST the items; add them to `accepted` on a 202; any refusal must carry Retry-After. Returns the status."""
    status, headers = post_items(port, items)
    if status == 202:
        accepted.update(dict(items))
    else:
        assert headers.get("Retry-After") == "1"
    return status


def test_pending_bound_with_many_keys_answers_503_then_everything_accepted_is_counted(
    proxied_database: ProxiedDatabase, start_server: StartServer, database: Database, prefix: str
) -> None:
    admin = free_port()
    server = start_server(
        "--max-pending-keys", "5000", "--flush-max-keys", "1000", "--max-body", BIG_BODY, "--admin-port", str(admin),
        dsn=proxied_database.dsn,
    )  # fmt: skip
    wait_until(lambda: request(server.port, "GET", "/readyz")[0] == 200, "connected")
    proxied_database.proxy.cut()
    accepted: Counter[str] = Counter()
    answers = []
    for round_ in range(8):  # 8 arrays of 1,000 new keys each: 5 fit under the bound of 5,000 (pending + in retry)
        items = [(f"{prefix}{round_}-{i}", i % 9 + 1) for i in range(1000)]
        answers.append(post_counting(server.port, items, accepted))
    assert answers == [202] * 5 + [503] * 3
    assert request(server.port, "GET", "/readyz")[0] == 503
    status, headers, _ = request(server.port, "GET", f"/counters/{prefix}0-1")  # a read needs PostgreSQL itself
    assert (status, headers.get("Retry-After")) == (503, "1")
    assert request(server.port, "GET", "/healthz")[0] == 200
    # What the README says to alert on: a backlog held in memory, no connection to PostgreSQL.
    wait_until(lambda: metric(admin, "fastcount_flush_backlog_keys") > 0, "the backlog metric shows the batch in retry")
    wait_until(lambda: metric(admin, "fastcount_postgres_connected") == 0, "the connection metric shows the outage")
    proxied_database.proxy.restore()
    wait_until(lambda: database.counts(prefix) == dict(accepted), "the backlog is written once PostgreSQL is back")
    wait_until(lambda: request(server.port, "GET", "/readyz")[0] == 200, "ready again")
    wait_until(lambda: metric(admin, "fastcount_flush_backlog_keys") == 0, "no backlog once written")
    late = [(f"{prefix}late-{i}", 1) for i in range(1000)]
    assert post_items(server.port, late)[0] == 202, "the bound is released"
    accepted.update(dict(late))
    assert server.stop() == 0
    assert database.counts(prefix) == dict(accepted)


def test_full_journal_is_compacted_then_answers_503_and_a_killed_worker_loses_nothing_it_answered(
    proxied_database: ProxiedDatabase, start_server: StartServer, database: Database, prefix: str
) -> None:
    # 1 MiB journal regions; the pending-keys bound (a million) is far away: every 503 here is the journal's.
    server = start_server("--crash-journal-mb", "1", "--max-body", BIG_BODY, dsn=proxied_database.dsn)
    [worker] = server.worker_pids()
    wait_until(lambda: request(server.port, "GET", "/readyz")[0] == 200, "connected")
    proxied_database.proxy.cut()
    accepted: Counter[str] = Counter()
    # Few keys, many bytes: 12 bodies of ~350 KB are more than all three regions hold, so only compaction (the
    # pending sums, a few hundred bytes) lets them all in.
    hot = [(f"{prefix}hot-{i % 10}", 1) for i in range(10_000)]
    for _ in range(12):
        assert post_items(server.port, hot)[0] == 202
        accepted.update(key for key, _ in hot)
    # Many long keys: the pending sums themselves outgrow a region (~4,800 keys of 200 bytes), and then the journal
    # cannot take a request it could not replay: 503, not a silent loss.
    answers = []
    for round_ in range(12):
        items = [(f"{prefix}long-{round_}-{i}-".ljust(200, "x"), 2) for i in range(1000)]
        answers.append(post_counting(server.port, items, accepted))
    assert 503 in answers and answers.index(503) >= 3, answers
    # What the journal holds now (a batch in flight and a compacted region) is all that is left of the counts.
    os.kill(worker, signal.SIGKILL)
    proxied_database.proxy.restore()
    server.wait_for_log(rf"event=journals_recovered slot=0 pid=\d+ dead_pid={worker}", timeout=60)
    assert database.counts(prefix) == dict(accepted)
    assert server.stop() == 0
    assert database.counts(prefix) == dict(accepted)


def test_an_idle_worker_notices_that_postgres_is_gone(
    proxied_database: ProxiedDatabase, start_server: StartServer
) -> None:
    # No traffic, so no flush fails: only the idle lanes' pings can tell (the README says to alert on this metric).
    admin = free_port()
    server = start_server("--admin-port", str(admin), dsn=proxied_database.dsn)
    wait_until(lambda: metric(admin, "fastcount_postgres_connected") == 1, "connected at start")
    proxied_database.proxy.cut()
    wait_until(lambda: metric(admin, "fastcount_postgres_connected") == 0, "the idle lanes' pings notice the outage")
    proxied_database.proxy.restore()
    wait_until(lambda: metric(admin, "fastcount_postgres_connected") == 1, "and the return")
    assert server.stop() == 0
