"""Exact totals: what the server accepted is what PostgreSQL holds, across keys, workers and clients."""

from __future__ import annotations

import http.client
import json
import signal
import time

from conftest import Database, StartServer
from httpclient import increment, request
from load import Load


def wait_for_counts(database: Database, prefix: str, expected: dict[str, int], timeout: float = 10.0) -> dict[str, int]:
    deadline = time.monotonic() + timeout
    while True:
        counts = database.counts(prefix)
        if counts == expected or time.monotonic() > deadline:
            return counts
        time.sleep(0.1)


def test_exact_totals_with_many_keys_workers_and_keepalive_clients(
    start_server: StartServer, database: Database, prefix: str
) -> None:
    server = start_server(workers=2)
    with Load(server.port, prefix, keys=300, clients=8) as load:
        load.wait_for_answers(1500)
    assert load.errors == []
    assert set(load.statuses) == {202}
    assert load.requests > 1000
    # Totals land within a few flush intervals, without stopping the server.
    assert wait_for_counts(database, prefix, dict(load.accepted)) == dict(load.accepted)


def test_array_form_counts_every_item(start_server: StartServer, database: Database, prefix: str) -> None:
    server = start_server("--max-body", "1048576")  # 10,000 items are ~450 KB; the default body limit is 64 KiB
    items = [{"key": f"{prefix}{i % 7}", "value": i + 1} for i in range(10_000)]
    assert request(server.port, "POST", "/increment", items)[0] == 202
    expected: dict[str, int] = {}
    for item in items:
        expected[str(item["key"])] = expected.get(str(item["key"]), 0) + int(item["value"])  # type: ignore[call-overload]
    assert wait_for_counts(database, prefix, expected) == expected
    too_many = [*items, {"key": prefix + "x", "value": 1}]
    assert request(server.port, "POST", "/increment", too_many)[0] == 400


def test_reaching_flush_max_keys_flushes_before_the_interval(
    start_server: StartServer, database: Database, prefix: str
) -> None:
    server = start_server("--flush-interval", "600", "--flush-max-keys", "100")
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    for i in range(150):
        assert increment(conn, f"{prefix}{i}", 1) == 202
    conn.close()
    deadline = time.monotonic() + 5
    while len(database.counts(prefix)) < 100 and time.monotonic() < deadline:
        time.sleep(0.05)
    flushed = len(database.counts(prefix))
    assert flushed >= 100, "a full buffer must be flushed at once, not after the 600 s interval"
    assert flushed < 150, "the keys after the early flush wait for the next one"


def test_sigterm_while_requests_are_in_flight_answers_them_and_loses_nothing(
    start_server: StartServer, database: Database, prefix: str
) -> None:
    server = start_server("--flush-interval", "600", workers=2)
    with Load(server.port, prefix, keys=1000, clients=6) as load:
        load.wait_for_answers(500)
        assert database.total(prefix) == 0, "nothing is flushed before the interval or a stop"
        server.process.send_signal(signal.SIGTERM)  # the clients are still sending
        assert server.process.wait(60) == 0
    # In-flight requests were answered before the workers flushed and exited; clients that tried later found the
    # door closed (refused or reset: errors, never a 202 that is not counted).
    assert set(load.statuses) == {202}
    assert database.counts(prefix) == dict(load.accepted)
    assert "event=stopped" in server.log


def test_read_your_flushed_value_over_http(start_server: StartServer, prefix: str) -> None:
    server = start_server()
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    for _ in range(5):
        assert increment(conn, prefix + "k", 2) == 202
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        conn.request("GET", f"/counters/{prefix}k")
        response = conn.getresponse()
        body = response.read()
        if response.status == 200 and json.loads(body)["value"] == 10:
            break
        time.sleep(0.05)
    conn.close()
    assert json.loads(body)["value"] == 10


def test_reading_a_key_with_nul_is_a_400_not_a_database_outage(start_server: StartServer) -> None:
    server = start_server()
    status, _, body = request(server.port, "GET", "/counters/a%00")
    assert status == 400 and b"NUL" in body
