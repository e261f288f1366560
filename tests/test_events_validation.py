"""The rules of POST /events and GET /metrics as pure functions: every rule, single and in bulk, and identities."""

from __future__ import annotations

import re

import orjson
import pytest

from fastcount.features.events.query import InvalidQuery, parse_query, raw_ranges
from fastcount.features.events.validation import (
    MAX_BULK,
    MAX_METADATA_BYTES,
    MAX_METADATA_DEPTH,
    MAX_TAGS,
    Clock,
    InvalidEvent,
    check_event,
    parse_events,
)

NOW = 1_800_000_000
CLOCK = Clock(NOW, 5.0, 90 * 86400)


def event(**changes: object) -> dict[str, object]:
    base: dict[str, object] = {"event_name": "signup", "channel": "web", "user_id": "u1", "timestamp": NOW - 10}
    base.update(changes)
    return {key: value for key, value in base.items() if value is not ...}


def nested(levels: int) -> dict[str, object]:
    """An object `levels` deep: objects and arrays in turn."""
    value: object = 1
    for level in range(levels - 1):
        value = [value] if level % 2 == 0 else {"k": value}
    return {"k": value}


@pytest.mark.parametrize(
    ("item", "message"),
    [
        (event(event_name=...), "'event_name' is required"),
        (event(channel=...), "'channel' is required"),
        (event(user_id=...), "'user_id' is required"),
        (event(timestamp=...), "'timestamp' is required"),
        (event(event_name=""), "'event_name' must not be empty"),
        (event(channel=5), "'channel' must be a string"),
        (event(user_id=["u"]), "'user_id' must be a string"),
        (event(event_name="x" * 129), "'event_name' must be at most 128 bytes"),
        (event(event_name="é" * 65), "'event_name' must be at most 128 bytes"),
        (event(channel="c" * 65), "'channel' must be at most 64 bytes"),
        (event(user_id="u" * 257), "'user_id' must be at most 256 bytes"),
        (event(user_id="a\x00b"), "'user_id' must not contain NUL"),
        (event(timestamp="1700000000"), "'timestamp' must be an integer"),
        (event(timestamp=1.5e9), "'timestamp' must be an integer"),
        (event(timestamp=True), "'timestamp' must be an integer"),
        (event(timestamp=NOW + 6), "'timestamp' is in the future"),
        (event(timestamp=NOW - 90 * 86400 - 1), "'timestamp' is older than the retention (90 days)"),
        (event(campaign_id=""), "'campaign_id' must not be empty"),
        (event(campaign_id="c" * 129), "'campaign_id' must be at most 128 bytes"),
        (event(event_id=7), "'event_id' must be a string"),
        (event(event_id="e\x00"), "'event_id' must not contain NUL"),
        (event(tags="a"), "'tags' must be an array of strings"),
        (event(tags=["a", 1]), "'tags'[1] must be a string"),
        (event(tags=[""]), "'tags'[0] must not be empty"),
        (event(tags=["t" * 65]), "'tags'[0] must be at most 64 bytes"),
        (event(tags=["t"] * (MAX_TAGS + 1)), f"'tags' must hold at most {MAX_TAGS} tags"),
        (event(tags=["a\x00"]), "'tags'[0] must not contain NUL"),
        (event(metadata=[1]), "'metadata' must be an object"),
        (event(metadata={"k": "v" * MAX_METADATA_BYTES}), f"'metadata' must be at most {MAX_METADATA_BYTES} bytes"),
        (event(metadata={"k": {"deep": ["x\x00"]}}), "'metadata' must hold no NUL"),
        (event(metadata={"k\x00": 1}), "'metadata' must hold no NUL"),
        (
            event(metadata=nested(MAX_METADATA_DEPTH + 1)),
            f"'metadata' must nest objects and arrays at most {MAX_METADATA_DEPTH}",
        ),
        (event(metadata=nested(252)), f"'metadata' must nest objects and arrays at most {MAX_METADATA_DEPTH}"),
        (event(metadata=nested(300)), f"'metadata' must nest objects and arrays at most {MAX_METADATA_DEPTH}"),
        (event(color="red"), "unknown field 'color'"),
        ([event()], "an event must be a JSON object"),
    ],
)
def test_each_rule_names_the_field_and_the_rule(item: object, message: str) -> None:
    with pytest.raises(InvalidEvent, match=re.escape(message)):
        check_event(item, CLOCK)


def test_limits_themselves_are_accepted() -> None:
    item = event(
        event_name="n" * 128,
        channel="c" * 64,
        user_id="u" * 256,
        timestamp=NOW + 5,
        campaign_id="c" * 128,
        event_id="e" * 128,
        tags=["t" * 64] * MAX_TAGS,
        metadata={"k": "v" * (MAX_METADATA_BYTES - len('{"k":""}'))},
    )
    check_event(item, CLOCK)
    check_event(event(timestamp=NOW - 90 * 86400), CLOCK)
    check_event(event(campaign_id=None, tags=None, metadata=None, event_id=None), CLOCK)
    check_event(event(metadata={"text": "a backslash-u0000 in text: \\u0000"}), CLOCK)
    check_event(event(metadata=nested(MAX_METADATA_DEPTH)), CLOCK)
    check_event(event(metadata={"brackets in text": "[[[[{{{{" * 10}), CLOCK)  # counted, then measured: 1 level


