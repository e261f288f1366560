"""The crash journal on its own: what a dead worker's memfd gives back at each point of a flush."""

from __future__ import annotations

import asyncio
import os

import orjson

from fastcount.features.increment import PendingCounts
from fastcount.store.journal import JournalFile, recover

REGION = 1 << 16
WRITER = "host/w0/1/abc"


def new_journal(sections: tuple[str, ...] = ("increment",)) -> tuple[int, JournalFile]:
    fd = os.memfd_create("test-journal")
    return fd, JournalFile(fd, REGION, sections, lambda name: f"{WRITER}/{name}")


def body(key: str, value: int) -> bytes:
    return orjson.dumps({"key": key, "value": value})


def counts() -> PendingCounts:
    return PendingCounts(1000, 1000)


def test_pending_records_come_back_under_the_next_seq() -> None:
    fd, file = new_journal()
    journal = file.sections["increment"]
    for value in (1, 2, 3):
        assert journal.append(body("a", value))
    [batch] = recover(fd)
    assert (batch.section, batch.writer, batch.seq) == ("increment", f"{WRITER}/increment", 1)
    assert counts().replay(batch.records) == {"a": 6}


def test_batch_in_flight_keeps_its_seq_and_later_records_get_the_next() -> None:
    fd, file = new_journal()
    journal = file.sections["increment"]
    journal.append(body("a", 1))
    journal.take(7)
    journal.append(body("b", 2))
    in_flight, pending = recover(fd)
    assert (in_flight.seq, counts().replay(in_flight.records)) == (7, {"a": 1})
    assert (pending.seq, counts().replay(pending.records)) == (8, {"b": 2})


def test_acknowledged_batch_is_gone_and_its_region_reused_clean() -> None:
    fd, file = new_journal()
    journal = file.sections["increment"]
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
    assert counts().replay(pending.records) == {"z": 9}


