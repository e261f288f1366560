"""A worker's own upkeep: its once-a-second tick survives errors, so the heartbeat never stops while it serves."""

from __future__ import annotations

import time

from conftest import StartServer
from httpclient import request


def test_an_error_in_every_stats_snapshot_is_logged_once_and_the_heartbeat_goes_on(
    start_server: StartServer, prefix: str
) -> None:
    heartbeat_timeout = 2.0
    server = start_server(
        env={"FASTCOUNT_FAILPOINT_PUBLISH_RAISES": "1", "FASTCOUNT_HEARTBEAT_TIMEOUT": str(heartbeat_timeout)}
    )
    [worker] = server.worker_pids()
    server.wait_for_log(r"event=tick_failed")
    # Three heartbeat timeouts with every snapshot failing: a tick that died with its first error would have
    # stopped the heartbeat, and the master would have killed the worker as unresponsive.
    deadline = time.monotonic() + 3 * heartbeat_timeout
    while time.monotonic() < deadline:
        assert server.worker_pids() == [worker], server.log
        time.sleep(0.2)
    assert "event=worker_unresponsive" not in server.log
    assert server.log.count("event=tick_failed") == 1, "logged once a minute, not every second"
    assert request(server.port, "POST", "/increment", {"key": prefix + "a", "value": 1})[0] == 202
