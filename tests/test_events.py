"""POST /events and GET /metrics against real servers and the real database: validation over HTTP, deduplication
across workers and instances, exact metrics, backpressure while PostgreSQL is unreachable, and a SIGKILLed worker."""

from __future__ import annotations

import asyncio
import datetime
import http.client
import json
import os
import random
import signal
import time
from collections.abc import Callable

import psycopg

from fastcount.features.events import store
from fastcount.features.events.validation import Clock, check_event

from conftest import Database, ProxiedDatabase, Proxy, StartServer, free_port
from events_support import expected, metrics
from httpclient import request

HOUR = 3600
DAY = 86400


def post(conn: http.client.HTTPConnection, body: object) -> tuple[int, dict[str, object]]:
    conn.request("POST", "/events", body=json.dumps(body).encode())
    response = conn.getresponse()
    return response.status, json.loads(response.read() or b"{}")


def wait_until(condition: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met before the deadline"
        time.sleep(0.1)


def stored(database: Database, prefix: str) -> list[tuple[object, ...]]:
    return database.query(
        "SELECT event_name, channel, user_id, ts, event_id FROM events WHERE event_name LIKE %s",
        (prefix + "%",),
    )


def test_validation_over_http_single_and_bulk_and_nothing_invalid_stored(
    start_server: StartServer, database: Database, prefix: str
) -> None:
    server = start_server()
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    now = int(time.time())
    good = {"event_name": prefix + "signup", "channel": "web", "user_id": "u1", "timestamp": now - 5}
    assert post(conn, good) == (202, {"accepted": 1})
    assert post(conn, {**good, "timestamp": now + 3600}) == (
        400,
        {"error": "'timestamp' is in the future (more than 5 s ahead of the server)"},
    )
    assert post(conn, {**good, "colour": "red"})[1]["error"].startswith("unknown field 'colour'")  # type: ignore[union-attr]
    assert post(conn, {**good, "user_id": 12}) == (400, {"error": "'user_id' must be a string"})
    assert post(conn, {**good, "tags": ["ok", "x" * 65]}) == (
        400,
        {"error": "'tags'[1] must be at most 64 bytes of UTF-8"},
    )
    status, answer = post(
        conn, [{**good, "user_id": "u2"}, {**good, "channel": ""}, "nope", {**good, "user_id": "u3", "tags": ["a"]}]
    )
    assert status == 202
    assert answer == {
        "accepted": 2,
        "rejected": [
            {"index": 1, "error": "'channel' must not be empty"},
            {"index": 2, "error": "an event must be a JSON object"},
        ],
    }
    status, answer = post(conn, [{**good, "event_name": ""}, {**good, "user_id": "a\u0000"}])
    assert status == 400 and [r["index"] for r in answer["rejected"]] == [0, 1]  # type: ignore[attr-defined]
    assert post(conn, [1, 2])[0] == 400
    assert post(conn, {"events": [good]})[0] == 400
    conn.request("POST", "/events", body=b"{not json")
    response = conn.getresponse()
    assert (response.status, json.loads(response.read())["error"][:19]) == (400, "body must be JSON: ")
    conn.close()
    wait_until(lambda: len(stored(database, prefix)) == 3)
    assert server.stop() == 0
    assert sorted(row[2] for row in stored(database, prefix)) == ["u1", "u2", "u3"]  # type: ignore[type-var]
    assert database.query("SELECT tags FROM events WHERE event_name = %s AND user_id = 'u3'", (prefix + "signup",)) == [
        (["a"],)
    ]


def test_a_bulk_of_1000_events_is_taken_with_default_settings_and_other_routes_keep_max_body(
    start_server: StartServer, database: Database, prefix: str
) -> None:
    """The contract says an array of up to 1,000 events; with the defaults (--max-body 64 KiB) such an array was a
    413. POST /events has its own limit (--events-max-body, 1 MiB); /increment still refuses a body past 64 KiB."""
    server = start_server()
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    now = int(time.time())
    events = [
        {"event_name": prefix + "bulk", "channel": "web", "user_id": f"user-{i}", "timestamp": now - 5,
         "tags": ["a", "b"], "metadata": {"page": f"/p/{i}", "ms": i}}
        for i in range(1000)
    ]  # fmt: skip
    # Every field goes through the flush's JSON parts into its column as it came.
    events[7] |= {"campaign_id": "c-\u00e9", "event_id": "id-7", "tags": ["x", "\u00fc"],
                  "metadata": {"nested": {"\u00e9": [1.5, None, True, "s"]}, "big": 2**53 + 1}}  # fmt: skip
    body = json.dumps(events).encode()
    assert 65_536 < len(body) < 2**20
    conn.request("POST", "/events", body=body)
    response = conn.getresponse()
    assert (response.status, json.loads(response.read())) == (202, {"accepted": 1000, "rejected": []})
    too_big = b'{"key": "k", "value": 1}'.ljust(65_537)  # JSON allows trailing blanks
    conn.request("POST", "/increment", body=too_big)
    response = conn.getresponse()
    assert response.status == 413
    response.read()
    conn.close()
    wait_until(lambda: len(stored(database, prefix)) == 1000)
    query = (
        "SELECT ts, channel, campaign_id, event_id, tags, metadata FROM events"
        " WHERE user_id = 'user-7' AND event_name = %s"
    )
    want = (datetime.datetime.fromtimestamp(now - 5, datetime.UTC), "web", "c-\u00e9", "id-7", ["x", "\u00fc"],
            {"nested": {"\u00e9": [1.5, None, True, "s"]}, "big": 2**53 + 1})  # fmt: skip
    assert database.query(query, (prefix + "bulk",)) == [want]


def test_duplicates_dropped_across_workers_and_instances_and_counted(
    start_server: StartServer, database: Database, prefix: str
) -> None:
    admin_port, second_admin_port = free_port(), free_port()
    first = start_server("--admin-port", str(admin_port), workers=2)
    second = start_server("--admin-port", str(second_admin_port), workers=1)
    now = int(time.time())
    name = prefix + "buy"
    events: list[dict[str, object]] = []
    for i in range(60):
        event: dict[str, object] = {"event_name": name, "channel": ["web", "api"][i % 2], "user_id": f"u{i % 7}",
                                    "timestamp": now - 100 - i % 3}  # fmt: skip
        if i % 3 == 0:
            event["event_id"] = f"{prefix}{i}"
        else:
            event["metadata"] = {"n": i}  # same user, same second, different events: both count
        events.append(event)
    # Every event goes out three times: on fresh connections to each instance (so over both of first's workers),
    # one of them in a bulk, spread over several flushes.
    sent = 0
    for round_ in range(3):
        for port in (first.port, second.port):
            for start in range(0, len(events), 10):
                chunk = events[start : start + 10]
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
                if round_ == 1:
                    assert post(conn, chunk) == (202, {"accepted": len(chunk), "rejected": []})
                else:
                    for event in chunk:
                        assert post(conn, event) == (202, {"accepted": 1})
                conn.close()
                sent += len(chunk)
        # The round is stored before the next one goes out: its repeats meet rows already in PostgreSQL.
        wait_until(lambda: len(stored(database, prefix)) == 60)
    want = expected(events, name, now - DAY, now + 1)
    assert want["total_events"] == 60
    for server in (first, second):
        wait_until(
            lambda port=server.port: metrics(port, event_name=name, **{"from": now - DAY, "to": now + 1}) == want
        )  # type: ignore[misc]
    assert len(stored(database, prefix)) == 60
    counted: dict[str, float] = {}

    def series(name: str) -> float:
        total = 0.0
        for port in (admin_port, second_admin_port):
            _, _, body = request(port, "GET", "/metrics")
            lines = [line for line in body.decode().splitlines() if line.startswith(name)]
            total += sum(float(line.split()[-1]) for line in lines)
        counted[name] = total
        return total

    # Every copy accepted is either stored (60, once each) or dropped as a duplicate by the worker that had it, in
    # its pending set or by the database at its flush: over both instances, exactly sent - 60 (the workers publish
    # their counters on their tick, hence the wait).
    wait_until(lambda: series("fastcount_events_duplicates_dropped") == sent - 60)
    assert series("fastcount_events_accepted") == sent == 360, counted


def test_metrics_exact_for_each_grouping_filter_and_unaligned_range(
    start_server: StartServer, database: Database, prefix: str
) -> None:
    server = start_server(workers=2)
    rng = random.Random(9)
    now = int(time.time())
    names = [prefix + "view", prefix + "click"]
    channels = ["web", "mobile_app", "api", "email"]
    events: list[dict[str, object]] = []
    for i in range(1500):
        event: dict[str, object] = {
            "event_name": rng.choice(names),
            "channel": rng.choice(channels),
            "user_id": f"user{rng.randrange(40)}",  # users on several channels and hours
            "timestamp": now - rng.randrange(50 * HOUR),
        }
        if rng.random() < 0.3:
            event["event_id"] = f"{prefix}e{i}"
        events.append(event)
    traffic = events + [rng.choice(events) for _ in range(700)]  # duplicate-heavy: a third are retries
    rng.shuffle(traffic)
    for start in range(0, len(traffic), 200):
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        chunk = traffic[start : start + 200]
        assert post(conn, chunk[:150])[0] == 202
        for event in chunk[150:]:
            assert post(conn, event)[0] == 202
        conn.close()
    whole = {"from": now - 50 * HOUR, "to": now + 1}
    for name in names:
        want = expected(events, name, whole["from"], whole["to"])
        wait_until(lambda name=name, want=want: metrics(server.port, event_name=name, **whole) == want)  # type: ignore[misc]
    aligned_end = now // HOUR * HOUR
    ranges = [
        (now - 50 * HOUR, now + 1),  # neither end on an hour
        (aligned_end - 24 * HOUR, aligned_end),  # whole hours only: rollups alone
        (aligned_end - 30 * HOUR + 1234, aligned_end - 3 * HOUR - 17),
        (aligned_end - 5 * HOUR + 100, aligned_end - 5 * HOUR + 2000),  # inside one hour: raw rows alone
    ]
    for start, end in ranges:
        for group_by in ("", "channel", "hour", "day"):
            for channel in (None, "mobile_app"):
                params: dict[str, object] = {"event_name": names[0], "from": start, "to": end}
                if group_by:
                    params["group_by"] = group_by
                if channel:
                    params["channel"] = channel
                answer = metrics(server.port, **params)
                assert answer == expected(events, names[0], start, end, channel, group_by), params
    # Without group_by there is no `groups` at all (not an empty list); with it, `groups` is there even when empty.
    assert "groups" not in metrics(server.port, event_name=names[0], **whole)
    nothing = metrics(server.port, event_name=prefix + "never-sent", group_by="hour", **whole)
    assert (nothing["total_events"], nothing["unique_users"], nothing["groups"]) == (0, 0, [])
    # The top-level unique users are the union, not a sum of the groups'.
    answer = metrics(server.port, event_name=names[0], group_by="channel", **whole)
    assert answer["unique_users"] < sum(group["unique_users"] for group in answer["groups"])  # type: ignore[attr-defined]
    assert request(server.port, "GET", "/metrics?event_name=x&group_by=week")[0] == 400
    assert request(server.port, "GET", "/metrics?from=1")[0] == 400
    assert request(server.port, "HEAD", "/metrics?from=1")[::2] == (400, b"")  # HEAD: GET's answer without its body
    query = f"/metrics?event_name={names[0]}&from={whole['from']}&to={whole['to']}"
    status, headers, body = request(server.port, "HEAD", query)
    assert (status, body, int(headers["Content-Length"])) == (200, b"", len(request(server.port, "GET", query)[2]))
    assert request(server.port, "GET", "/metrics?event_name=sign%00up")[0] == 400  # new-user trial: it was 503
    status, _, body = request(server.port, "GET", f"/metrics?event_name={names[0]}&from=0&to={2**40 - 1}")
    assert (status, json.loads(body)["error"][:37]) == (400, "'to' - 'from' must be at most 7862400")
    # The longest range allowed (retention 90 days + 1) answers the same as the 50 hours holding every event.
    longest = {"from": now + 1 - 91 * DAY, "to": now + 1}
    assert metrics(server.port, event_name=names[0], **longest) == {
        **expected(events, names[0], whole["from"], whole["to"]),
        **longest,
    }


def test_backlog_bound_gives_503_while_postgres_unreachable_then_every_accepted_event_stored_once(
    start_server: StartServer, database: Database, prefix: str
) -> None:
    info = psycopg.conninfo.conninfo_to_dict(database.dsn)
    proxy = Proxy((str(info.get("host") or "127.0.0.1"), int(info.get("port") or 5432)))  # type: ignore[call-overload]
    try:
        dsn = psycopg.conninfo.make_conninfo(database.dsn, host="127.0.0.1", port=str(proxy.port))
        server = start_server("--events-max-pending", "120", "--events-flush-max", "40", dsn=dsn)
        now = int(time.time())
        name = prefix + "open"
        conn = client = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        accepted: list[str] = []

        def send(i: int) -> int:
            event = {
                "event_name": name,
                "channel": "web",
                "user_id": f"u{i}",
                "timestamp": now - 30,
                "event_id": str(i),
            }
            status, answer = post(client, event)
            if status == 202:
                accepted.append(str(i))
            else:
                assert (status, answer) == (503, {"error": "too many pending events; retry later"})
            return status

        for i in range(20):
            assert send(i) == 202
        wait_until(lambda: len(stored(database, prefix)) == 20)
        proxy.cut()
        statuses = [send(i) for i in range(20, 400)]
        assert statuses[:100] == [202] * 100, "the bound holds 120 events: pending plus the batch in retry"
        assert statuses[-1] == 503
        conn.request("POST", "/events", body=json.dumps({"event_name": name, "channel": "web", "user_id": "late",
                                                         "timestamp": now - 30}).encode())  # fmt: skip
        response = conn.getresponse()
        response.read()
        assert (response.status, response.getheader("Retry-After")) == (503, "1")
        assert request(server.port, "GET", "/readyz")[0] == 503
        assert request(server.port, "GET", f"/metrics?event_name={name}")[0] == 503
        # Retries of what was accepted are still 202-or-503, and never stored twice.
        proxy.restore()
        wait_until(lambda: request(server.port, "GET", "/readyz")[0] == 200)
        conn.close()
        client = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)  # the idle one may have timed out
        for i in range(0, 40):
            assert send(i) == 202
        client.close()
        wait_until(lambda: len(stored(database, prefix)) == len(set(accepted)))
        assert server.stop() == 0
        rows = stored(database, prefix)
        assert sorted(str(row[4]) for row in rows) == sorted(set(accepted))
        assert metrics_total(database, name) == len(set(accepted))
    finally:
        proxy.close()


