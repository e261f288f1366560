"""The uvicorn baseline: the same POST /increment (orjson, same checks, a dict per worker) as a raw ASGI app.

No flushing: it is the cost of the HTTP stack we are compared against, not a second implementation of fastcount.
"""

from __future__ import annotations

from typing import Any

import orjson

pending: dict[str, int] = {}
ACCEPTED_START = {"type": "http.response.start", "status": 202, "headers": [(b"content-length", b"0")]}
ACCEPTED_BODY = {"type": "http.response.body", "body": b""}


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    document = orjson.loads(body)
    key, value = document["key"], document["value"]
    if type(key) is str and type(value) is int and value > 0:
        pending[key] = pending.get(key, 0) + value
    await send(ACCEPTED_START)
    await send(ACCEPTED_BODY)
