"""The crash journal on its own: what a dead worker's memfd gives back at each point of a flush."""

from __future__ import annotations

import os

import orjson

from fastcount.features.increment import SNAPSHOT_MARK, PendingCounts
from fastcount.store.journal import Journal, journal_size, recover

REGION = 1 << 16


def new_journal(writer: str = "host/w0/1/abc/increment") -> tuple[int, Journal]:
    fd = os.memfd_create("test-journal")
    os.ftruncate(fd, journal_size(REGION))
    return fd, Journal(fd, writer)


def body(key: str, value: int) -> bytes:
    return orjson.dumps({"key": key, "value": value})


def test_pending_records_come_back_under_the_next_seq() -> None:
    fd, journal = new_journal()
    for value in (1, 2, 3):
        assert journal.append(body("a", value))
    [batch] = recover(fd)
    assert (batch.writer, batch.seq) == ("host/w0/1/abc/increment", 1)
    assert PendingCounts.replay(batch.records) == {"a": 6}


def test_batch_in_flight_keeps_its_seq_and_later_records_get_the_next() -> None:
    fd, journal = new_journal()
    journal.append(body("a", 1))
    journal.take(7)
    journal.append(body("b", 2))
    in_flight, pending = recover(fd)
    assert (in_flight.seq, PendingCounts.replay(in_flight.records)) == (7, {"a": 1})
    assert (pending.seq, PendingCounts.replay(pending.records)) == (8, {"b": 2})


def test_acknowledged_batch_is_gone_and_its_region_reused_clean() -> None:
    fd, journal = new_journal()
    journal.append(body("a", 1))
    journal.take(1)
    journal.acknowledge()
    assert recover(fd) == []
    for seq in range(2, 6):  # rotate through every region several times
        journal.append(body("k", seq))
        journal.take(seq)
        journal.acknowledge()
    journal.append(body("z", 9))
    [pending] = recover(fd)
    assert PendingCounts.replay(pending.records) == {"z": 9}


def test_record_cut_short_by_a_kill_is_skipped() -> None:
    fd, journal = new_journal()
    journal.append(body("a", 1))
    torn = body("b", 2)[:-3]
    journal.mm[journal.pos : journal.pos + len(torn)] = torn  # what a kill in the middle of a copy leaves
    [pending] = recover(fd)
    assert PendingCounts.replay(pending.records) == {"a": 1}


def test_full_region_is_compacted_into_one_summing_record() -> None:
    fd, journal = new_journal()
    counts: dict[str, int] = {}
    for i in range(REGION):
        key = f"key-{i % 50}"
        if not journal.append(body(key, 1)):
            break
        counts[key] = counts.get(key, 0) + 1
    assert sum(counts.values()) > 1000, "the region filled up"
    assert journal.compact(SNAPSHOT_MARK + orjson.dumps(counts))
    assert journal.append(body("after", 1))
    [pending] = recover(fd)
    assert PendingCounts.replay(pending.records) == {**counts, "after": 1}


def test_journal_of_a_worker_that_never_started_recovers_nothing() -> None:
    fd = os.memfd_create("test-journal")
    os.ftruncate(fd, journal_size(REGION))
    assert recover(fd) == []