def test_a_full_worker_refuses_bodies_as_large_as_one_it_refused_undecoded_until_a_batch_commits(
    proxied_database: ProxiedDatabase, start_server: StartServer, database: Database, prefix: str
) -> None:
    """Clients retrying into a full worker took a third of its time decoding arrays it then refused: once a body got
    503 for want of room, bodies as large and with as many objects get 503 before they are decoded (so even an
    invalid one), others are still read, and a commit lifts it."""
    proxy = proxied_database.proxy
    server = start_server("--events-max-pending", "120", "--events-flush-max", "100", dsn=proxied_database.dsn)
    now = int(time.time())
    name = prefix + "latch"
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)

    def array(first: int) -> list[dict[str, object]]:
        return [
            {"event_name": name, "channel": "web", "user_id": f"u{i}", "timestamp": now - 30, "event_id": f"{i:06}"}
            for i in range(first, first + 50)
        ]

    assert post(conn, array(0))[0] == 202
    wait_until(lambda: len(stored(database, prefix)) == 50)
    proxy.cut()
    assert [post(conn, array(first))[0] for first in (50, 100)] == [202, 202]  # 100 of 120 held
    refused_body = json.dumps(array(150)).encode()
    assert post(conn, array(150)) == (503, {"error": "too many pending events; retry later"})
    size = len(refused_body)
    for body, status in [
        (b"[" + b"{" * 50 + b" " * size, 503),  # as large, as many objects, invalid: refused before decoding
        (b"[" + b"{" * 49 + b" " * size, 400),  # fewer objects: decoded, and its error answered
        (b"[" + b"{" * 50 + b" " * (size - 60), 400),  # smaller: the same
    ]:
        conn.request("POST", "/events", body=body)
        response = conn.getresponse()
        response.read()
        assert response.status == status, body[:20]
    proxy.restore()
    wait_until(lambda: len(stored(database, prefix)) == 150)
    assert post(conn, array(150))[0] == 202, "the commit lifted it"
    conn.close()
    wait_until(lambda: len(stored(database, prefix)) == 200)
    assert server.stop() == 0
    assert metrics_total(database, name) == 200


