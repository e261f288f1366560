"""The verve request path and helpers as pure functions: query, id and endpoint parsing, the journal codec, the
callback target checks and URLs. No server, no database."""

from __future__ import annotations

import asyncio
import ipaddress
import os
import random

import pytest

from fastcount.features.verve.accept import (
    FAILED,
    OK,
    OVERLOADED,
    PendingIds,
    parse_endpoint,
    parse_id,
    parse_query,
)
from fastcount.features.verve.callbacks import callback_url, refusal, shown
from fastcount.features.verve.outbox import report_message
from fastcount.features.verve.reporter import Reporter, iso
from fastcount.features.verve.settings import VerveSettings, parse_allow_list
from fastcount.store.journal import JournalFile, recover


def test_query_takes_id_and_endpoint_and_ignores_the_rest() -> None:
    assert parse_query(b"id=5") == (b"5", None, True)
    assert parse_query(b"x=1&id=5&endpoint=http://a/&y") == (b"5", b"http://a/", True)
    assert parse_query(b"idx=5") == (None, None, True)
    assert parse_query(b"") == (None, None, True)
    assert parse_query(b"id=1&id=2")[2] is False
    assert parse_query(b"id=1&endpoint=http://a/&endpoint=http://b/")[2] is False


@pytest.mark.parametrize(
    ("raw", "value"),
    [
        (b"0", 0),
        (b"42", 42),
        (b"-42", -42),
        (b"007", 7),
        (b"9223372036854775807", 2**63 - 1),
        (b"-9223372036854775808", -(2**63)),
    ],
)
def test_ids_in_range_parse(raw: bytes, value: int) -> None:
    assert parse_id(raw) == value


@pytest.mark.parametrize(
    "raw",
    [b"", b"-", b"+5", b" 5", b"5 ", b"1_000", b"1e3", b"0x10", b"1.0", b"9223372036854775808",
     b"-9223372036854775809", b"99999999999999999999", b"%35", "٣".encode(), b"abc"],
)  # fmt: skip
def test_bad_ids_are_refused(raw: bytes) -> None:
    assert parse_id(raw) is None


def test_endpoints() -> None:
    assert parse_endpoint(b"http://example.com/cb") == "http://example.com/cb"
    assert parse_endpoint(b"https%3A%2F%2Fexample.com%2Fcb%3Fa%3D1%26b%3D2") == "https://example.com/cb?a=1&b=2"
    assert parse_endpoint(b"HTTP://Example.com") == "HTTP://Example.com"
    assert parse_endpoint(b"http://h/" + b"a" * (2048 - 9)) is not None
    assert parse_endpoint(b"http://[::1]:8080/x") == "http://[::1]:8080/x"
    assert parse_endpoint(b"http://user@h/x") == "http://user@h/x"
    assert parse_endpoint(b"http%3A%2F%2Fh%2Fa%2525b") == "http://h/a%25b"  # an escaped '%' stays one
    # Refused; the last three hold a broken escape (which unquote would keep as typed: new-user trial).
    for bad in [b"", b"ftp://example.com/", b"example.com/cb", b"http://", b"http:///path", b"http://a b/",
                b"http%3A%2F%2Fa%20b", b"http://a/%00", b"http://a/%ff", b"//example.com", b"javascript:alert(1)",
                b"http://h/" + b"a" * (2048 - 8), b"http://[::1/x", b"http://[zz]/", b"http://@/x", b"http://:80/",
                b"http://a:99999/", b"http://a:x/",
                b"http%3A%2F%2Fh%2F%2", b"http%3A%2F%2Fh%2F%zz", b"http://h/%"]:  # fmt: skip
        assert parse_endpoint(bad) is None, bad


