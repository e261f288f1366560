"""What the events tests compute on their own side: the answer GET /metrics must give for the events they sent."""

from __future__ import annotations

import json
from urllib.parse import urlencode

from httpclient import request

HOUR = 3600
DAY = 86400


def metrics(port: int, **params: object) -> dict[str, object]:
    status, _, body = request(port, "GET", "/metrics?" + urlencode(params))
    assert status == 200, body
    answer: dict[str, object] = json.loads(body)
    return answer


def identity(event: dict[str, object]) -> str:
    """The test's own notion of "the same event": its event_id, else every field."""
    return f"id:{event['event_id']}" if "event_id" in event else json.dumps(event, sort_keys=True)


def expected(
    events: list[dict[str, object]], name: str, start: int, end: int, channel: str | None = None, group_by: str = ""
) -> dict[str, object]:
    """Totals computed here, independently of the service, from the events the test sent (deduplicated)."""
    unique = {identity(event): event for event in events}.values()
    rows = [
        e for e in unique if e["event_name"] == name and start <= e["timestamp"] < end  # type: ignore[operator]
        and (channel is None or e["channel"] == channel)
    ]  # fmt: skip
    groups: dict[object, list[dict[str, object]]] = {}
    for row in rows:
        ts = int(row["timestamp"])  # type: ignore[call-overload]
        key = {"channel": row["channel"], "hour": ts // HOUR * HOUR, "day": ts // DAY * DAY}.get(group_by)
        groups.setdefault(key, []).append(row)
    answer: dict[str, object] = {
        "event_name": name,
        "from": start,
        "to": end,
        "total_events": len(rows),
        "unique_users": len({row["user_id"] for row in rows}),
    }
    if channel is not None:
        answer["channel"] = channel
    if group_by:  # `groups` is there only when grouping was asked for
        answer["group_by"] = group_by
        answer["groups"] = [
            {"key": key, "total_events": len(group), "unique_users": len({row["user_id"] for row in group})}
            for key, group in sorted(groups.items())  # type: ignore[type-var]
        ]
    return answer
