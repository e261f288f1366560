"""GET /metrics: totals and exact unique users of one event name over [from, to), whole or grouped.

Plan: whole UTC hours inside the range come from `event_rollups` (counts, and bitmaps of user numbers unioned here);
the partial hours at either end (when `from` or `to` is not on an hour) come from the raw `events` rows of those
minutes alone, joined to their user numbers and aggregated in SQL per hour and channel. The two never overlap, so
totals add up and unions are exact; the top-level `unique_users` is the union over the whole range, never a sum of
the groups'.

Cost is bounded: the range is at most `max_range` (the retention plus its day of margin; 400 beyond), rollup rows
are streamed and each bitmap is unioned into its tally (`|=`) as it arrives, never held in a list.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl

import psycopg
from pyroaring import BitMap

from fastcount.features.events.store import DAY, HOUR
from fastcount.features.events.validation import MAX_CHANNEL_BYTES, MAX_EVENT_NAME_BYTES

GROUP_BY = ("channel", "hour", "day")
PARAMETERS = frozenset(("event_name", "from", "to", "channel", "group_by"))
DEFAULT_RANGE = DAY
DEFAULT_MAX_RANGE = 91 * DAY  # the default retention (90 days) plus the day of margin partitions are kept for
YIELD_EVERY = 100  # rollup rows unioned between two chances for the worker to answer requests

READ_ROLLUPS = """
    SELECT extract(epoch FROM hour)::int8, channel, total, users FROM event_rollups
    WHERE event_name = %s AND hour >= to_timestamp(%s) AND hour < to_timestamp(%s)
"""
# Per hour and channel of the partial minutes: events and the distinct user numbers (a partial range lies within
# at most two hours, so this is a handful of rows whatever the traffic).
READ_RAW = """
    SELECT (floor(extract(epoch FROM e.ts) / 3600) * 3600)::int8 AS hour, e.channel, count(*),
           array_agg(DISTINCT u.user_number)
    FROM events e JOIN event_users u ON u.user_id = e.user_id
    WHERE e.event_name = %s AND e.day >= date '1970-01-01' + %s::int AND e.day <= date '1970-01-01' + %s::int
      AND e.ts >= to_timestamp(%s) AND e.ts < to_timestamp(%s)