def test_a_buffer_dedups_per_window_bounds_pending_and_replays_its_journal_records() -> None:
    ids = PendingIds(window_seconds=10, max_pending=3, max_endpoints=1, flush_max_keys=100)
    records: list[bytes] = []

    class Recorder:
        def append(self, record: bytes) -> bool:
            records.append(record)
            return True

        def append_or_compact(self, record: bytes, snapshot: object) -> bool:
            return self.append(record)

        def set_preamble(self, record: bytes, snapshot: object) -> bool:
            return self.append(record)

    ids.journal = Recorder()  # type: ignore[assignment]
    assert ids.add(1, "http://a/", 100.0) is OK
    assert ids.add(1, None, 101.0) is OK  # a duplicate: no journal record
    assert ids.add_id(1, b"1", 101.0) is OK  # the same, without an endpoint
    assert ids.add(2, "http://b/", 102.0) is OK  # past max_endpoints: id counted, endpoint dropped
    assert ids.add_id(-1, b"-01", 111.0) is OK  # the next window; its record keeps the digits as they came
    assert ids.add(3, None, 112.0) is OVERLOADED  # three ids pending
    assert ids.add_id(4, b"4", 112.0) is OVERLOADED
    assert (ids.accepted, ids.duplicates, ids.endpoints_dropped, ids.refused) == (3, 2, 1, 2)
    window_110 = b"W" + (110).to_bytes(8, "little")
    assert len(records) == 5 and records[3:] == [window_110, b"-01"], "a window's record, then the digits as they came"
    batch = ids.take()
    assert batch == ({100: [1, 2], 110: [-1]}, {100: ["http://a/"]})
    assert ids.replay(records) == batch
    assert ids.replay([*records[3:], b"1x", b"X"]) == ({110: [-1]}, {}), "not an id, an unknown record"
    assert ids.replay([b"5", window_110, b"6"]) == ({110: [6]}, {}), "an id before any window: unread"
    assert ids.replay([ids.snapshot(), b"R\x01"]) == ({}, {})  # nothing pending now; a torn record is skipped
    assert ids.add(3, None, 112.0) is OVERLOADED  # the taken batch still counts until acknowledged
    ids.acknowledge()
    assert ids.add(3, None, 112.0) is OK and ids.accepted == 4
    assert ids.replay([ids.snapshot()]) == ({110: [3]}, {})
    assert ids.split(batch) == [({100: [1, 2]}, {}), ({110: [-1]}, {100: ["http://a/"]})]
    # halves in id order: written one after the other, they insert in the order every flusher uses (no deadlock)
    assert ids.split(({60: [9, 1, 5, 3]}, {})) == [({60: [1, 3]}, {}), ({60: [5, 9]}, {})]
    assert FAILED.status == 400 and OVERLOADED.status == 503 and OK.body == b"ok"


def test_every_unacknowledged_id_comes_back_from_the_real_journal_in_its_window() -> None:
    """Random requests, window rolls, takes, acknowledgements and (with 4 KiB regions) compactions, some of which do
    not fit, on the real shared-memory journal; then a crash: recovering it gives back every id answered ok as new and
    not acknowledged, each in the window it was answered in (an id record carries no window: the region's preamble and
    the window records do), and nothing that was not answered ok (a new endpoint's record repeats its id: harmless,
    PostgreSQL keeps one)."""
    for seed in range(150):
        rnd = random.Random(seed)
        fd = os.memfd_create("journal")
        try:
            journal = JournalFile(fd, 4096, ["verve"], lambda name: "writer")
            max_pending = rnd.randint(5, 600)
            ids = PendingIds(10, max_pending, 3, rnd.randint(1, max_pending))
            ids.journal = journal.sections["verve"]
            pool = [rnd.randint(-(10**6), 10**6) for _ in range(50)] + [2**63 - 1, -(2**63), 0, -1]
            pending: set[tuple[int, int]] = set()
            in_flight: set[tuple[int, int]] = set()
            answered: set[tuple[int, int]] = set()
            now, seq, taken = 1000.0, 1, False
            for _ in range(rnd.randint(1, 1500)):
                action = rnd.random()
                if action < 0.01:
                    now += rnd.choice([3, 10, 0.001])
                elif action < 0.012 and not taken and ids.take() is not None:
                    ids.journal.take(seq)
                    seq, taken, in_flight, pending = seq + 1, True, pending, set()
                elif action < 0.02 and taken:
                    ids.acknowledge()
                    ids.journal.acknowledge()
                    taken, in_flight = False, set()
                else:
                    ident = rnd.choice(pool)
                    digits = b"%d" % ident
                    if ident >= 0 and len(digits) < 19 and rnd.random() < 0.3:
                        digits = b"0" * rnd.randint(1, 19 - len(digits)) + digits  # as it came: leading zeros
                    before = ids.accepted
                    if rnd.random() < 0.8:
                        ids.add_id(ident, digits, now)
                    else:
                        ids.add(ident, rnd.choice([None, "http://a/", "http://b/" + "x" * 300]), now)
                    if ids.accepted > before:
                        pending.add((ids.window, ident))
                        answered.add((ids.window, ident))
            recovered = set()
            for batch in recover(fd):
                for window, values in ids.replay(batch.records)[0].items():
                    recovered |= {(window, ident) for ident in values}
            assert pending | in_flight <= recovered <= answered, seed
        finally:
            os.close(fd)


