"""A worker's own upkeep: its once-a-second tick survives errors, so the heartbeat never stops while it serves."""

from __future__ import annotations

import asyncio
import time

import pytest

from fastcount.observability.stats import WorkerStats
from fastcount.server import worker as worker_module

from conftest import StartServer
from httpclient import request


def test_an_error_in_every_stats_snapshot_is_logged_once_and_the_heartbeat_goes_on(
    start_server: StartServer, prefix: str
) -> None:
    heartbeat_timeout = 2.0
    server = start_server(
        env={"FASTCOUNT_FAILPOINT_PUBLISH_RAISES": "1", "FASTCOUNT_HEARTBEAT_TIMEOUT": str(heartbeat_timeout)},
        # the injected failure, logged with its traceback once by the tick and once by the last snapshot at stop
        expect_errors=(r"event=tick_failed", r"event=last_snapshot_failed", r"^Traceback"),
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


def test_a_background_job_that_fails_is_counted_and_started_again(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(worker_module, "JOB_FIRST_DELAY", 0.01)
    runs: list[int] = []

    async def flaky_report_job() -> None:
        runs.append(1)
        if len(runs) < 3:
            raise RuntimeError("a report that failed")

    stats = WorkerStats()
    worker = worker_module.Worker.__new__(worker_module.Worker)
    worker.slot = 0
    asyncio.run(asyncio.wait_for(worker._supervise(flaky_report_job, stats), 10))
    assert len(runs) == 3, "started again after each failure, until it finished"
    assert stats.background_job_failures == 2


def test_the_loop_lag_probe_wakes_an_idle_worker_twenty_times_a_second_not_a_thousand() -> None:
    """An idle worker's probe must not burn CPU (the 1 ms timer kept one at ~3.5% of a core); with traffic it
    samples every millisecond again. Timers fire late, never early, so the idle bound cannot fail by chance."""
    import uvloop

    stats = WorkerStats()
    probe = stats.loop_lag

    async def fires_in(seconds: float) -> int:
        before = sum(stats.loop_lag_seconds.counts)
        await asyncio.sleep(seconds)
        return sum(stats.loop_lag_seconds.counts) - before

    async def main() -> tuple[int, int]:
        probe.start(asyncio.get_running_loop())
        probe.pace(busy=False)
        await asyncio.sleep(0.06)  # the 1 ms timer queued before pace() has fired by now
        idle = await fires_in(0.5)
        probe.pace(busy=True)
        await asyncio.sleep(0.06)
        busy = await fires_in(0.5)
        probe.stop()
        return idle, busy

    idle, busy = uvloop.run(main())
    assert idle <= 0.5 / 0.05 + 1, idle
    assert busy > 2 * idle, (idle, busy)


def test_the_probe_does_not_count_the_idle_wait_as_own_lag_when_traffic_starts(monkeypatch: pytest.MonkeyPatch) -> None:
    """A 50 ms timer set while idle fires after the tick switched to 1 ms: its own lag must subtract the 50 ms it
    was set for, or lateness caused by other processes is counted as the worker's own work (found in review)."""
    import fastcount.observability.stats as stats_module

    clock = {"wall": 100.0, "cpu": 5.0}
    monkeypatch.setattr(stats_module, "perf_counter", lambda: clock["wall"])
    monkeypatch.setattr(stats_module, "thread_time", lambda: clock["cpu"])

    class Loop:
        def call_later(self, delay: float, callback: object) -> None:
            return None

    probe = WorkerStats().loop_lag
    probe.pace(busy=False)
    probe.start(Loop())  # type: ignore[arg-type]  # a timer due in 50 ms
    clock["cpu"] += 0.030  # 30 ms of our CPU within those 50 ms
    probe.pace(busy=True)  # the tick saw requests
    clock["wall"] += 0.053  # fires 3 ms late, with none of our CPU in those 3 ms
    probe._fire()
    assert probe.take_max()[1] <= 0.0
