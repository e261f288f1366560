"""PendingCounts, the per-worker aggregator: sums, swap-out, the bound, the early-flush signal."""

from __future__ import annotations

import asyncio
import json

from fastcount.features.increment import ACCEPTED, OVERLOADED, IncrementFeature, PendingCounts, json_parts


def make(max_pending: int = 100, flush_max: int = 50) -> tuple[PendingCounts, list[int]]:
    wakes: list[int] = []
    pending = PendingCounts(max_pending, flush_max)
    pending.request_flush = lambda: wakes.append(1)
    return pending, wakes


def post(pending: PendingCounts, body: bytes) -> object:
    feature = IncrementFeature.__new__(IncrementFeature)  # the handler alone: no pool, no settings needed
    feature.pending = pending
    return feature.handle_increment(b"/increment", b"", body)


def test_values_for_one_key_are_summed() -> None:
    pending, _ = make()
    for value in (1, 2, 3):
        assert post(pending, b'{"key":"a","value":%d}' % value) is ACCEPTED
    assert pending.take() == {"a": 6}


def test_take_swaps_out_and_leaves_an_empty_dict() -> None:
    pending, _ = make()
    post(pending, b'{"key":"a","value":1}')
    batch = pending.take()
    assert batch == {"a": 1}
    assert pending.take() is None
    post(pending, b'{"key":"a","value":1}')
    assert batch == {"a": 1}, "a taken batch must not change afterwards"


def test_unacknowledged_batch_counts_against_the_bound_until_acknowledged() -> None:
    pending, _ = make(max_pending=3, flush_max=3)
    for key in "abc":
        assert post(pending, b'{"key":"%s","value":1}' % key.encode()) is ACCEPTED
    assert post(pending, b'{"key":"d","value":1}') is OVERLOADED
    pending.take()
    assert post(pending, b'{"key":"d","value":1}') is OVERLOADED, "the batch in flight still holds 3 keys"
    pending.acknowledge()
    assert post(pending, b'{"key":"d","value":1}') is ACCEPTED


def test_known_key_is_accepted_even_when_full() -> None:
    pending, _ = make(max_pending=1, flush_max=1)
    assert post(pending, b'{"key":"a","value":1}') is ACCEPTED
    assert post(pending, b'{"key":"b","value":1}') is OVERLOADED
    assert post(pending, b'{"key":"a","value":1}') is ACCEPTED, "adding to a known key needs no memory"
    assert pending.take() == {"a": 2}


def test_array_is_all_or_nothing_under_the_bound() -> None:
    pending, _ = make(max_pending=2, flush_max=2)
    assert post(pending, b'[{"key":"a","value":1},{"key":"b","value":1},{"key":"c","value":1}]') is OVERLOADED
    assert pending.take() is None
    assert post(pending, b'[{"key":"a","value":1},{"key":"a","value":2}]') is ACCEPTED
    assert pending.take() == {"a": 3}


def test_reaching_flush_max_keys_wakes_the_flusher_once() -> None:
    pending, wakes = make(max_pending=100, flush_max=3)
    for key in "abcde":
        post(pending, b'{"key":"%s","value":1}' % key.encode())
    assert wakes == [1]


def test_invalid_increment_changes_nothing() -> None:
    pending, _ = make()
    response = post(pending, b'{"key":"a","value":0}')
    assert getattr(response, "status", None) == 400
    assert pending.take() is None


def test_json_parts_hold_the_whole_batch_even_with_sums_past_64_bits() -> None:
    batch = {f"key-{i}": i + 1 for i in range(25)}
    batch["huge"] = 2**70  # a replayed sum: PostgreSQL refuses it (bigint) and the lane parks it; it must still be sent
    batch['quote"tab\t\\é\n'] = 3

    async def parts(part_keys: int) -> list[bytes]:
        return [part async for part in json_parts(batch, part_keys)]

    for part_keys in (1, 7, 10_000):
        sent = asyncio.run(parts(part_keys))
        assert len(sent) == -(-len(batch) // part_keys)
        assert not any(byte in part for part in sent for byte in b"\n\r\x01\x02"), "one CSV line each, as it is"
        assert {key: value for part in sent for key, value in json.loads(part).items()} == batch