def test_refused_callback_targets() -> None:
    everything = parse_allow_list("")
    ip = ipaddress.ip_address
    assert refusal("h", [ip("93.184.216.34")], everything) is None
    assert refusal("h", [ip("169.254.169.254")], everything) is not None
    assert refusal("h", [ip("93.184.216.34"), ip("fe80::1")], everything) is not None  # every address counts
    assert refusal("h", [ip("::ffff:169.254.169.254")], everything) is not None
    assert refusal("h", [], everything) is not None
    for wrapped in ["0.0.0.0", "0.1.2.3", "::", "::ffff:0.0.0.0", "64:ff9b::a9fe:a9fe", "64:ff9b::169.254.169.254",
                    "2002:a9fe:a9fe::1", "::169.254.169.254", "2001:0:4136:e378:8000:63bf:5601:5601",
                    "64:ff9b::6464:64c8"]:  # fmt: skip
        assert refusal("h", [ip(wrapped)], everything) is not None, wrapped
    for allowed_by_default in [
        "127.0.0.1",
        "::1",
        "10.1.2.3",
        "192.168.0.1",
        "64:ff9b::5db8:d822",
        "2002:5db8:d822::1",
    ]:
        assert refusal("h", [ip(allowed_by_default)], everything) is None, allowed_by_default
    allow = parse_allow_list("hooks.example.com, 10.0.0.0/8")
    assert refusal("hooks.example.com", [ip("93.184.216.34")], allow) is None
    assert refusal("other", [ip("10.1.2.3")], allow) is None
    assert refusal("other", [ip("10.1.2.3"), ip("11.0.0.1")], allow) is not None
    assert refusal("hooks.example.com", [ip("169.254.169.254")], allow) is not None  # allowed host, metadata address
    with pytest.raises(ValueError):
        parse_allow_list("10.0.0.0/33")
    with pytest.raises(ValueError):
        VerveSettings(verve_callback_method="put")


def test_callback_urls_and_kafka_messages() -> None:
    assert callback_url("http://a/cb", 5) == "http://a/cb?count=5"
    assert callback_url("http://a/cb?x=1", 5) == "http://a/cb?x=1&count=5"
    assert callback_url("http://a/cb?x=1#frag", 0) == "http://a/cb?x=1&count=0"
    assert callback_url("http://a/cb?", 2) == "http://a/cb?count=2"
    key, value = report_message(1795514700, 60, 48211)
    assert key == b"2026-11-24T10:05:00Z" == iso(1795514700).encode()
    assert value == (
        b'{"window_start":"2026-11-24T10:05:00Z","window_start_unix":1795514700,"window_seconds":60,"unique_ids":48211}'
    )


def test_due_windows_wait_for_the_grace_period(tmp_path: object) -> None:
    reporter = Reporter("me", 60, 1.4, 10.0, False, f"{tmp_path}/verve.log", 3600.0, 86400.0)
    assert reporter.last_due(1201.3) == 1080  # [1140, 1200) closed 1.3 s ago: not yet
    assert reporter.last_due(1201.4) == 1140


