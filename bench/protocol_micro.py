"""Micro-benchmark of the protocol alone: CPU per request of HttpProtocol fed in-memory bytes (no socket, no kernel).

    .venv/bin/python bench/protocol_micro.py [--protocol path/to/protocol.py] [--requests 100000]

`--protocol` loads another version of protocol.py (e.g. `git show HEAD~1:fastcount/server/protocol.py > old.py`) so
two versions are measured in one run. Modes: one request per read (what wrk does), 100 pipelined per read, and one
per read with a query string.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from types import ModuleType
from typing import Any

from fastcount.features.increment import ACCEPTED, parse_increments
from fastcount.observability.stats import WorkerStats
from fastcount.server.responses import Response
from fastcount.server.routing import Route, Router

BODY = b'{"key": "page:home", "value": 1}'


def request(target: bytes) -> bytes:
    return (
        b"POST %s HTTP/1.1\r\nHost: localhost:3333\r\nUser-Agent: bench\r\n"
        b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % (target, len(BODY)) + BODY
    )


class NullTransport:
    def write(self, data: bytes) -> None:
        pass

    def close(self) -> None:
        pass

    def is_closing(self) -> bool:
        return False

    def get_extra_info(self, name: str) -> None:
        return None

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


def load(path: str | None) -> ModuleType:
    if path is None:
        import fastcount.server.protocol as protocol

        return protocol
    spec = importlib.util.spec_from_file_location("protocol_under_test", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def measure(module: ModuleType, requests: int, per_read: int, target: bytes = b"/increment") -> float:
    pending: dict[str, int] = {}

    def increment(path: bytes, query: bytes, body: bytes) -> Response:
        for key, value in parse_increments(body):
            pending[key] = pending.get(key, 0) + value
        return ACCEPTED

    router = Router([Route(b"POST", b"/increment", increment)])
    limits = module.ConnectionLimits(max_body=65536, max_header_bytes=8192, keepalive_ticks=5, read_ticks=10)
    protocol: Any = module.HttpProtocol(module.ServerState(router, limits, WorkerStats()))
    protocol.connection_made(NullTransport())
    data = request(target) * per_read
    reads = requests // per_read
    started = time.process_time()
    for _ in range(reads):
        protocol.data_received(data)
    elapsed = time.process_time() - started
    assert pending["page:home"] == reads * per_read, pending
    return elapsed / (reads * per_read) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--protocol", default=None)
    parser.add_argument("--requests", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    module = load(args.protocol)
    for per_read, target in ((1, b"/increment"), (100, b"/increment"), (1, b"/increment?via=bench")):
        results = sorted(measure(module, args.requests, per_read, target) for _ in range(args.rounds))
        print(
            f"{args.protocol or 'current'}: {target.decode():22s} {per_read:>3} per read: median "
            f"{results[len(results) // 2]:.3f} us/request (min {results[0]:.3f}, max {results[-1]:.3f})"
        )


if __name__ == "__main__":
    main()