def test_regions_released_step_by_step_in_a_running_loop_are_reused_clean() -> None:
    fd, file = new_journal()
    journal = file.sections["increment"]

    async def rotate() -> None:
        for seq in range(1, 8):
            for _ in range(REGION // 64):  # most of a region: several release steps' worth of pages
                journal.append(body("k" * 40, seq))
            journal.take(seq)
            journal.acknowledge()
            if seq % 2:  # two page-sized steps only: the next take finds a region half zeroed
                assert journal.releasing is not None
                journal.releasing.cancel()
                steps = asyncio.ensure_future(journal.release(step=4096))
                await asyncio.sleep(0)
                await asyncio.sleep(0)
                assert not steps.done()
            elif journal.releasing is not None:
                await journal.releasing

    asyncio.run(rotate())
    journal.append(body("z", 9))
    [pending] = recover(fd)
    assert pending.records == [body("z", 9)]


def test_long_record_then_short_ones_leave_no_stale_bytes_after_reuse() -> None:
    fd, file = new_journal()
    journal = file.sections["increment"]
    journal.append(body("x" * 200, 1))
    journal.take(1)
    journal.acknowledge()
    journal.take(2)  # the next region, then the first again
    journal.acknowledge()
    journal.take(3)
    journal.acknowledge()
    journal.append(body("y", 1))
    [pending] = recover(fd)
    assert pending.records == [body("y", 1)]


def test_record_cut_short_by_a_kill_is_not_read() -> None:
    fd, file = new_journal()
    journal = file.sections["increment"]
    journal.append(body("a", 1))
    torn = body("b", 2)
    # What a kill in the middle of an append leaves: the body (or part of it) written, its length not yet.
    journal.mm[journal.pos + 4 : journal.pos + 4 + len(torn) - 3] = torn[:-3]
    [pending] = recover(fd)
    assert counts().replay(pending.records) == {"a": 1}


def test_full_region_is_compacted_into_one_summing_record() -> None:
    fd, file = new_journal()
    buffer = counts()
    buffer.journal = file.sections["increment"]
    expected: dict[str, int] = {}
    appended = 0
    while appended < REGION:  # well past one region's worth of records: compaction must kick in
        key = f"key-{appended % 50}"
        assert buffer.add_all([(key, 1)], body(key, 1)).status == 202
        expected[key] = expected.get(key, 0) + 1
        appended += 1
    assert buffer.journal.used_bytes() < REGION
    [pending] = recover(fd)
    assert buffer.replay(pending.records) == expected


def test_sections_are_recovered_each_under_its_own_name_and_writer() -> None:
    fd, file = new_journal(("increment", "other"))
    file.sections["increment"].append(body("a", 1))
    file.sections["other"].append(b"\x00\x01binary\x00")
    batches = {batch.section: batch for batch in recover(fd)}
    assert batches["increment"].writer == f"{WRITER}/increment"
    assert batches["other"].writer == f"{WRITER}/other"
    assert batches["other"].records == [b"\x00\x01binary\x00"], "records are length-prefixed: any byte may occur"


def test_journal_of_a_worker_that_never_started_recovers_nothing() -> None:
    fd = os.memfd_create("test-journal")
    os.ftruncate(fd, 1 << 20)
    assert recover(fd) == []


def test_an_unreadable_record_is_skipped_and_counts_nothing_else_twice() -> None:
    # The framing leaves no torn records, but a record that does not decode (a bug, a disk error) must cost only
    # itself: the records around it count once each.
    records = [body("a", 1), b'{"key": "a", "val', body("b", 2), b"\xff", body("a", 4)]
    assert counts().replay(records) == {"a": 5, "b": 2}
    assert counts().replay([b"not json", body("c", 3)]) == {"c": 3}


def test_a_snapshot_that_did_not_fit_is_not_made_again_until_the_next_take() -> None:
    _, file = new_journal()
    journal = file.sections["increment"]
    made: list[int] = []

    def too_big() -> bytes:
        made.append(1)
        return b"S" + b"x" * REGION

    for seq in (1, 2):
        while journal.append(body("a", 1)):
            pass
        for _ in range(5):  # five requests meet the full region: one snapshot is made, not five
            assert not journal.compact(too_big)
        assert len(made) == seq
        journal.take(seq)  # a flush took what was pending: a snapshot may fit again


def test_a_record_must_leave_room_for_the_zero_length_that_ends_its_region() -> None:
    # A record that ran to the region's last byte would leave no zero length behind it, and one past it would write
    # into the next region (found by mutation testing).
    fd, file = new_journal(("increment", "other"))
    journal = file.sections["increment"]
    assert not journal.append(b"x" * (REGION - 4)), "record + its length fill the region: no room for the end mark"
    assert journal.append(b"x" * (REGION - 8))
    assert journal.used_bytes() == REGION - 4
    assert not journal.append(b"")
    file.sections["other"].append(b"next section")
    batches = {batch.section: batch.records for batch in recover(fd)}
    assert batches == {"increment": [b"x" * (REGION - 8)], "other": [b"next section"]}


def test_used_bytes_counts_the_active_region_only() -> None:
    _, file = new_journal()
    journal = file.sections["increment"]
    assert journal.used_bytes() == 0
    journal.append(body("a", 1))
    journal.append(body("b", 22))
    assert journal.used_bytes() == 8 + len(body("a", 1)) + len(body("b", 22))
    journal.take(1)
    assert journal.used_bytes() == 0, "the batch taken is in flight, not in the active region"


def test_a_preamble_starts_every_region_and_a_region_it_no_longer_fits_is_sealed() -> None:
    """Rule 3 (verve's window: its id records do not carry one). Every region starts with the preamble, a compaction's
    too; a snapshot that fits only without it is refused, not cut off; where a new preamble fits nowhere, no later
    record may land after the old one (found by mutation testing)."""
    fd, file = new_journal()
    journal = file.sections["increment"]
    room = REGION - 4  # a region's bytes for records: the last 4 are the zero length that ends it
    assert journal.set_preamble(b"W1", lambda: b"S") and journal.append(b"a")
    journal.take(1)
    assert journal.append(b"b")
    assert [batch.records for batch in recover(fd)] == [[b"W1", b"a"], [b"W1", b"b"]]
    journal.acknowledge()

    assert not journal.compact(lambda: b"S" * (room - (4 + 2) - 4 + 1)), "one byte too many beside the preamble"
    journal.take(2)
    journal.acknowledge()
    assert journal.compact(lambda: b"S" * (room - (4 + 2) - 4))
    assert [batch.records for batch in recover(fd)] == [[b"W1", b"S" * (room - 10)]]

    journal.take(3)
    journal.acknowledge()
    assert journal.append(b"x" * (room - (4 + 2) - 4 - 8))  # 8 bytes left: a 1-byte record fits, a 9-byte one not
    assert not journal.set_preamble(b"W2-long", lambda: b"S" * REGION)
    assert not journal.append(b"c"), "sealed: 'c' would be read as W1's"
    assert [batch.records[0] for batch in recover(fd)] == [b"W1"]
    journal.take(4)
    assert journal.append(b"d")
    assert [batch.records[0] for batch in recover(fd)] == [b"W1", b"W2-long"], "the next region starts with the new one"


def test_preambles_alone_are_nothing_to_recover_and_a_compacting_one_is_written_once() -> None:
    """A worker that left only preambles (every id it answered committed) leaves nothing: the master keeps no journal
    for it and starts no recovery (found in review)."""
    fd, file = new_journal()
    journal = file.sections["increment"]
    assert journal.set_preamble(b"W1", lambda: b"S") and recover(fd) == []
    journal.append(b"a")
    journal.take(1)
    journal.acknowledge()
    assert journal.set_preamble(b"W2", lambda: b"S") and recover(fd) == []
    assert journal.append(b"b")
    assert [batch.records for batch in recover(fd)] == [[b"W1", b"W2", b"b"]]
    for size in (1000, 1):
        while journal.append(b"x" * size):
            pass
    assert journal.set_preamble(b"W3", lambda: b"S")  # no room: compacted, the new region starts with it, once
    assert [batch.records for batch in recover(fd)] == [[b"W3", b"S"]]
