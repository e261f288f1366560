"""How a batch should reach PostgreSQL: one unnest() upsert, or COPY into a staging table and one merge.

For each batch size it times both methods inside a transaction, as the flusher runs them, on the insert path (new
keys) and the update path (existing keys), against a private embedded PostgreSQL with default durability. The
crossover decides COPY_THRESHOLD in fastcount/features/increment.py.

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

from fastcount.features.increment import upsert_with_copy, upsert_with_unnest  # noqa: E402
from fastcount.store.database import connect, migrate_async  # noqa: E402
from fastcount.store.embedded import temporary_postgres  # noqa: E402

Method = Callable[[Any, dict[str, int]], Awaitable[None]]
SIZES = (10, 100, 1_000, 5_000, 10_000, 50_000)


async def timed(conn: Any, method: Method, batch: dict[str, int]) -> tuple[float, float]:
    """(wall seconds, this process's CPU seconds): the second is what a worker pays, off its request budget."""
    started, cpu_started = time.perf_counter(), time.process_time()
    async with conn.transaction():
        await method(conn, batch)
    return time.perf_counter() - started, time.process_time() - cpu_started


async def measure(dsn: str, repeat: int) -> None:
    conn = await connect(dsn)
    await migrate_async(conn)
    print(
        f"{'keys':>7} {'path':7} {'unnest ms':>10} {'copy ms':>10} {'unnest rows/s':>14} {'copy rows/s':>12}"
        f" {'unnest cpu ms':>14} {'copy cpu ms':>12}"
    )
    for size in SIZES:
        for path in ("insert", "update"):
            results: dict[str, list[tuple[float, float]]] = {"unnest": [], "copy": []}
            for _ in range(repeat):
                for name, method in (("unnest", upsert_with_unnest), ("copy", upsert_with_copy)):
                    await conn.execute("TRUNCATE counters")
                    batch = {f"bench-{size}-{i:08d}": 1 for i in range(size)}
                    if path == "update":
                        await timed(conn, upsert_with_unnest, batch)
                    results[name].append(await timed(conn, method, batch))
            unnest, copy = (statistics.median(wall for wall, _ in results[name]) for name in ("unnest", "copy"))
            unnest_cpu, copy_cpu = (statistics.median(cpu for _, cpu in results[name]) for name in ("unnest", "copy"))
            print(
                f"{size:>7} {path:7} {unnest * 1e3:>10.2f} {copy * 1e3:>10.2f} "
                f"{size / unnest:>14,.0f} {size / copy:>12,.0f} {unnest_cpu * 1e3:>14.2f} {copy_cpu * 1e3:>12.2f}",
                flush=True,
            )
    await conn.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    with temporary_postgres("fastcount-flush-bench-") as database:
        asyncio.run(measure(database.dsn, args.repeat))


if __name__ == "__main__":
    main()