"""
CHANNEL_FILTER = " AND channel = %s"
RAW_CHANNEL_FILTER = " AND e.channel = %s"
RAW_GROUP = " GROUP BY 1, 2"


class InvalidQuery(ValueError):
    pass


@dataclass(frozen=True)
class MetricsQuery:
    event_name: str
    start: int  # from, inclusive
    end: int  # to, exclusive
    channel: str | None
    group_by: str | None


def _integer(raw: str, name: str) -> int:
    if not raw or not (raw.isdigit() or (raw[0] == "-" and raw[1:].isdigit())):
        raise InvalidQuery(f"'{name}' must be an integer (Unix seconds)")
    value = int(raw)
    if not 0 <= value < 2**40:
        raise InvalidQuery(f"'{name}' must be from 0 to {2**40 - 1}")
    return value


def parse_query(query: bytes, now: int, max_range: int = DEFAULT_MAX_RANGE) -> MetricsQuery:
    """The parameters of GET /metrics; raises InvalidQuery naming the first problem. `to - from` may be at most
    `max_range` seconds."""
    try:
        pairs = parse_qsl(query.decode(), keep_blank_values=True, errors="strict")
    except (UnicodeDecodeError, ValueError):
        raise InvalidQuery("query string must be UTF-8") from None
    params: dict[str, str] = {}
    for name, value in pairs:
        if name not in PARAMETERS:
            raise InvalidQuery(f"unknown parameter '{name}' (allowed: {', '.join(sorted(PARAMETERS))})")
        if name in params:
            raise InvalidQuery(f"'{name}' given more than once")
        params[name] = value
    event_name = params.get("event_name")
    if not event_name:
        raise InvalidQuery("'event_name' is required")
    if len(event_name.encode()) > MAX_EVENT_NAME_BYTES:
        raise InvalidQuery(f"'event_name' must be at most {MAX_EVENT_NAME_BYTES} bytes")
    if "\x00" in event_name:  # no event can hold it; PostgreSQL would refuse the query (it answered 503, retry)
        raise InvalidQuery("'event_name' must not contain NUL (U+0000)")
    end = _integer(params["to"], "to") if "to" in params else None
    start = _integer(params["from"], "from") if "from" in params else None
    if end is None:
        end = now + 1 if start is None or start <= now else start + DEFAULT_RANGE
    if start is None:
        start = max(0, end - DEFAULT_RANGE)
    if start >= end:
        raise InvalidQuery("'from' must be before 'to' (from is inclusive, to exclusive)")
    if end - start > max_range:
        raise InvalidQuery(
            f"'to' - 'from' must be at most {max_range} seconds ({max_range / DAY:g} days: the retention plus a day)"
        )
    channel = params.get("channel")
    if channel is not None and (not channel or len(channel.encode()) > MAX_CHANNEL_BYTES):
        raise InvalidQuery(f"'channel' must be 1 to {MAX_CHANNEL_BYTES} bytes")
    if channel is not None and "\x00" in channel:
        raise InvalidQuery("'channel' must not contain NUL (U+0000)")
    group_by = params.get("group_by")
    if group_by is not None and group_by not in GROUP_BY:
        raise InvalidQuery("'group_by' must be channel, hour or day")
    return MetricsQuery(event_name, start, end, channel, group_by)


class Tally:
    """Events and the bitmaps of their users, for one group or for the whole range."""

    __slots__ = ("total", "users")

    def __init__(self) -> None:
        self.total = 0
        self.users = BitMap()

    def add(self, total: int, users: BitMap) -> None:
        self.total += total
        self.users |= users

    def unique(self) -> int:
        return len(self.users)


def _group_key(group_by: str | None, hour_or_ts: int, channel: str) -> str | int | None:
    if group_by == "channel":
        return channel
    if group_by == "hour":
        return hour_or_ts // HOUR * HOUR
    if group_by == "day":
        return hour_or_ts // DAY * DAY
    return None


def raw_ranges(start: int, end: int) -> tuple[tuple[int, int] | None, list[tuple[int, int]]]:
    """(the whole hours [first, last) served by rollups, or None; the partial ranges served by raw rows)."""
    first_hour = -(-start // HOUR) * HOUR
    last_hour = end // HOUR * HOUR
    if first_hour >= last_hour:
        return None, [(start, end)]
    partial = [(a, b) for a, b in ((start, first_hour), (last_hour, end)) if a < b]
    return (first_hour, last_hour), partial


async def run_query(conn: psycopg.AsyncConnection[Any], query: MetricsQuery) -> dict[str, object]:
    whole, partial = raw_ranges(query.start, query.end)
    overall = Tally()
    groups: dict[str | int | None, Tally] = {}
    group_by = query.group_by

    def add(hour: int, channel: str, total: int, users: BitMap) -> None:
        overall.add(total, users)
        if group_by is not None:
            tally = groups.get(key := _group_key(group_by, hour, channel))
            if tally is None:
                tally = groups[key] = Tally()
            tally.add(total, users)

    cursor = conn.cursor(binary=True)
    if whole is not None:
        sql, params = READ_ROLLUPS, [query.event_name, whole[0], whole[1]]
        if query.channel is not None:
            sql += CHANNEL_FILTER
            params.append(query.channel)
        count = 0
        async for hour, channel, total, users in cursor.stream(sql, params):
            add(hour, channel, total, BitMap.deserialize(bytes(users)) if users else BitMap())
            count += 1
            if not count % YIELD_EVERY:
                await asyncio.sleep(0)  # a long range must not hold the worker's requests for its whole length
    for start, end in partial:
        sql = READ_RAW
        params = [query.event_name, start // DAY, (end - 1) // DAY, start, end]
        if query.channel is not None:
            sql += RAW_CHANNEL_FILTER
            params.append(query.channel)
        await cursor.execute(sql + RAW_GROUP, params)
        for hour, channel, total, numbers in await cursor.fetchall():
            add(hour, channel, total, BitMap(numbers))
    answer: dict[str, object] = {
        "event_name": query.event_name,
        "from": query.start,
        "to": query.end,
        "total_events": overall.total,
        "unique_users": overall.unique(),
    }
    if query.channel is not None:
        answer["channel"] = query.channel
    if group_by is not None:
        answer["group_by"] = group_by
        answer["groups"] = [
            {"key": key, "total_events": groups[key].total, "unique_users": groups[key].unique()}
            for key in sorted(groups)  # type: ignore[type-var]
        ]
    return answer
