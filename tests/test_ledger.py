"""The flush ledger is pruned as a lane goes: a writer deletes its own rows older than its last committed batch, so
the ledger stays small, yet still refuses a replay of the batch it committed last, and never touches another
writer's rows (a dead worker's batches may still be recovered under them)."""

from __future__ import annotations

import asyncio

import pytest

from fastcount.features.increment import PendingCounts
from fastcount.observability.stats import WorkerStats
from fastcount.store import flusher as flusher_module
from fastcount.store.flusher import Flusher, InFlight

from conftest import Database


def ledger(database: Database, writer: str) -> list[int]:
    rows = database.query("SELECT seq FROM fastcount_batches WHERE writer = %s ORDER BY seq", (writer,))
    return [int(seq) for (seq,) in rows]  # type: ignore[call-overload]


@pytest.mark.parametrize("prune_every", [0.0, 3600.0])
def test_a_lane_prunes_its_own_older_batches_and_still_refuses_its_last_one(
    database: Database, prefix: str, monkeypatch: pytest.MonkeyPatch, prune_every: float
) -> None:
    monkeypatch.setattr(flusher_module, "PRUNE_EVERY_SECONDS", prune_every)  # 0: prune after every batch
    other = f"other/{prefix}/increment"
    database.query("INSERT INTO fastcount_batches (writer, seq, keys, total) VALUES (%s, 1, 1, 1)", (other,))
    key = prefix + "k"

    async def scenario() -> tuple[list[int], bool]:
        counts = PendingCounts(1000, 1000)
        flusher = Flusher(database.dsn, [counts], 600, f"test/{prefix}", WorkerStats())
        lane = flusher.lanes["increment"]
        try:
            for _ in range(5):
                counts.add_all([(key, 1)], b"{}")
                assert await lane.flush_once() == (True, True)
            kept = ledger(database, lane.writer)
            # The batch committed last, replayed (as after an unknown outcome): the ledger must still refuse it.
            written = await lane._write(InFlight(lane.writer, 5, {key: 1}, 1, 1))
            return kept, written
        finally:
            await lane._close()

    kept, written = asyncio.run(scenario())
    assert kept == ([5] if prune_every == 0 else [1, 2, 3, 4, 5])
    assert written, "a refused duplicate is a success, not a failure to retry"
    assert database.counts(prefix) == {key: 5}, "the replayed batch did not count again"
    assert ledger(database, other) == [1], "another writer's rows are not ours to prune"
