"""Two fastcount instances (two workers each) on one PostgreSQL, flushing the same keys at the same time, in batches
on both sides of the COPY threshold: totals exact, and no flush ever fails (no deadlock, no serialization error)."""

from __future__ import annotations

import random
import threading
from collections import Counter

from conftest import Database, StartServer
from httpclient import request

KEY_SPACE = 4000  # arrays of 2,500 keys out of these: every batch overlaps every other worker's


def test_two_instances_with_overlapping_keys_count_exactly_and_never_fail_a_flush(
    start_server: StartServer, database: Database, prefix: str
) -> None:
    flags = ("--flush-interval", "0.05", "--max-body", str(1 << 20))
    servers = [start_server(*flags, workers=2), start_server(*flags, workers=2)]
    accepted: Counter[str] = Counter()
    problems: list[str] = []
    lock = threading.Lock()

    def client(port: int, seed: int) -> None:
        rng = random.Random(seed)
        mine: Counter[str] = Counter()
        for _ in range(12):
            keys = rng.sample(range(KEY_SPACE), 2500)  # a random order: the server must sort, not the client
            items = [{"key": f"{prefix}{key}", "value": rng.randint(1, 9)} for key in keys]
            status = request(port, "POST", "/increment", items)[0]
            if status != 202:
                with lock:
                    problems.append(f"status {status}")
                return
            mine.update({str(item["key"]): int(item["value"]) for item in items})  # type: ignore[call-overload]
        with lock:
            accepted.update(mine)

    threads = [
        threading.Thread(target=client, args=(server.port, seed))
        for seed, server in enumerate(servers + servers)  # two clients per instance
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert problems == []
    for server in servers:
        assert server.stop() == 0
    assert database.counts(prefix) == dict(accepted)
    for server in servers:
        assert "event=flush_failed" not in server.log, server.log
        assert "deadlock" not in server.log
