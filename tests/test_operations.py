"""Operations: Prometheus metrics, sd_notify, the systemd unit, settings reload, crashes under load."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import ROOT, StartServer, free_port, wait_until
from httpclient import raw, request, statuses
from load import Load


def scrape(admin_port: int) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """Samples by name, keyed by their sorted labels."""
    with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/metrics", timeout=5) as response:
        text = response.read().decode()
    samples: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return samples


def by_worker(samples: dict[tuple[tuple[str, str], ...], float]) -> dict[str, float]:
    return {dict(labels)["worker"]: value for labels, value in samples.items()}


def test_metrics_have_per_worker_series_that_add_up(start_server: StartServer, prefix: str) -> None:
    admin = free_port()
    server = start_server("--admin-port", str(admin), workers=2)
    for i in range(40):
        assert request(server.port, "POST", "/increment", {"key": f"{prefix}{i}", "value": 1})[0] == 202
    assert request(server.port, "GET", "/nowhere")[0] == 404

    def accepted() -> float:
        answers = scrape(admin).get("fastcount_http_responses_total", {})
        return sum(v for labels, v in answers.items() if ("route", "increment") in labels and ("code", "202") in labels)

    wait_until(lambda: accepted() >= 40, "workers publish their counts on their one-second tick")
    wait_until(lambda: "fastcount_flush_duration_seconds_bucket" in scrape(admin), "a flush is observed")
    samples = scrape(admin)
    answers = samples["fastcount_http_responses_total"]
    assert accepted() == 40
    assert sum(v for labels, v in answers.items() if ("code", "404") in labels) == 1
    assert set(by_worker(samples["fastcount_http_requests_total"])) == {"0", "1"}
    assert sum(by_worker(samples["fastcount_http_requests_total"]).values()) == 41
    assert set(by_worker(samples["fastcount_postgres_connected"]).values()) == {1.0}
    assert set(by_worker(samples["fastcount_journal_used_bytes"])) == {"0", "1"}
    assert all(value > 0 for value in by_worker(samples["fastcount_worker_resident_memory_bytes"]).values())
    assert "fastcount_flush_duration_seconds_bucket" in samples
    flushes = samples["fastcount_flush_duration_seconds_count"]
    assert {dict(labels)["buffer"] for labels in flushes} >= {"increment"}, "flush durations carry their buffer"
    probe_runs = by_worker(samples["fastcount_event_loop_lag_seconds_count"])
    assert set(probe_runs) == {"0", "1"} and all(count > 0 for count in probe_runs.values())
    assert set(by_worker(samples["fastcount_event_loop_lag_max_seconds"])) == {"0", "1"}
    assert samples["fastcount_workers_ready"][()] == 2


def test_metrics_pass_promtool(start_server: StartServer) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        # .ci/run installs it and sets this: in CI a missing promtool is a failure, not a skip.
        assert not os.environ.get("FASTCOUNT_TEST_REQUIRE_TOOLS"), "promtool is required here but not installed"
        pytest.skip("promtool not installed (Debian: apt-get install prometheus); the parser-based check still runs")
    admin = free_port()
    server = start_server("--admin-port", str(admin))
    request(server.port, "POST", "/increment", {"key": "promtool", "value": 1})
    wait_until(lambda: "fastcount_http_requests_total" in scrape(admin), "the worker published its counts")
    with urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics", timeout=5) as response:
        exposition = response.read()
    result = subprocess.run([promtool, "check", "metrics"], input=exposition, capture_output=True)
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()


def test_exposition_parses_with_one_help_and_type_per_family_and_consistent_histograms(
    start_server: StartServer, prefix: str
) -> None:
    """Always runs (promtool may be missing): the text format as prometheus_client's own parser reads it."""
    admin = free_port()
    server = start_server("--admin-port", str(admin), workers=2)
    assert request(server.port, "POST", "/increment", {"key": prefix + "a", "value": 1})[0] == 202
    wait_until(lambda: "fastcount_flush_duration_seconds_bucket" in scrape(admin), "a flush is observed")
    with urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics", timeout=5) as response:
        assert response.headers["Content-Type"].startswith("text/plain; version=")
        text = response.read().decode()
    assert text.endswith("\n")
    status, headers, _ = request(admin, "POST", "/metrics")  # a 405 names what is allowed (RFC 9110 15.5.6)
    assert (status, headers.get("Allow")) == (405, "GET")
    helps = [line.split()[2] for line in text.splitlines() if line.startswith("# HELP ")]
    types = [line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")]
    assert len(helps) == len(set(helps)) and sorted(helps) == sorted(types), "one HELP and one TYPE per family"
    families = list(text_string_to_metric_families(text))
    assert {family.name for family in families} == {name.removesuffix("_total") for name in types}
    for family in families:
        assert family.name.startswith("fastcount_") and family.documentation, family.name
        assert family.type in ("counter", "gauge", "histogram"), (family.name, family.type)
        for sample in family.samples:
            assert (sample.value == sample.value and sample.value >= 0) or family.type == "gauge", sample  # no NaN
            if family.type == "counter":
                assert sample.name.endswith(("_total", "_created")), sample.name
        if family.type == "histogram":
            series: dict[tuple[tuple[str, str], ...], list[tuple[float, float]]] = {}
            counts: dict[tuple[tuple[str, str], ...], float] = {}
            for sample in family.samples:
                labels = tuple(sorted((k, v) for k, v in sample.labels.items() if k != "le"))
                if sample.name.endswith("_bucket"):
                    series.setdefault(labels, []).append((float(sample.labels["le"]), sample.value))
                elif sample.name.endswith("_count"):
                    counts[labels] = sample.value
            for labels, buckets in series.items():
                values = [value for _, value in sorted(buckets)]
                assert values == sorted(values), f"{family.name}{labels}: buckets must be cumulative"
                assert sorted(buckets)[-1][0] == float("inf") and values[-1] == counts[labels], family.name


def test_counters_never_go_backwards_across_a_worker_restart(start_server: StartServer, prefix: str) -> None:
    admin = free_port()
    server = start_server("--admin-port", str(admin), workers=2)
    for i in range(30):
        request(server.port, "POST", "/increment", {"key": f"{prefix}{i}", "value": 1})

    def published_requests() -> float:
        return sum(by_worker(scrape(admin).get("fastcount_http_requests_total", {})).values())

    wait_until(lambda: published_requests() >= 30, "both workers published their counts")
    wait_until(lambda: sum(by_worker(scrape(admin)["fastcount_flushes_total"]).values()) >= 1, "a flush is counted")
    before = scrape(admin)
    victim = server.worker_pids()[0]
    os.kill(victim, signal.SIGKILL)
    server.wait_for_log(r"event=worker_ready", count=3)
    wait_until(lambda: scrape(admin)["fastcount_worker_restarts_total"][()] == 1, "the restart is counted")
    wait_until(lambda: scrape(admin)["fastcount_workers_ready"][()] == 2, "the replacement reports")
    after = scrape(admin)
    for name in ("fastcount_http_requests_total", "fastcount_http_sent_bytes_total", "fastcount_flushes_total"):
        for worker, value in by_worker(before[name]).items():
            assert by_worker(after[name])[worker] >= value, f"{name} went backwards for worker {worker}"
    assert after["fastcount_worker_restarts_total"][()] == 1


def test_killed_worker_under_load_is_replaced_and_other_clients_keep_going(
    start_server: StartServer, prefix: str
) -> None:
    server = start_server(workers=2)
    with Load(server.port, prefix, keys=50, clients=6) as load:
        load.wait_for_answers(200)
        os.kill(server.worker_pids()[0], signal.SIGKILL)  # while the clients send
        server.wait_for_log(r"event=worker_ready", count=3)
        load.wait_for_answers(500)
    assert len(load.errors) <= 6, "only connections held by the killed worker may fail"
    assert load.statuses[202] > 500
    assert set(load.statuses) == {202}
    assert "event=worker_died" in server.log


def receive_notifications(sock: socket.socket, until: str, timeout: float = 30.0) -> list[str]:
    messages: list[str] = []
    deadline = time.monotonic() + timeout
    while not any(until in message for message in messages):
        sock.settimeout(max(0.1, deadline - time.monotonic()))
        messages.append(sock.recv(4096).decode())
    return messages


@pytest.mark.parametrize("abstract", [False, True])
def test_sd_notify_ready_reloading_stopping(start_server: StartServer, tmp_path: Path, abstract: bool) -> None:
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    address = f"@fastcount-test-{os.getpid()}-{time.monotonic_ns()}" if abstract else str(tmp_path / "notify")
    notify.bind("\0" + address[1:] if abstract else address)
    with notify:
        server = start_server(workers=2, env={"NOTIFY_SOCKET": address})
        ready = receive_notifications(notify, "READY=1")
        assert any("STATUS=serving" in message for message in ready)
        assert statuses(raw(server.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n", wait=0.3)) == [200]
        server.process.send_signal(signal.SIGHUP)
        reload_messages = receive_notifications(notify, "READY=1")
        assert "RELOADING=1" in reload_messages[0] and "MONOTONIC_USEC=" in reload_messages[0]
        server.stop()
        assert any("STOPPING=1" in message for message in receive_notifications(notify, "STOPPING=1"))


def test_reload_applies_a_changed_env_file(start_server: StartServer, tmp_path: Path) -> None:
    env_file = tmp_path / "fastcount.env"
    env_file.write_text("# settings\nFASTCOUNT_MAX_BODY=100000\n")
    server = start_server("--env-file", str(env_file), workers=1)
    big = {"key": "reload-" + "k" * 200, "value": 1}
    assert request(server.port, "POST", "/increment", big)[0] == 202
    env_file.write_text("FASTCOUNT_MAX_BODY=100\nFASTCOUNT_BACKLOG=1000\nFASTCOUNT_PORT=1\n")
    server.process.send_signal(signal.SIGHUP)
    server.wait_for_log(r"event=reload_done generation=1")
    assert "event=reload_settings_need_restart settings=backlog" in server.log  # --port on the command line wins
    assert request(server.port, "POST", "/increment", big)[0] == 413, "the new body limit is in force"


def test_systemd_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        assert not os.environ.get("FASTCOUNT_TEST_REQUIRE_TOOLS"), "systemd-analyze is required here but not installed"
        pytest.skip("systemd-analyze not installed (Debian: apt-get install systemd)")
    unit = (ROOT / "systemd" / "fastcount.service").read_text()
    fastcount = Path(sys.executable).with_name("fastcount")
    assert "/opt/fastcount/.venv/bin/fastcount" in unit
    (tmp_path / "fastcount.service").write_text(unit.replace("/opt/fastcount/.venv/bin/fastcount", str(fastcount)))
    result = subprocess.run([analyze, "verify", str(tmp_path / "fastcount.service")], capture_output=True, text=True)
    problems = [line for line in result.stderr.splitlines() if "fastcount.service" in line]
    assert result.returncode == 0 and not problems, result.stderr