def metrics_total(database: Database, name: str) -> int:
    rows = database.query("SELECT coalesce(sum(total), 0) FROM event_rollups WHERE event_name = %s", (name,))
    return int(rows[0][0])  # type: ignore[call-overload]


def test_sigkill_of_a_worker_stores_its_accepted_events_once(
    start_server: StartServer, database: Database, prefix: str
) -> None:
    # With a 600 s interval nothing is flushed while the workers live: what they answered is in memory and journals.
    server = start_server("--flush-interval", "600", workers=2)
    now = int(time.time())
    name = prefix + "pay"
    events = [
        {"event_name": name, "channel": "api", "user_id": f"u{i % 9}", "timestamp": now - i % 50} for i in range(300)
    ]
    for start in range(0, len(events), 10):
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)  # new connections: both workers
        for event in events[start : start + 10]:
            assert post(conn, event)[0] == 202
        assert post(conn, events[start : start + 10])[0] == 202  # a retry of all ten, in bulk
        conn.close()
    os.kill(server.worker_pids()[0], signal.SIGKILL)
    server.wait_for_log(r"event=journals_recovered")
    assert server.stop() == 0
    assert "event=journal_recovered" in server.log
    rows = stored(database, prefix)
    assert len(rows) == 300
    assert metrics_total(database, name) == 300
    assert database.query("SELECT count(*) FROM events WHERE event_name = %s", (name,)) == [(300,)]
    # The replayed events' users are in the rollups' bitmaps too: exact unique users, per hour as well.
    reader = start_server(workers=1)
    for group_by in ("", "hour"):
        params: dict[str, object] = {"event_name": name, "from": now - DAY, "to": now + 1}
        if group_by:
            params["group_by"] = group_by
        answer = metrics(reader.port, **params)
        assert answer == expected(events, name, now - DAY, now + 1, group_by=group_by)  # type: ignore[arg-type]
        assert (answer["total_events"], answer["unique_users"]) == (300, 9)
    assert reader.stop() == 0


