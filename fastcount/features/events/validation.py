"""What an event is: the rules of POST /events and each event's identity, as pure functions (no server, no clock of
their own), so the rules are tested directly and a crash-journal replay decodes events exactly as ingestion did.

Rules kept here (each is documented in the README):
1. Top-level fields are exactly FIELDS; an unknown one is refused, a missing required one is refused.
2. Strings are non-empty UTF-8 within their byte limit and hold no NUL (PostgreSQL text and jsonb cannot).
3. `timestamp` is an integer of Unix seconds, at most `max_skew` ahead of the server clock and within the retention.
4. An event's identity is 16 bytes: BLAKE2b of its `event_id` when given, else of its canonical form (every field,
   keys sorted, optional fields that are null left out), so a retry is the same event and two different events are
   not.
"""

from __future__ import annotations

from dataclasses import dataclass
from hashlib import blake2b
from typing import Any

import orjson

from fastcount.server.responses import json_problem

MAX_EVENT_NAME_BYTES = 128
MAX_CHANNEL_BYTES = 64
MAX_USER_ID_BYTES = 256
MAX_CAMPAIGN_ID_BYTES = 128
MAX_EVENT_ID_BYTES = 128
MAX_TAGS = 32
MAX_TAG_BYTES = 64
MAX_METADATA_BYTES = 4096  # the object as compact JSON
# Objects and arrays nested in each other, the metadata object itself included. orjson encodes at most ~254 levels,
# and the flush nests an event two levels deeper than here: a deeper event would be accepted and never written.
MAX_METADATA_DEPTH = 32
TOO_DEEP = f"'metadata' must nest objects and arrays at most {MAX_METADATA_DEPTH} levels deep"
MAX_BULK = 1000

REQUIRED = (
    ("event_name", MAX_EVENT_NAME_BYTES),
    ("channel", MAX_CHANNEL_BYTES),
    ("user_id", MAX_USER_ID_BYTES),
)
OPTIONAL_STRINGS = (("campaign_id", MAX_CAMPAIGN_ID_BYTES), ("event_id", MAX_EVENT_ID_BYTES))
FIELDS = frozenset(("event_name", "channel", "user_id", "timestamp", "campaign_id", "tags", "metadata", "event_id"))
ID_DOMAIN = b"event_id\x00"  # an event_id's hash never equals a canonical form's (which starts with "{")

Event = dict[str, Any]  # the canonical form: validated fields only, null optional fields left out


class InvalidEvent(ValueError):
    def __init__(self, message: str, rejected: list[dict[str, object]] | None = None) -> None:
        super().__init__(message)
        self.rejected = rejected  # an array whose every item was refused: each item's reason, by index


@dataclass(frozen=True)
class Clock:
    """The time rules for one request: `now` in Unix seconds; None (a journal replay) skips them, because the event
    was checked when it was accepted."""

    now: int | None
    max_skew: float
    retention_seconds: int


def _string(value: object, field: str, limit: int, shown: str = "") -> str:
    """A checked string; errors name it as `shown` (one item of an array: 'tags'[2]), else as 'field'."""
    if type(value) is not str:
        raise InvalidEvent(f"{shown or repr(field)} must be a string")
    if not value:
        raise InvalidEvent(f"{shown or repr(field)} must not be empty")
    if len(value) > limit // 4 and len(value.encode()) > limit:
        raise InvalidEvent(f"{shown or repr(field)} must be at most {limit} bytes of UTF-8")
    if "\x00" in value:
        raise InvalidEvent(f"{shown or repr(field)} must not contain NUL (U+0000): PostgreSQL cannot store it")
    return value


def _depth(value: object) -> int:
    if type(value) is dict:
        return 1 + max(map(_depth, value.values()), default=0)
    if type(value) is list:
        return 1 + max(map(_depth, value), default=0)
    return 0


def _holds_nul(value: object) -> bool:
    if type(value) is str:
        return "\x00" in value
    if type(value) is dict:
        return any("\x00" in key or _holds_nul(inner) for key, inner in value.items())
    if type(value) is list:
        return any(_holds_nul(inner) for inner in value)
    return False


