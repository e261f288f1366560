"""More clients than file descriptors (issue #11): fastcount under a descriptor limit, driven by many connections.

Starts a private PostgreSQL, then `fastcount serve` (2 workers by default) with RLIMIT_NOFILE set as given (as a shell's
`ulimit -n` would), runs wrk with thousands of keep-alive connections of random-key increments, and reports what wrk
saw (requests, errors), what the server logged (failed flushes, the cap, accept errors) and whether PostgreSQL holds
every request wrk completed.

    python bench/fd_limits.py --nofile 1024 [--hard 1024] [--connections 4000] [--duration 10] [--workers 2]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import psycopg

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(ROOT))

from fastcount.store.embedded import temporary_postgres  # noqa: E402


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wrk_summary(output: str) -> dict[str, float]:
    summary: dict[str, float] = {}
    if match := re.search(r"(\d+) requests in ([\d.]+)(\w+)", output):
        summary["requests"] = int(match.group(1))
    if match := re.search(r"Requests/sec:\s+([\d.]+)", output):
        summary["requests_per_second"] = float(match.group(1))
    if match := re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output):
        for name, value in zip(("connect", "read", "write", "timeout"), match.groups(), strict=True):
            summary[f"{name}_errors"] = int(value)
    if match := re.search(r"Non-2xx or 3xx responses: (\d+)", output):
        summary["non_2xx"] = int(match.group(1))
    return summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nofile", type=int, required=True, help="soft RLIMIT_NOFILE of the server")
    parser.add_argument("--hard", type=int, default=0, help="hard RLIMIT_NOFILE of the server (default: --nofile)")
    parser.add_argument("--connections", type=int, default=4000)
    parser.add_argument("--duration", type=int, default=10)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--script", default="increment_random.lua")
    parser.add_argument("server_args", nargs="*", help="extra `fastcount serve` flags (after --)")
    args = parser.parse_args()
    if not shutil.which("wrk"):
        raise SystemExit("wrk is not installed (Debian: apt-get install wrk)")
    limits = (args.nofile, args.hard or args.nofile)

    def lower_nofile() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, limits)

    with temporary_postgres("fastcount-fdbench-") as database, tempfile.TemporaryDirectory() as workdir:
        port, admin_port = free_port(), free_port()
        log_path = Path(workdir) / "server.log"
        command = [
            sys.executable, "-m", "fastcount", "serve", "--host", "127.0.0.1", "--port", str(port),
            "--workers", str(args.workers), "--dsn", database.dsn, "--admin-port", str(admin_port),
            *args.server_args,
        ]  # fmt: skip
        with log_path.open("wb") as log_file:
            server = subprocess.Popen(
                command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=log_file, preexec_fn=lower_nofile
            )
        try:
            deadline = time.monotonic() + 60
            while "event=serving" not in log_path.read_text(errors="replace"):
                if server.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"server did not start:\n{log_path.read_text(errors='replace')}")
                time.sleep(0.1)
            load = [
                "wrk", "-t2", f"-c{args.connections}", f"-d{args.duration}s", "--latency",
                "-s", str(BENCH / args.script), f"http://127.0.0.1:{port}",
            ]  # fmt: skip
            wrk = subprocess.run(load, capture_output=True, text=True, check=True)
            time.sleep(2)  # a flush or two after the load, so the metrics show the end state
            metrics = urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/metrics", timeout=10).read().decode()
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(120)
        log = log_path.read_text(errors="replace")
        with psycopg.connect(database.dsn) as conn:
            row = conn.execute("SELECT coalesce(sum(value), 0) FROM counters WHERE key LIKE 'rnd-%'").fetchone()
            stored = int(row[0]) if row else 0
    summary = wrk_summary(wrk.stdout)
    wanted = re.compile(r"^fastcount_(http_accept_errors_total|http_accept_pauses_total|http_max_connections|"
                        r"worker_fd_limit)\{.*\} [\d.e+]+$")  # fmt: skip
    report = {
        "nofile": list(limits),
        "connections": args.connections,
        "wrk": summary,
        "stored_in_postgres": stored,
        "flush_failed_lines": log.count("event=flush_failed"),
        "accept_failed_lines": log.count("event=accept_failed"),
        "cap_lines": [line.split(" ", 3)[-1] for line in log.splitlines() if "event=worker_serving" in line],
        "metrics": [line for line in metrics.splitlines() if wanted.match(line) and not line.endswith(" 0.0")],
    }
    print(wrk.stdout)
    print(json.dumps(report, indent=2))
    completed = int(summary.get("requests", 0))
    if not completed <= stored <= completed + args.connections:
        print(f"COUNT MISMATCH: postgres {stored}, wrk completed {completed} (+{args.connections} in flight)")
        return 1
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