def test_same_event_id_on_two_utc_days_stored_twice_in_one_flush_and_first_content_wins(
    start_server: StartServer, database: Database, prefix: str
) -> None:
    server = start_server(workers=1)
    now = int(time.time())
    today = now // DAY * DAY
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    base = {"event_name": prefix + "buy", "channel": "web", "user_id": "u1", "event_id": prefix + "X"}
    # One request: both in the same pending set and the same flush.
    assert post(conn, [{**base, "timestamp": today - 10}, {**base, "timestamp": now - 1}])[0] == 202
    assert post(conn, {**base, "event_name": prefix + "refund", "timestamp": now - 1})[0] == 202
    conn.close()
    wait_until(lambda: len(stored(database, prefix)) == 2)
    assert server.stop() == 0
    rows = stored(database, prefix)
    assert sorted((row[0], row[4]) for row in rows) == [(prefix + "buy", prefix + "X")] * 2


def test_a_metrics_query_held_by_a_lock_answers_503_after_the_timeout(
    start_server: StartServer, database: Database
) -> None:
    """Review: reads had no statement timeout: a /metrics query waiting on a lock (or a slow plan) held its client and
    one of the worker's two read connections until it ended, however long."""
    server = start_server("--query-timeout", "1")
    with psycopg.connect(database.dsn) as holder:
        holder.execute("LOCK TABLE event_rollups IN ACCESS EXCLUSIVE MODE")
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=15)  # without the timeout: hangs here
        conn.request("GET", "/metrics?event_name=held")
        response = conn.getresponse()
        status, retry_after = response.status, response.getheader("Retry-After")
        conn.close()
        holder.rollback()
    assert (status, retry_after) == (503, "1")
    assert request(server.port, "GET", "/metrics?event_name=held")[0] == 200, "the connection serves again"


