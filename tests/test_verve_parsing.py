"""The verve request path and helpers as pure functions: query, id and endpoint parsing, the journal codec, the
callback target checks and URLs. No server, no database."""

from __future__ import annotations

import asyncio
import ipaddress

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

    ids.journal = Recorder()  # type: ignore[assignment]
    assert ids.add(1, "http://a/", 100.0) is OK
    assert ids.add(1, None, 101.0) is OK  # a duplicate: no journal record
    assert ids.add_id(1, b"1", 101.0) is OK  # the same, without an endpoint
    assert ids.add(2, "http://b/", 102.0) is OK  # past max_endpoints: id counted, endpoint dropped
    assert ids.add_id(-1, b"-01", 111.0) is OK  # the next window; its record keeps the digits as they came
    assert ids.add(3, None, 112.0) is OVERLOADED  # three ids pending
    assert ids.add_id(4, b"4", 112.0) is OVERLOADED
    assert (ids.accepted, ids.duplicates, ids.endpoints_dropped, ids.refused) == (3, 2, 1, 2)
    assert len(records) == 3 and records[2] == b"I" + (110).to_bytes(8, "little") + b"-01"
    batch = ids.take()
    assert batch == ({100: [1, 2], 110: [-1]}, {100: ["http://a/"]})
    assert ids.replay(records) == batch
    assert ids.replay([*records[2:], b"I" + (110).to_bytes(8, "little") + b"1x"]) == ({110: [-1]}, {}), "not an id"
    assert ids.replay([ids.snapshot(), b"R\x01"]) == ({}, {})  # nothing pending now; a torn record is skipped
    assert ids.add(3, None, 112.0) is OVERLOADED  # the taken batch still counts until acknowledged
    ids.acknowledge()
    assert ids.add(3, None, 112.0) is OK and ids.accepted == 4
    assert ids.replay([ids.snapshot()]) == ({110: [3]}, {})
    assert ids.split(batch) == [({100: [1, 2]}, {}), ({110: [-1]}, {100: ["http://a/"]})]
    # halves in id order: written one after the other, they insert in the order every flusher uses (no deadlock)
    assert ids.split(({60: [9, 1, 5, 3]}, {})) == [({60: [1, 3]}, {}), ({60: [5, 9]}, {})]
    assert FAILED.status == 400 and OVERLOADED.status == 503 and OK.body == b"ok"


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
