"""How a batch should reach PostgreSQL: one unnest() upsert, COPY into a staging table and one merge, or one upsert
from one JSON parameter (json_each_text), or COPY of JSON parts into a staging table and one merge (what
fastcount/features/increment.py uses).

For each batch size it times each method inside a transaction, as the flusher runs them, on the insert path (new
keys) and the update path (existing keys), against a private embedded PostgreSQL with default durability: wall time,
this process's CPU, and the CPU of the PostgreSQL backend serving it (from /proc: what a flush costs the machine's
other cores, e.g. wrk's in bench/run.py). How long each holds the event loop is bench/loop_stalls.py's business.

    python bench/flush_methods.py [--repeat 5]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from run import cpu_seconds  # noqa: E402 (bench/run.py: this directory is on the path of a script run from it)

from fastcount.features.increment import SCHEMA, _dumps, upsert_from_json_parts  # noqa: E402
from fastcount.store.database import connect, migrate_async  # noqa: E402
from fastcount.store.embedded import temporary_postgres  # noqa: E402

Method = Callable[[Any, dict[str, int]], Awaitable[None]]
SIZES = (10, 100, 1_000, 5_000, 10_000, 50_000)
UPSERT_FROM_JSON = """
    INSERT INTO counters AS c (key, value, updated_at)
    SELECT key, value::bigint, now() FROM json_each_text(%s::json) AS batch(key, value)
    ORDER BY key COLLATE "C"
    ON CONFLICT (key) DO UPDATE SET value = c.value + EXCLUDED.value, updated_at = EXCLUDED.updated_at
"""
UPSERT_FROM_ARRAYS = """
    INSERT INTO counters AS c (key, value, updated_at)
    SELECT key, value, now() FROM unnest(%s::text[], %s::bigint[]) AS batch(key, value)
    ORDER BY key COLLATE "C"
    ON CONFLICT (key) DO UPDATE SET value = c.value + EXCLUDED.value, updated_at = EXCLUDED.updated_at
"""
CREATE_STAGING = """
    CREATE TEMP TABLE IF NOT EXISTS fastcount_increment_staging (key text NOT NULL, value bigint NOT NULL)
    ON COMMIT DELETE ROWS
"""
UPSERT_FROM_STAGING = """
    INSERT INTO counters AS c (key, value, updated_at)
    SELECT key, value, now() FROM fastcount_increment_staging
    ORDER BY key COLLATE "C"
    ON CONFLICT (key) DO UPDATE SET value = c.value + EXCLUDED.value, updated_at = EXCLUDED.updated_at
"""


async def upsert_with_unnest(conn: Any, batch: dict[str, int]) -> None:
    """What batches under 2,000 keys used before the JSON upsert."""
    await conn.execute(UPSERT_FROM_ARRAYS, (list(batch), list(batch.values())))


async def upsert_with_copy(conn: Any, batch: dict[str, int]) -> None:
    """What larger batches used before the JSON upsert."""
    await conn.execute(CREATE_STAGING)
    async with conn.cursor().copy("COPY fastcount_increment_staging (key, value) FROM STDIN") as copy:
        for row in batch.items():
            await copy.write_row(row)
    await conn.execute(UPSERT_FROM_STAGING)


async def upsert_with_json(conn: Any, batch: dict[str, int]) -> None:
    """The whole batch as one JSON parameter (one statement; its send held the loop ~1.5-2 ms at 50,000 keys)."""
    await conn.execute(UPSERT_FROM_JSON, (_dumps(batch).decode(),))


METHODS: dict[str, Method] = {
    "unnest": upsert_with_unnest,
    "copy": upsert_with_copy,
    "json": upsert_with_json,
    "jsonparts": upsert_from_json_parts,  # what fastcount uses
}


async def timed(conn: Any, backend: int, method: Method, batch: dict[str, int]) -> tuple[float, float, float]:
    """(wall seconds, this process's CPU seconds, the PostgreSQL backend's CPU seconds): the second is what a worker
    pays off its request budget; the third what PostgreSQL pays (at 10 ms resolution: read medians of many)."""
    started, cpu_started, backend_started = time.perf_counter(), time.process_time(), cpu_seconds([backend])
    async with conn.transaction():
        await method(conn, batch)
    return time.perf_counter() - started, time.process_time() - cpu_started, cpu_seconds([backend]) - backend_started


async def measure(dsn: str, repeat: int) -> None:
    conn = await connect(dsn)
    await migrate_async(conn, SCHEMA)
    backend = (await (await conn.execute("SELECT pg_backend_pid()")).fetchone())[0]
    print(f"{'keys':>7} {'path':7}" + "".join(f" {name + ' ms':>10} {'cpu':>6} {'pg cpu':>6}" for name in METHODS))
    for size in SIZES:
        for path in ("insert", "update"):
            results: dict[str, list[tuple[float, float, float]]] = {name: [] for name in METHODS}
            for _ in range(repeat):
                for name, method in METHODS.items():  # alternate: drift hits every method alike
                    await conn.execute("TRUNCATE counters")
                    batch = {f"bench-{size}-{i:08d}": 1 for i in range(size)}
                    if path == "update":
                        await timed(conn, backend, upsert_from_json_parts, batch)
                    results[name].append(await timed(conn, backend, method, batch))
            line = f"{size:>7} {path:7}"
            for name in METHODS:
                wall, cpu, pg_cpu = (statistics.median(column) for column in zip(*results[name], strict=True))
                line += f" {wall * 1e3:>10.2f} {cpu * 1e3:>6.1f} {pg_cpu * 1e3:>6.0f}"
            print(line, flush=True)
    await conn.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    with temporary_postgres("fastcount-flush-bench-") as database:
        asyncio.run(measure(database.dsn, args.repeat))


if __name__ == "__main__":
    main()
