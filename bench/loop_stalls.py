"""How long fastcount's own once-a-second work holds a worker's event loop, piece by piece.

Each scenario runs the real code (a flush through a buffer's write path into a private PostgreSQL, a journal
region released, the stats snapshot, a full journal compacted) on a uvloop loop beside a callback that re-queues
itself on every loop iteration, and reports the longest gap between two of its runs: the longest time one piece of
work held the loop, as CPU time of this thread (own work; what the 1 ms target is about) and wall clock (preemption
included, noisy on a shared machine). Median of --repeat runs of each scenario.

    python bench/loop_stalls.py [--repeat 5] [--only flush,journal,stats,compact]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import uvloop

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fastcount.features.increment import SCHEMA, PendingCounts  # noqa: E402
from fastcount.observability.stats import WorkerStats  # noqa: E402
from fastcount.store.database import connect, migrate_async  # noqa: E402
from fastcount.store.embedded import temporary_postgres  # noqa: E402
from fastcount.store.journal import Journal, JournalFile  # noqa: E402

Scenario = Callable[[], Awaitable[object]]


class Spinner:
    """A callback that re-queues itself with call_soon runs once per loop iteration, so the longest gap between two
    of its runs is the longest the loop was held by anything else: finer than the 1 ms timer of the worker's probe
    (which cannot see a stall shorter than its period), at the price of a busy loop (a benchmark only)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.last = time.perf_counter()
        self.last_cpu = time.thread_time()
        self.longest = self.longest_cpu = 0.0
        self.running = True
        loop.call_soon(self.spin)

    def spin(self) -> None:
        now, cpu = time.perf_counter(), time.thread_time()
        self.longest = max(self.longest, now - self.last)
        self.longest_cpu = max(self.longest_cpu, cpu - self.last_cpu)
        self.last, self.last_cpu = now, cpu
        if self.running:
            self.loop.call_soon(self.spin)


async def stall_of(work: Scenario, prepare: Callable[[], Awaitable[object]] | None = None) -> tuple[float, float]:
    """(longest loop hold on the CPU, longest wall-clock hold) in ms while `work` runs."""
    if prepare is not None:
        await prepare()
    gc.collect()
    spinner = Spinner(asyncio.get_running_loop())
    await asyncio.sleep(0.002)
    spinner.longest = spinner.longest_cpu = 0.0
    await work()
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    spinner.running = False
    return spinner.longest_cpu * 1000, spinner.longest * 1000


async def report(
    name: str, repeat: int, work: Scenario, prepare: Callable[[], Awaitable[object]] | None = None
) -> None:
    runs = [await stall_of(work, prepare) for _ in range(repeat)]
    own = statistics.median(r[0] for r in runs)
    wall = statistics.median(r[1] for r in runs)
    print(f"  {name:52s} own {own:6.2f} ms   wall {wall:6.2f} ms   (own per run: "
          f"{', '.join(f'{r[0]:.2f}' for r in runs)})", flush=True)  # fmt: skip


async def flushes(dsn: str, repeat: int) -> None:
    print("flush of N distinct keys (update path, in one transaction, as a lane writes it):")
    conn = await connect(dsn)
    await migrate_async(conn, SCHEMA)
    buffer = PendingCounts(1_000_000, 50_000)
    for size in (10, 1_000, 1_999, 2_000, 10_000, 50_000):
        batch = {f"stall-{size}-{i:08d}": 1 for i in range(size)}

        async def write(batch: dict[str, int] = batch) -> None:
            async with conn.transaction():
                await buffer.write(conn, batch)

        await write()  # the rows exist: the update path, as in steady state
        await report(f"{size:>6} keys", repeat, write)
    await conn.close()


async def journal(repeat: int) -> None:
    print("releasing a used crash-journal region (take + acknowledge, as a flush does):")
    fd = os.memfd_create("stall-journal")
    try:
        section = JournalFile(fd, 32 << 20, ["increment"], lambda name: name).sections["increment"]
        record = b'{"key":"rnd-1234","value":1}'
        for megabytes in (1, 4, 16, 31):
            count = (megabytes << 20) // (len(record) + 4)

            async def fill(count: int = count) -> None:
                for _ in range(count):
                    section.append(record)
                section.take(1)

            async def release() -> None:
                section.acknowledge()  # the region is zeroed by a task, a step at a time
                if section.releasing is not None:
                    await section.releasing

            await report(f"{megabytes:>6} MiB used", repeat, release, fill)
    finally:
        os.close(fd)


async def stats(repeat: int) -> None:
    print("the per-second stats snapshot (process gauges included), by open file descriptors:")
    worker_stats = WorkerStats()
    held: list[int] = []
    try:
        for fds in (100, 1_000, 10_000):
            while len(held) + 10 < fds:
                held.append(os.open("/dev/null", os.O_RDONLY))

            async def snapshot(fds: int = fds) -> None:
                worker_stats.snapshot({}, {"connections_open": float(fds)})

            await report(f"{fds:>6} fds", repeat, snapshot)
    finally:
        for fd in held:
            os.close(fd)


async def compaction(repeat: int) -> None:
    print("a full journal region (1 MiB) while PostgreSQL is down, so nothing is taken: the snapshot does not fit")
    request = b'{"key":"rnd-000000001","value":1}'
    for keys in (100_000, 1_000_000):
        fd = os.memfd_create("stall-compact")
        try:
            buffer = PendingCounts(2_000_000, 2_000_000)
            journal = JournalFile(fd, 1 << 20, ["increment"], lambda name: name).sections["increment"]
            buffer.journal = journal
            buffer.pending = {f"rnd-{i:09d}": 1 for i in range(keys)}
            seq = iter(range(1, 1_000_000))

            async def fill(journal: Journal = journal, seq: Iterator[int] = seq) -> None:
                journal.take(next(seq))  # a new region, as after a flush
                journal.acknowledge()
                while journal.append(request):
                    pass

            async def first(buffer: PendingCounts = buffer) -> None:
                buffer.journal_append(request)

            async def next_ones(buffer: PendingCounts = buffer) -> None:
                for _ in range(20):  # each on its own loop turn, as a busy worker sees them
                    buffer.journal_append(request)
                    await asyncio.sleep(0)

            await report(f"{keys:>9} pending keys: first request to meet it", repeat, first, fill)
            await report(f"{keys:>9} pending keys: the 20 requests after it", repeat, next_ones)
        finally:
            os.close(fd)


async def main(args: argparse.Namespace) -> None:
    only = set(args.only.split(",")) if args.only else {"flush", "journal", "stats", "compact"}
    print(f"pid {os.getpid()}, {time.strftime('%Y-%m-%d %H:%M')}, median of {args.repeat} runs")
    if "journal" in only:
        await journal(args.repeat)
    if "stats" in only:
        await stats(args.repeat)
    if "compact" in only:
        await compaction(args.repeat)
    if "flush" in only:
        with temporary_postgres("fastcount-stalls-") as database:
            await flushes(database.dsn, args.repeat)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--only", default="")
    uvloop.run(main(parser.parse_args()))