def test_forgotten_seen_sets_are_freed_one_per_loop_pass_and_never_pile_up() -> None:
    """The window's seen ids are set aside, not freed at once (that held the loop), and freed one shard per pass of
    the event loop; past one window's worth waiting they are dropped at once, so memory stays bounded."""
    from fastcount.features.verve.accept import SEEN_SHARDS

    async def scenario() -> None:
        ids = PendingIds(window_seconds=10, max_pending=2, max_endpoints=1, flush_max_keys=100)
        assert ids.add_id(1, b"1", 100.0) is OK and ids.add_id(2, b"2", 100.0) is OK
        assert len(ids.retired_seen) == SEEN_SHARDS  # the first window's roll set the (empty) initial shards aside
        await asyncio.sleep(0)
        assert len(ids.retired_seen) == SEEN_SHARDS - 1, "one shard a pass"
        ids.take()
        ids.acknowledge()
        assert ids.add_id(3, b"3", 101.0) is OK  # a third id this window: past max_pending, the seen sets are set aside
        assert len(ids.retired_seen) == 2 * SEEN_SHARDS - 1
        assert ids.add_id(1, b"1", 101.0) is OK and ids.accepted == 4  # 1 is new to this worker's dedup again
        await asyncio.sleep(0)
        assert len(ids.retired_seen) == 2 * SEEN_SHARDS - 2, "still one a pass"
        ids.take()
        ids.acknowledge()
        assert ids.add_id(4, b"4", 111.0) is OK  # a new window with more than a window's worth waiting: dropped
        assert len(ids.retired_seen) == SEEN_SHARDS
        for _ in range(SEEN_SHARDS):
            await asyncio.sleep(0)
        assert ids.retired_seen == [] and not ids.freeing

    asyncio.run(scenario())


def test_the_seen_sets_are_set_aside_past_max_pending_ids_since_the_last_time() -> None:
    ids = PendingIds(window_seconds=10, max_pending=3, max_endpoints=1, flush_max_keys=100)
    assert ids.add_id(1, b"1", 100.0) is OK and ids.add_id(2, b"2", 100.0) is OK
    assert ids.add_id(1, b"1", 111.0) is OK  # a new window, two ids still pending: set aside at 2 accepted
    ids.take()
    ids.acknowledge()
    assert ids.add_id(2, b"2", 111.0) is OK and ids.add_id(3, b"3", 111.0) is OK  # 3 seen this window: all kept
    assert ids.add_id(1, b"1", 111.0) is OK and ids.duplicates == 1
    assert ids.add_id(4, b"4", 111.0) is OK  # a fourth: past max_pending, set aside
    ids.take()
    ids.acknowledge()
    assert ids.add_id(1, b"1", 111.0) is OK and (ids.duplicates, ids.accepted) == (1, 7), "1 is new again"


def test_a_journal_that_takes_nothing_gets_503s_counted_and_nothing_taken() -> None:
    class Full:
        def append(self, record: bytes) -> bool:
            return False

        def append_or_compact(self, record: bytes, snapshot: object) -> bool:
            return False

        def set_preamble(self, record: bytes, snapshot: object) -> bool:
            return False

    ids = PendingIds(window_seconds=10, max_pending=3, max_endpoints=1, flush_max_keys=100)
    ids.journal = Full()  # type: ignore[assignment]
    assert ids.add_id(1, b"1", 100.0) is OVERLOADED and ids.add(2, "http://a/", 100.0) is OVERLOADED
    assert (ids.refused, ids.accepted, ids.take()) == (2, 0, None)


def test_an_early_flush_is_asked_for_once_per_batch_at_flush_max_keys() -> None:
    ids = PendingIds(window_seconds=10, max_pending=100, max_endpoints=1, flush_max_keys=3)
    asked: list[int] = []
    ids.request_flush = lambda: asked.append(ids.pending_count)
    for n in range(5):
        assert ids.add_id(n, b"%d" % n, 100.0) is OK
    assert asked == [3], "at the third id, not again before the take"
    ids.take()
    for n in range(5, 9):
        assert ids.add(n, None, 100.0) is OK
    assert asked == [3, 3] and ids.accepted == 9


def test_logs_show_endpoints_without_their_user_info() -> None:
    """New-user trial: http://user:pw@host/... went into event=verve_callback lines as it was."""
    assert shown("http://user:secret@hooks.example/x?a=1") == "http://***@hooks.example/x?a=1"
    assert shown("HTTPS://token@hooks.example/") == "HTTPS://***@hooks.example/"
    assert shown("http://hooks.example/x?mail=a@b") == "http://hooks.example/x?mail=a@b", "an @ past the host is data"
    assert shown("http://hooks.example/" + "x" * 300) == ("http://hooks.example/" + "x" * 300)[:200]
