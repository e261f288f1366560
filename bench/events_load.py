"""Events benchmark: load N events over D days through the service's own bulk path, then time the metrics queries.

It starts a throw-away embedded PostgreSQL (or uses --dsn) and `fastcount serve`, posts the events in arrays of
1,000 from several client processes (50 names with a Zipf-like skew, 5 channels, 200,000 users), waits until the
rollups hold them all, then times GET /metrics for the busiest name over the whole range (by hour, by day, by
channel, and without grouping) and checks every answer against SQL over the raw rows: totals and every group.

    python bench/events_load.py --events 10000000 --days 30        # the issue's full run (5-8 min of load here)
    python bench/events_load.py --events 1000000 --days 30         # a quick one (30-75 s of load)
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import multiprocessing
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import psycopg

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(ROOT))

from fastcount.store.embedded import temporary_postgres  # noqa: E402

NAMES = [f"event{rank:02d}" for rank in range(1, 51)]
WEIGHTS = [1 / rank for rank in range(1, 51)]  # the busiest name gets ~22% of the events
CHANNELS = ["web", "mobile_app", "api", "email", "partner"]
USERS = 200_000
BULK = 1000


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def post_share(args: tuple[int, int, int, int, int]) -> tuple[int, float]:
    """One client process: `count` events in arrays of BULK over keep-alive; returns (accepted, seconds)."""
    port, seed, count, end, span = args
    rng = random.Random(seed)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    accepted = 0
    started = time.perf_counter()
    sent = 0
    while sent < count:
        size = min(BULK, count - sent)
        names = rng.choices(NAMES, WEIGHTS, k=size)
        body = json.dumps(
            [
                {
                    "event_name": names[i],
                    "channel": rng.choice(CHANNELS),
                    "user_id": f"user{rng.randrange(USERS)}",
                    "timestamp": end - rng.randrange(span),
                    "event_id": f"{seed}-{sent + i}",
                }
                for i in range(size)
            ]
        ).encode()
        while True:
            conn.request("POST", "/events", body=body, headers={"Content-Type": "application/json"})
            response = conn.getresponse()
            answer = response.read()
            if response.status == 503:  # backpressure: the flush is behind; wait and send the same array again
                time.sleep(0.2)
                continue
            assert response.status == 202, (response.status, answer)
            accepted += json.loads(answer)["accepted"]
            break
        sent += size
    conn.close()
    return accepted, time.perf_counter() - started


def load(dsn: str, port: int, args: argparse.Namespace, end: int, span: int) -> None:
    share = args.events // args.clients
    jobs = [(port, args.first_seed + seed, share, end, span) for seed in range(args.clients)]
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute("SELECT coalesce(sum(total), 0) FROM event_rollups").fetchone()
        before = int(row[0]) if row else 0
    started = time.perf_counter()
    with multiprocessing.Pool(args.clients) as pool:
        results = pool.map(post_share, jobs)
    posting = time.perf_counter() - started
    accepted = sum(count for count, _ in results)
    with psycopg.connect(dsn, autocommit=True) as conn:
        while True:
            row = conn.execute("SELECT coalesce(sum(total), 0) FROM event_rollups").fetchone()
            stored = (int(row[0]) if row else 0) - before
            if stored >= accepted:
                break
            time.sleep(0.5)
    loaded = time.perf_counter() - started
    print(f"loaded {accepted} events in {loaded:.1f} s ({accepted / loaded:,.0f} events/s end to end; "
          f"posting took {posting:.1f} s, {accepted / posting:,.0f} events/s)", flush=True)  # fmt: skip


GROUPINGS = {
    "hour": "(floor(extract(epoch FROM ts) / 3600) * 3600)::int8",
    "day": "(floor(extract(epoch FROM ts) / 86400) * 86400)::int8",
    "channel": "channel",
}


def expected_groups(
    conn: psycopg.Connection[Any], name: str, start: int, stop: int, group_by: str
) -> list[dict[str, object]]:
    """The groups of one answer, computed by SQL over the raw rows."""
    key = GROUPINGS[group_by]
    rows = conn.execute(
        f"SELECT {key}, count(*), count(DISTINCT user_id) FROM events WHERE event_name = %s"
        f" AND ts >= to_timestamp(%s) AND ts < to_timestamp(%s) GROUP BY 1 ORDER BY 1",
        (name, start, stop),
    ).fetchall()
    return [{"key": k, "total_events": total, "unique_users": users} for k, total, users in rows]


def timed_query(port: int, params: dict[str, object], rounds: int) -> tuple[list[float], dict[str, object]]:
    times = []
    answer: dict[str, object] = {}
    for _ in range(rounds):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        started = time.perf_counter()
        conn.request("GET", "/metrics?" + urlencode(params))
        response = conn.getresponse()
        body = response.read()
        times.append((time.perf_counter() - started) * 1000)
        conn.close()
        assert response.status == 200, body
        answer = json.loads(body)
    return times, answer


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--days", type=int, default=30)
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--dsn", default="", help="use this PostgreSQL (its events tables grow) instead of a new one")
    parser.add_argument("--port", type=int, default=0, help="the service's port (default: a free one)")
    parser.add_argument("--pg-port", type=int, default=0, help="the throw-away PostgreSQL's port (default: a free one)")
    parser.add_argument(
        "--first-seed", type=int, default=0, help="seed of the first client: a later load into the same --dsn must"
        " start past the earlier one's seeds, or its event_ids repeat and are dropped as duplicates",
    )  # fmt: skip
    parser.add_argument("--skip-load", action="store_true", help="only time the queries (over what --dsn holds)")
    args = parser.parse_args()

    with contextlib.ExitStack() as stack:
        dsn = args.dsn or stack.enter_context(temporary_postgres("fastcount-bench-events-", args.pg_port)).dsn
        port = args.port or free_port()
        server = subprocess.Popen(
            [sys.executable, "-m", "fastcount", "serve", "--host", "127.0.0.1", "--port", str(port), "--dsn", dsn,
             "--workers", str(args.workers), "--admin-port", "0", "--max-body", str(1 << 20), "--log-level", "warning"],
            cwd=ROOT,
        )  # fmt: skip
        stack.callback(lambda: (server.send_signal(signal.SIGTERM), server.wait(120)))
        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                break
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.1)

        end = int(time.time()) - 60
        span = args.days * 86400 - 3600
        if not args.skip_load:
            load(dsn, port, args, end, span)

        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("VACUUM ANALYZE event_rollups")
            conn.execute("ANALYZE events")
            sizes = conn.execute(
                "SELECT pg_size_pretty(pg_total_relation_size('event_rollups')),"
                " (SELECT pg_size_pretty(sum(pg_total_relation_size(inhrelid))) FROM pg_inherits"
                "  WHERE inhparent = 'events'::regclass)"
            ).fetchone()
            print(f"rollups {sizes[0] if sizes else '?'}, raw events {sizes[1] if sizes else '?'}")
            busiest = NAMES[0]
            # The whole range stored, on hour boundaries (answered from the rollups alone).
            row = conn.execute("SELECT extract(epoch FROM min(ts))::int8, extract(epoch FROM max(ts))::int8"
                               " FROM events WHERE event_name = %s", (busiest,)).fetchone()  # fmt: skip
            assert row is not None and row[0] is not None, "nothing stored"
            start, stop = row[0] // 3600 * 3600, row[1] // 3600 * 3600 + 3600
            truth = conn.execute(
                "SELECT count(*), count(DISTINCT user_id) FROM events WHERE event_name = %s AND ts >= to_timestamp(%s)"
                " AND ts < to_timestamp(%s)",
                (busiest, start, stop),
            ).fetchone()
            assert truth is not None
            group_truth = {group_by: expected_groups(conn, busiest, start, stop, group_by) for group_by in GROUPINGS}
        print(f"{busiest}: {truth[0]} events, {truth[1]} distinct users over {(stop - start) / 86400:.1f} days"
              " (SQL over raw rows)")  # fmt: skip
        for group_by in ("hour", "day", "channel", ""):
            params: dict[str, object] = {"event_name": busiest, "from": start, "to": stop}
            if group_by:
                params["group_by"] = group_by
            times, answer = timed_query(port, params, args.rounds)
            exact = (answer["total_events"], answer["unique_users"]) == (truth[0], truth[1])
            if group_by:  # every group too: key, events and distinct users
                exact = exact and answer["groups"] == group_truth[group_by]
            else:
                exact = exact and "groups" not in answer
            groups = len(answer.get("groups", []))  # type: ignore[arg-type]
            print(f"group_by={group_by or 'none':8} groups={groups:4} median {statistics.median(times):6.1f} ms"
                  f"  min {min(times):6.1f} ms  max {max(times):6.1f} ms  exact={exact}")  # fmt: skip
            assert exact, answer
        # Hour-aligned ranges use rollups alone; this one also reads the raw rows of two partial hours.
        unaligned = {"event_name": busiest, "from": start + 1234, "to": stop - 1234, "group_by": "hour"}
        times, answer = timed_query(port, unaligned, args.rounds)
        with psycopg.connect(dsn, autocommit=True) as conn:
            want = expected_groups(conn, busiest, start + 1234, stop - 1234, "hour")
        exact = answer["groups"] == want and answer["total_events"] == sum(g["total_events"] for g in want)  # type: ignore[misc]
        print(f"unaligned from/to by hour: median {statistics.median(times):6.1f} ms  min {min(times):6.1f} ms"
              f"  max {max(times):6.1f} ms  exact={exact}")  # fmt: skip
        assert exact, answer
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    sys.exit(main())