def check_event(item: object, clock: Clock) -> tuple[bytes, Event]:
    """(identity, canonical event) of one decoded JSON value; raises InvalidEvent naming the field and the rule."""
    if type(item) is not dict:
        raise InvalidEvent("an event must be a JSON object")
    if not FIELDS.issuperset(item):
        unknown = sorted(set(item) - FIELDS)
        raise InvalidEvent(f"unknown field '{unknown[0]}' (allowed: {', '.join(sorted(FIELDS))})")
    event: Event = {}
    for field, limit in REQUIRED:
        value = item.get(field)
        if value is None:
            raise InvalidEvent(f"'{field}' is required")
        event[field] = _string(value, field, limit)
    timestamp = item.get("timestamp")
    if timestamp is None:
        raise InvalidEvent("'timestamp' is required")
    if type(timestamp) is not int:  # bool is a subclass of int: `type` refuses it with floats and strings
        raise InvalidEvent("'timestamp' must be an integer (Unix seconds)")
    now = clock.now
    if now is not None:
        if timestamp > now + clock.max_skew:
            raise InvalidEvent(f"'timestamp' is in the future (more than {clock.max_skew:g} s ahead of the server)")
        if timestamp < now - clock.retention_seconds:
            raise InvalidEvent(f"'timestamp' is older than the retention ({clock.retention_seconds // 86400} days)")
    elif timestamp < 0:
        raise InvalidEvent("'timestamp' must not be negative")
    event["timestamp"] = timestamp
    for field, limit in OPTIONAL_STRINGS:
        value = item.get(field)
        if value is not None:
            event[field] = _string(value, field, limit)
    tags = item.get("tags")
    if tags is not None:
        if type(tags) is not list:
            raise InvalidEvent("'tags' must be an array of strings")
        if len(tags) > MAX_TAGS:
            raise InvalidEvent(f"'tags' must hold at most {MAX_TAGS} tags")
        for index, tag in enumerate(tags):
            _string(tag, "tags", MAX_TAG_BYTES, f"'tags'[{index}]")
        event["tags"] = tags
    metadata = item.get("metadata")
    if metadata is not None:
        if type(metadata) is not dict:
            raise InvalidEvent("'metadata' must be an object")
        try:
            encoded = orjson.dumps(metadata)
        except TypeError:  # nested past orjson's own limit
            raise InvalidEvent(TOO_DEEP) from None
        # Each level opens a bracket: only a value with more brackets than the limit (some may be in strings) is
        # measured.
        if encoded.count(b"[") + encoded.count(b"{") > MAX_METADATA_DEPTH and _depth(metadata) > MAX_METADATA_DEPTH:
            raise InvalidEvent(TOO_DEEP)
        if len(encoded) > MAX_METADATA_BYTES:
            raise InvalidEvent(f"'metadata' must be at most {MAX_METADATA_BYTES} bytes as compact JSON")
        if encoded.find(b"\\u0000") >= 0 and _holds_nul(metadata):  # (`find`: see HttpProtocol.data_received)
            raise InvalidEvent("'metadata' must hold no NUL (U+0000) in any key or string: PostgreSQL cannot store it")
        event["metadata"] = metadata
    return identity_of(event), event


def identity_of(event: Event) -> bytes:
    event_id = event.get("event_id")
    if event_id is not None:
        return blake2b(ID_DOMAIN + event_id.encode(), digest_size=16).digest()
    return blake2b(orjson.dumps(event, option=orjson.OPT_SORT_KEYS), digest_size=16).digest()


@dataclass
class Parsed:
    """A request body, checked: the accepted events in order, and each refused item of an array by index."""

    accepted: list[tuple[bytes, Event]]
    rejected: list[dict[str, object]]
    bulk: bool


def parse_events(body: bytes, clock: Clock, max_items: int | None = MAX_BULK) -> Parsed:
    """One event object, or an array of them. Raises InvalidEvent when nothing in the body can be accepted."""
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError as error:
        raise InvalidEvent(undecodable(error)) from None
    return check_document(document, clock, max_items)


def undecodable(error: orjson.JSONDecodeError) -> str:
    """The 400's message for a body orjson could not decode (the handler decodes inline, `parse_events` too)."""
    return f"body must be JSON: one event object or an array of them ({json_problem(error)})"


def check_document(document: object, clock: Clock, max_items: int | None = MAX_BULK) -> Parsed:
    if type(document) is dict:
        return Parsed([check_event(document, clock)], [], False)
    if type(document) is not list:
        raise InvalidEvent("body must be one event object or an array of them")
    if not document:
        raise InvalidEvent("array must hold at least one event")
    if max_items is not None and len(document) > max_items:
        raise InvalidEvent(f"array must hold at most {max_items} events")
    accepted: list[tuple[bytes, Event]] = []
    rejected: list[dict[str, object]] = []
    for index, item in enumerate(document):
        try:
            accepted.append(check_event(item, clock))
        except InvalidEvent as problem:
            rejected.append({"index": index, "error": str(problem)})
    if not accepted:
        if all(type(item) is not dict for item in document):
            raise InvalidEvent("body must be one event object or an array of them")
        first = rejected[0]
        raise InvalidEvent(f"no valid event in the array; item {first['index']}: {first['error']}", rejected)
    return Parsed(accepted, rejected, True)