def test_a_flush_connection_writes_batches_again_and_again_with_its_parts_stored_uncompressed(
    database: Database,
) -> None:
    """write_batch on one connection, three times: the session's parts table is made once (uncompressed: pglz on
    ~100 KB parts was ~10% of the flush's PostgreSQL time), each batch's events are stored once, a batch written
    again stores nothing."""
    now = int(time.time())
    prefix = f"uncompressed{random.randrange(10**9)}-"
    clock = Clock(now, 5.0, 90 * DAY)
    batches = []
    for number in range(2):
        batch = {}
        for i in range(1500):  # two parts
            identity, event = check_event(
                {"event_name": f"{prefix}{i % 3}", "channel": "web", "user_id": f"u{i % 7}",
                 "timestamp": now - 60 - i, "event_id": f"{number}-{i}"},
                clock,
            )  # fmt: skip
            batch[(event["timestamp"] // DAY, identity)] = event
        batches.append(batch)

    async def write_all() -> tuple[list[int], str]:
        async with await psycopg.AsyncConnection.connect(database.dsn) as conn:
            inserted = []
            for batch in (batches[0], batches[1], batches[0]):
                async with conn.transaction():
                    inserted.append(await store.write_batch(conn, batch))
            row = await (
                await conn.execute(
                    "SELECT attstorage FROM pg_attribute"
                    " WHERE attrelid = 'pg_temp.fastcount_events_parts'::regclass AND attname = 'part'"
                )
            ).fetchone()
            assert row is not None
            return inserted, str(row[0])

    inserted, storage = asyncio.run(write_all())
    assert inserted == [1500, 1500, 0]
    assert storage == "e"  # EXTERNAL: out of line, not compressed
    assert database.query("SELECT count(*) FROM events WHERE event_name LIKE %s", (prefix + "%",)) == [(3000,)]
    assert database.query("SELECT sum(total) FROM event_rollups WHERE event_name LIKE %s", (prefix + "%",)) == [(3000,)]


def test_a_user_numbered_by_a_concurrent_flush_keeps_its_events_in_the_rollups(database: Database) -> None:
    """Two flushes (two workers or instances) bring the same new user: the second waits for the first's number and
    counts its own event under it (with ON CONFLICT DO NOTHING the waiting flush got no number back, and its event
    was missing from the rollups)."""
    now = int(time.time())
    prefix = f"numbered{random.randrange(10**9)}-"
    clock = Clock(now, 5.0, 90 * DAY)
    user = prefix + "new-user"

    def batch(event_id: str) -> dict[tuple[int, bytes], dict[str, object]]:
        identity, event = check_event(
            {"event_name": prefix + "e", "channel": "web", "user_id": user, "timestamp": now - 60,
             "event_id": event_id},
            clock,
        )  # fmt: skip
        return {(event["timestamp"] // DAY, identity): event}  # type: ignore[operator]

    async def two_flushes() -> None:
        first = await psycopg.AsyncConnection.connect(database.dsn)
        second = await psycopg.AsyncConnection.connect(database.dsn)
        try:
            # The day's partition first, so that neither flush waits for the other's creating it (psycopg: each
            # connection's first statement opens its transaction).
            await first.execute(store.ENSURE_PARTITIONS, ([(now - 60) // DAY],))
            await first.commit()
            assert await store.write_batch(first, batch("a")) == 1  # the user is numbered, not yet committed
            writing = asyncio.create_task(store.write_batch(second, batch("b")))
            await asyncio.sleep(0.5)
            assert not writing.done(), "the second flush waits for the first's user number"
            await first.commit()
            assert await writing == 1
            await second.commit()
        finally:
            await first.close()
            await second.close()

    asyncio.run(two_flushes())
    assert database.query("SELECT count(*) FROM events WHERE event_name = %s", (prefix + "e",)) == [(2,)]
    assert database.query("SELECT sum(total) FROM event_rollups WHERE event_name = %s", (prefix + "e",)) == [(2,)]
    assert database.query("SELECT count(*) FROM event_users WHERE user_id = %s", (user,)) == [(1,)]
