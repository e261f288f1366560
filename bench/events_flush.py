"""Events flush, alone: write batches of generated events with the feature's own `write_batch` into a throw-away
PostgreSQL and time every statement, without HTTP or ingestion beside it (what one worker's flush can write).

    python bench/events_flush.py --batches 20 --batch 50000 --span 2592000   # a 30-day backfill: rollups' worst case
    python bench/events_flush.py --batches 10 --batch 50000 --span 3600      # live traffic: the last hour
    python bench/events_flush.py --batches 10 --batch 50000 --span 3600 --preload-users 4000000  # a large user base
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import random
import sys
import time
from pathlib import Path
from typing import Any

import psycopg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fastcount.app import schema  # noqa: E402
from fastcount.features.events import store  # noqa: E402
from fastcount.features.events.validation import Clock, Event, check_event  # noqa: E402
from fastcount.store.database import migrate_dsn  # noqa: E402
from fastcount.store.embedded import temporary_postgres  # noqa: E402

NAMES = [f"event{rank:02d}" for rank in range(1, 51)]
WEIGHTS = [1 / rank for rank in range(1, 51)]
CHANNELS = ["web", "mobile_app", "api", "email", "partner"]
USERS = 200_000
statement_seconds: dict[str, float] = collections.defaultdict(float)


class TimedCursor(psycopg.AsyncCursor[Any]):
    async def execute(self, query: Any, params: Any = None, **options: Any) -> TimedCursor:
        started = time.perf_counter()
        await super().execute(query, params, **options)
        statement_seconds[" ".join(str(query).split())[:48]] += time.perf_counter() - started
        return self


def batch_of(rng: random.Random, size: int, end: int, span: int, seed: int) -> dict[tuple[int, bytes], Event]:
    clock = Clock(None, 5.0, 0)
    names = rng.choices(NAMES, WEIGHTS, k=size)
    batch = {}
    for i in range(size):
        identity, event = check_event(
            {"event_name": names[i], "channel": rng.choice(CHANNELS), "user_id": f"user{rng.randrange(USERS)}",
             "timestamp": end - rng.randrange(span), "event_id": f"{seed}-{i}"},
            clock,
        )  # fmt: skip
        batch[(event["timestamp"] // store.DAY, identity)] = event
    return batch


async def run(args: argparse.Namespace) -> None:
    with temporary_postgres("fastcount-bench-flush-", args.pg_port) as database:
        await migrate_dsn(database.dsn, schema())
        if args.preload_users:  # a database that has seen many users (the batches' own are among them)
            async with await psycopg.AsyncConnection.connect(database.dsn, autocommit=True) as setup:
                await setup.execute(
                    "INSERT INTO event_users (user_id) SELECT 'user' || g FROM generate_series(0, %s - 1) AS g",
                    (args.preload_users,),
                )
                await setup.execute("VACUUM ANALYZE event_users")
        conn = await psycopg.AsyncConnection.connect(database.dsn, cursor_factory=TimedCursor)
        rng = random.Random(1)
        end = int(time.time())
        writing = 0.0
        for seed in range(args.batches):
            batch = batch_of(rng, args.batch, end, args.span, seed)
            started = time.perf_counter()
            async with conn.transaction():
                await store.write_batch(conn, batch)
            took = time.perf_counter() - started
            writing += took
            print(f"batch {seed}: {len(batch)} events in {took * 1000:.0f} ms ({len(batch) / took:,.0f} events/s)")
        await conn.close()
    events = args.batches * args.batch
    print(f"{events} events in {writing:.1f} s: {events / writing:,.0f} events/s; by statement (the rest is Python):")
    for statement, seconds in sorted(statement_seconds.items(), key=lambda item: -item[1]):
        print(f"  {seconds:7.2f} s  {statement}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--batch", type=int, default=50_000)
    parser.add_argument("--span", type=int, default=30 * 86_400 - 3600, help="seconds the timestamps spread over")
    parser.add_argument("--preload-users", type=int, default=0, help="users numbered before the first batch")
    parser.add_argument("--pg-port", type=int, default=0, help="the throw-away PostgreSQL's port (default: a free one)")
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