def test_identity_is_canonical_and_event_id_wins() -> None:
    one = check_event(event(metadata={"a": 1, "b": {"y": 2, "x": 1}}, tags=["p", "q"]), CLOCK)[0]
    reordered = check_event(
        orjson.loads(b'{"tags":["p","q"],"metadata":{"b":{"x":1,"y":2},"a":1},"timestamp":%d,"user_id":"u1",'
                     b'"channel":"web","event_name":"signup","campaign_id":null}' % (NOW - 10)),
        CLOCK,
    )[0]  # fmt: skip
    assert one == reordered
    assert check_event(event(), CLOCK)[0] != check_event(event(timestamp=NOW - 11), CLOCK)[0]
    assert check_event(event(), CLOCK)[0] != check_event(event(tags=["p"]), CLOCK)[0]
    first = check_event(event(event_id="k1"), CLOCK)[0]
    assert first == check_event(event(event_id="k1", user_id="someone else"), CLOCK)[0]
    assert first != check_event(event(event_id="k2"), CLOCK)[0]
    assert len(first) == 16


def test_bulk_accepts_valid_items_and_rejects_the_rest_by_index() -> None:
    body = orjson.dumps([event(user_id="a"), event(timestamp=NOW + 60), 5, event(color=1), event(user_id="b")])
    parsed = parse_events(body, CLOCK)
    assert [e["user_id"] for _, e in parsed.accepted] == ["a", "b"]
    assert [r["index"] for r in parsed.rejected] == [1, 2, 3]
    assert "'timestamp' is in the future" in str(parsed.rejected[0]["error"])
    assert "unknown field 'color'" in str(parsed.rejected[2]["error"])


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"{", "body must be JSON"),
        (b'"text"', "body must be one event object or an array"),
        (b"[]", "array must hold at least one event"),
        (b"[1, 2]", "body must be one event object or an array"),
        (orjson.dumps([event(channel="")] * 2), "no valid event in the array; item 0: 'channel' must not be empty"),
        (orjson.dumps([event()] * (MAX_BULK + 1)), f"array must hold at most {MAX_BULK} events"),
    ],
)
def test_bodies_refused_whole(body: bytes, message: str) -> None:
    with pytest.raises(InvalidEvent, match=message):
        parse_events(body, CLOCK)


def test_replay_clock_skips_time_rules_only() -> None:
    replay = Clock(None, 0.0, 0)
    check_event(event(timestamp=NOW + 3600), replay)
    with pytest.raises(InvalidEvent):
        check_event(event(color=1), replay)


@pytest.mark.parametrize(
    ("query", "message"),
    [
        (b"", "'event_name' is required"),
        (b"event_name=", "'event_name' is required"),
        (b"event_name=a&from=x", "'from' must be an integer"),
        (b"event_name=a&to=1.5", "'to' must be an integer"),
        (b"event_name=a&from=10&to=10", "'from' must be before 'to'"),
        (b"event_name=a&group_by=week", "'group_by' must be channel, hour or day"),
        (b"event_name=a&channel=", "'channel' must be 1 to 64 bytes"),
        (b"event_name=a&channel=w%00b", r"'channel' must not contain NUL \(U\+0000\)"),
        (b"event_name=sign%00up", r"'event_name' must not contain NUL \(U\+0000\)"),  # was a 503 to retry forever
        (b"event_name=a&user=1", "unknown parameter 'user'"),
        (b"event_name=a&event_name=b", "'event_name' given more than once"),
        (b"event_name=%ff", "query string must be UTF-8"),
    ],
)
def test_bad_query_parameters(query: bytes, message: str) -> None:
    with pytest.raises(InvalidQuery, match=message):
        parse_query(query, NOW)


def test_query_defaults_to_the_last_24_hours() -> None:
    parsed = parse_query(b"event_name=signup%20ok&group_by=day", NOW)
    assert (parsed.event_name, parsed.start, parsed.end, parsed.group_by) == (
        "signup ok",
        NOW + 1 - 86400,
        NOW + 1,
        "day",
    )


def test_whole_hours_from_rollups_partial_hours_from_raw_rows() -> None:
    assert raw_ranges(7200, 14400) == ((7200, 14400), [])
    assert raw_ranges(7100, 14500) == ((7200, 14400), [(7100, 7200), (14400, 14500)])
    assert raw_ranges(7300, 7400) == (None, [(7300, 7400)])
    assert raw_ranges(7300, 10800) == (None, [(7300, 10800)])


def test_query_range_is_capped_at_max_range() -> None:
    with pytest.raises(InvalidQuery, match=r"'to' - 'from' must be at most 7862400 seconds \(91 days"):
        parse_query(b"event_name=a&from=0&to=1099511627775", NOW)
    with pytest.raises(InvalidQuery, match="'to' - 'from' must be at most"):
        parse_query(b"event_name=a&from=0", NOW)  # to defaults to now
    with pytest.raises(InvalidQuery, match="'to' - 'from' must be at most 7200 seconds"):
        parse_query(b"event_name=a&from=0&to=7201", NOW, max_range=7200)
    assert parse_query(b"event_name=a&from=0&to=7200", NOW, max_range=7200).end == 7200
    assert parse_query(f"event_name=a&from={NOW - 91 * 86400}&to={NOW}".encode(), NOW).start == NOW - 91 * 86400
