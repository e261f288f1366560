"""Reload and crash under wrk: the operations claims, checked with real load.

Two runs against fastcount with 2 workers on a private PostgreSQL, wrk -t1 -c64 for --duration seconds each:
1. `reload`: SIGHUP to the master at 1/4 and 1/2 of the run. Claim: zero socket errors, zero non-2xx, exact totals.
2. `kill`: SIGKILL to one worker at 1/3 of the run. Claim: the worker is replaced (time from the kill to the new
   worker's `worker_ready` is printed), wrk keeps going; only requests on the killed worker's connections fail.
After each run the server is stopped gracefully and PostgreSQL's total is compared with what wrk completed.

    python bench/reload_under_load.py [--duration 12]
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psycopg

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(BENCH))

from run import free_port, run_wrk, wait_for_port  # noqa: E402

from fastcount.store.embedded import temporary_postgres  # noqa: E402


def worker_pids(master: int) -> list[int]:
    return [int(pid) for pid in Path(f"/proc/{master}/task/{master}/children").read_text().split()]


def scenario(name: str, dsn: str, duration: float, log_path: Path) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS counters (key text PRIMARY KEY, value bigint, updated_at timestamptz)")
        conn.execute("TRUNCATE counters")
    port = free_port()
    command = [sys.executable, "-m", "fastcount", "serve", "--port", str(port), "--workers", "2", "--dsn", dsn]
    with log_path.open("wb") as log_file:
        server = subprocess.Popen([*command, "--admin-port", "0"], cwd=ROOT, stderr=log_file)
    wait_for_port(port)
    time.sleep(1.0)
    events: list[str] = []

    def disturb() -> None:
        if name == "reload":
            for fraction in (0.25, 0.5):
                time.sleep(duration * fraction - (0 if fraction == 0.25 else duration * 0.25))
                server.send_signal(signal.SIGHUP)
                events.append(f"SIGHUP at {time.monotonic():.3f}")
        else:
            time.sleep(duration / 3)
            victim = worker_pids(server.pid)[0]
            killed_at = time.monotonic()
            os.kill(victim, signal.SIGKILL)
            ready_before = log_path.read_text().count("event=worker_ready")
            while log_path.read_text().count("event=worker_ready") == ready_before:
                time.sleep(0.005)
            events.append(f"worker {victim} killed; replacement serving after {time.monotonic() - killed_at:.3f} s")

    disturber = threading.Thread(target=disturb)
    disturber.start()
    result = run_wrk(port, "increment_hot.lua", duration, 64)
    disturber.join()
    server.send_signal(signal.SIGTERM)
    server.wait(60)
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute("SELECT coalesce(sum(value), 0) FROM counters").fetchone()
    total = int(row[0]) if row else 0
    completed = int(result["requests"])  # type: ignore[call-overload]
    print(f"[{name}] " + "; ".join(events))
    print(
        f"[{name}] wrk: {completed} completed, non-2xx {result['non_2xx']}, socket errors {result['socket_errors']}"
        f" ({(re.search(r'Socket errors:.*', str(result['raw'])) or re.search('', '')).group(0) or 'none'})"
    )
    print(f"[{name}] postgres total {total}: {total - completed:+d} against completed (in flight at the end: <= 64)")
    reloads = log_path.read_text().count("event=reload_done")
    print(f"[{name}] reloads done: {reloads}, restarts logged: {log_path.read_text().count('event=worker_died')}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=12.0)
    args = parser.parse_args()
    with temporary_postgres("fastcount-reload-bench-") as database:
        for name in ("reload", "kill"):
            scenario(name, database.dsn, args.duration, database.data_dir.parent / f"{name}.log")


if __name__ == "__main__":
    main()
