"""A dead worker's journal is replayed under the dead worker's own ledger identity, so a batch that had committed (but
was never acknowledged in the journal) is refused by the ledger instead of counted twice."""

from __future__ import annotations

import http.client
import os
import re
import signal
from pathlib import Path

from conftest import ROOT, Database, StartServer
from httpclient import increment, request

FAILPOINT = "FASTCOUNT_FAILPOINT_DROP_AFTER_COMMIT"


def failpoint_in_the_first_worker_only(tmp_path: Path) -> dict[str, str]:
    """Every COMMIT of the first worker "loses its connection" afterwards, forever: its first batch commits, and then
    stays in flight in its journal, retried and refused as a duplicate each time, never acknowledged. Replacements and
    recovery processes run without the failpoint (the first worker interpreter removes the `armed` file)."""
    armed = tmp_path / "armed"
    armed.touch()
    (tmp_path / "sitecustomize.py").write_text(
        "import os, sys\n"
        "if 'fastcount.server.worker' in sys.orig_argv:\n"
        "    try:\n"
        f"        os.unlink({str(armed)!r})\n"
        "    except FileNotFoundError:\n"
        f"        os.environ.pop({FAILPOINT!r}, None)\n"
    )
    return {"PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}", FAILPOINT: "1000000"}


def as_items(counts: dict[str, int]) -> list[dict[str, object]]:
    return [{"key": key, "value": value} for key, value in counts.items()]


def test_worker_killed_with_a_committed_unacknowledged_batch_is_recovered_without_counting_it_twice(
    start_server: StartServer, database: Database, prefix: str, tmp_path: Path
) -> None:
    # (A short graceful timeout only bounds the teardown if the test fails while the first worker still lives.)
    server = start_server("--graceful-timeout", "5", workers=1, env=failpoint_in_the_first_worker_only(tmp_path))
    [worker] = server.worker_pids()
    committed = {f"{prefix}{i}": i + 1 for i in range(20)}
    assert request(server.port, "POST", "/increment", as_items(committed))[0] == 202  # one request: one batch
    # The batch committed, the connection "broke", the retry was refused by the ledger: committed, still in flight.
    server.wait_for_log(r"event=batch_already_committed writer=\S+ seq=1")
    found = re.search(r"role=worker0 .* event=flush_failed writer=(\S+) seq=1 ", server.log)
    assert found, server.log
    dead_writer = found.group(1)
    assert database.counts(prefix) == committed
    pending = {f"{prefix}{i}": 100 for i in range(10, 30)}  # journaled behind the stuck batch, never flushed
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    for key, value in pending.items():
        assert increment(conn, key, value) == 202
    conn.close()
    assert database.counts(prefix) == committed, "the worker's lane is still retrying its first batch"

    os.kill(worker, signal.SIGKILL)
    server.wait_for_log(rf"event=journals_recovered slot=0 pid=\d+ dead_pid={worker}")
    expected = {key: committed.get(key, 0) + pending.get(key, 0) for key in {*committed, *pending}}
    assert database.counts(prefix) == expected, "the committed batch counted once, the pending records once"
    recovery = [line for line in server.log.splitlines() if "role=recovery0" in line]
    assert any(f"event=journal_recovered writer={dead_writer} seq=1 " in line for line in recovery), recovery
    refused = f"event=batch_already_committed writer={dead_writer} seq=1"
    assert any(line.endswith(refused) for line in recovery), recovery
    assert any(f"event=journal_recovered writer={dead_writer} seq=2 " in line for line in recovery), recovery
    assert server.stop() == 0
    assert database.counts(prefix) == expected
