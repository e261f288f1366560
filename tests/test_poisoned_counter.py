"""A counter already near 2^63-1 in PostgreSQL makes one key of a batch impossible to store. Whether the batch comes
from a live worker or from a SIGKILLed worker's journal, every other key commits, the offender is parked in
fastcount_dead_letters (not retried forever, not dropped), flushing goes on, and the service stops cleanly."""

from __future__ import annotations

import http.client
import json
import os
import re
import signal

from conftest import Database, StartServer, wait_until
from httpclient import increment

MAX_BIGINT = 2**63 - 1
DEAD_LETTER = r"event=dead_letter buffer=increment "


def poison(database: Database, key: str) -> None:
    database.query("INSERT INTO counters (key, value, updated_at) VALUES (%s, %s, now())", (key, MAX_BIGINT - 5))


def parked(database: Database, key: str) -> list[tuple[object, ...]]:
    return database.query(
        # (text, not jsonb: other tests park items jsonb cannot hold, such as a key with NUL)
        "SELECT writer, item, sqlstate FROM fastcount_dead_letters WHERE strpos(item, %s) > 0",
        (json.dumps(key),),
    )


def send(port: int, counts: dict[str, int]) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    for key, value in counts.items():
        assert increment(conn, key, value) == 202
    conn.close()


def test_a_live_batch_with_a_poisoned_key_commits_the_rest_parks_it_and_keeps_flushing(
    start_server: StartServer, database: Database, prefix: str
) -> None:
    poisoned = prefix + "poisoned"
    poison(database, poisoned)
    server = start_server(expect_errors=(DEAD_LETTER,))
    first = {f"{prefix}{i}": i + 1 for i in range(30)}
    send(server.port, {**first, poisoned: 10})  # 2^63-5 + 10: PostgreSQL refuses it (22003), the request could not know
    wait_until(lambda: parked(database, poisoned) != [], "the poisoned key is parked")
    wait_until(lambda: database.counts(prefix) == {**first, poisoned: MAX_BIGINT - 5}, "the rest committed")
    [(writer, item, sqlstate)] = parked(database, poisoned)
    assert (json.loads(str(item)), sqlstate) == ({"key": poisoned, "value": 10}, "22003")
    assert "/increment" in str(writer)
    # Flushing goes on: later batches commit, and the poisoned key alone does not stop them.
    second = {f"{prefix}{i}": 100 for i in range(20, 40)}
    send(server.port, second)
    expected = {key: first.get(key, 0) + second.get(key, 0) for key in {*first, *second}}
    wait_until(lambda: database.counts(prefix) == {**expected, poisoned: MAX_BIGINT - 5}, "later batches commit")
    assert server.stop() == 0
    assert "event=journals_lost" not in server.log
    assert len(re.findall(DEAD_LETTER, server.log)) == 1, "parked once, not retried"
    assert len(parked(database, poisoned)) == 1


def test_a_recovered_batch_with_a_poisoned_key_commits_the_rest_and_parks_it(
    start_server: StartServer, database: Database, prefix: str
) -> None:
    poisoned = prefix + "poisoned"
    poison(database, poisoned)
    # Nothing is flushed while the worker lives: the poisoned key is only in its journal when it is killed.
    server = start_server("--flush-interval", "600", workers=1, expect_errors=(DEAD_LETTER,))
    [worker] = server.worker_pids()
    counts = {f"{prefix}{i}": i + 1 for i in range(30)}
    send(server.port, {**counts, poisoned: 10})
    os.kill(worker, signal.SIGKILL)
    server.wait_for_log(rf"event=journals_recovered slot=0 pid=\d+ dead_pid={worker}")
    assert database.counts(prefix) == {**counts, poisoned: MAX_BIGINT - 5}
    [(writer, item, sqlstate)] = parked(database, poisoned)
    assert (json.loads(str(item)), sqlstate) == ({"key": poisoned, "value": 10}, "22003")
    assert f"/{worker}/" in str(writer), "parked under the dead worker's identity"
    assert re.search(rf"role=recovery0 .*{DEAD_LETTER}", server.log)
    assert server.stop() == 0
    assert "event=journals_lost" not in server.log
    assert database.counts(prefix) == {**counts, poisoned: MAX_BIGINT - 5}
