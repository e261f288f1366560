"""Benchmark runner: fastcount against uvicorn and nginx baselines, measured the same way in the same run.

For each round it starts each contender pinned to core 0, drives it with wrk pinned to core 1 (keep-alive, no
pipelining), and reads the server's CPU time (all its processes, from /proc) before and after. CPU per request is the
figure that compares fairly: wrk saturates its own core near 100k req/s here. For fastcount it then stops the server
(graceful: final flush) and checks that PostgreSQL holds a total no smaller than the requests wrk completed and no
larger than that plus the requests that could have been in flight.

    python bench/run.py [--duration 10] [--rounds 2] [--connections 64] [--script increment_hot.lua]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psycopg

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(ROOT))

from fastcount.store.embedded import temporary_postgres  # noqa: E402

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
SERVER_CPU = "0"
CLIENT_CPU = "1"


@dataclass
class Measurement:
    contender: str
    round: int
    requests: int
    seconds: float
    requests_per_second: float
    cpu_seconds: float
    cpu_us_per_request: float
    latency_ms: dict[str, float]
    non_2xx: int
    socket_errors: int
    checked_total: str = ""
    extra: dict[str, object] = field(default_factory=dict)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_for_port(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listening on {port} after {timeout}s")


def process_tree(root: int) -> list[int]:
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            parents[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    tree, frontier = [root], [root]
    while frontier:
        children = [pid for pid, ppid in parents.items() if ppid in frontier]
        tree.extend(children)
        frontier = children
    return tree


def cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / CLOCK_TICKS


def run_wrk(port: int, script: str, duration: float, connections: int) -> dict[str, object]:
    command = [
        "taskset", "-c", CLIENT_CPU, "wrk", "-t1", f"-c{connections}", f"-d{int(duration)}s", "--latency",
        "-s", str(BENCH / script), f"http://127.0.0.1:{port}",
    ]  # fmt: skip
    output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    requests = int(re.search(r"(\d+) requests in ([\d.]+)(\w+)", output).group(1))  # type: ignore[union-attr]
    latency = {
        pct: _to_ms(value, unit) for pct, value, unit in re.findall(r"^\s+(50|75|90|99)%\s+([\d.]+)(\w+)", output, re.M)
    }
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output)
    return {
        "requests": requests,
        "latency_ms": latency,
        "non_2xx": int(non_2xx.group(1)) if non_2xx else 0,
        "socket_errors": sum(int(n) for n in errors.groups()) if errors else 0,
        "raw": output,
    }


def _to_ms(value: str, unit: str) -> float:
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


class Contender:
    name = ""

    def start(self, port: int) -> subprocess.Popen[bytes]:
        raise NotImplementedError

    def after(self, process: subprocess.Popen[bytes], completed: int, connections: int) -> str:
        return ""


class Fastcount(Contender):
    name = "fastcount"

    def __init__(self, dsn: str, script: str) -> None:
        self.dsn = dsn
        # verve_*.lua scripts send a new id per request: check ids stored, not counter totals
        self.total_sql = (
            "SELECT count(*) FROM verve_ids" if Path(script).name.startswith("verve") else
            "SELECT coalesce(sum(value), 0) FROM counters"
        )  # fmt: skip

    def start(self, port: int) -> subprocess.Popen[bytes]:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            conn.execute(
                "CREATE TABLE IF NOT EXISTS counters (key text PRIMARY KEY, value bigint, updated_at timestamptz)"
            )
            conn.execute("TRUNCATE counters")
            conn.execute(
                "CREATE TABLE IF NOT EXISTS verve_ids (window_start bigint, id bigint, PRIMARY KEY (window_start, id))"
            )
            conn.execute("TRUNCATE verve_ids")
        command = [sys.executable, "-m", "fastcount", "serve", "--port", str(port), "--workers", "1", "--dsn", self.dsn]
        command += ["--admin-port", str(free_port())]  # every feature on, metrics included
        return subprocess.Popen(["taskset", "-c", SERVER_CPU, *command], cwd=ROOT, stderr=subprocess.DEVNULL)

    def after(self, process: subprocess.Popen[bytes], completed: int, connections: int) -> str:
        process.send_signal(signal.SIGTERM)
        process.wait(60)
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            row = conn.execute(self.total_sql).fetchone()
        total = int(row[0]) if row else 0
        # wrk counts completed responses; requests cut off at the end were sent (and counted) but not answered.
        if not completed <= total <= completed + connections:
            raise SystemExit(f"COUNT MISMATCH: postgres total {total}, wrk completed {completed} (+{connections})")
        return f"postgres total {total} for {completed} completed (+<= {connections} in flight)"


class Uvicorn(Contender):
    name = "uvicorn"

    def start(self, port: int) -> subprocess.Popen[bytes]:
        command = [
            sys.executable, "-m", "uvicorn", "asgi_baseline:app", "--port", str(port), "--workers", "1",
            "--loop", "uvloop", "--http", "httptools", "--no-access-log", "--log-level", "warning",
        ]  # fmt: skip
        return subprocess.Popen(["taskset", "-c", SERVER_CPU, *command], cwd=BENCH, stderr=subprocess.DEVNULL)


class Nginx(Contender):
    name = "nginx"

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir

    def start(self, port: int) -> subprocess.Popen[bytes]:
        config = self.workdir / f"nginx-{port}.conf"
        config.write_text(
            f"""
            daemon off; worker_processes 1; pid {self.workdir}/nginx-{port}.pid; error_log stderr error;
            events {{ worker_connections 4096; }}
            http {{
                access_log off;
                client_body_temp_path {self.workdir};
                server {{ listen 127.0.0.1:{port} backlog=4096; location / {{ return 202; }} }}
            }}
            """
        )
        command = ["nginx", "-c", str(config), "-p", str(self.workdir)]
        return subprocess.Popen(["taskset", "-c", SERVER_CPU, *command], stderr=subprocess.DEVNULL)


def measure(contender: Contender, round_: int, args: argparse.Namespace) -> Measurement:
    port = free_port()
    process = contender.start(port)
    try:
        wait_for_port(port)
        time.sleep(0.5)
        warmup = run_wrk(port, args.script, 1, args.connections)
        pids = process_tree(process.pid)
        before = cpu_seconds(pids)
        started = time.monotonic()
        result = run_wrk(port, args.script, args.duration, args.connections)
        elapsed = time.monotonic() - started
        used = cpu_seconds(pids) - before
        requests = int(result["requests"])  # type: ignore[call-overload]
        checked = contender.after(process, requests + int(warmup["requests"]), 2 * args.connections)  # type: ignore[call-overload]
        return Measurement(
            contender=contender.name,
            round=round_,
            requests=requests,
            seconds=round(elapsed, 2),
            requests_per_second=round(requests / elapsed),
            cpu_seconds=round(used, 2),
            cpu_us_per_request=round(used / requests * 1e6, 2),
            latency_ms=result["latency_ms"],  # type: ignore[arg-type]
            non_2xx=int(result["non_2xx"]) + int(warmup["non_2xx"]),  # type: ignore[call-overload]
            socket_errors=int(result["socket_errors"]),  # type: ignore[call-overload]
            checked_total=checked,
        )
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM if contender.name != "nginx" else signal.SIGQUIT)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--script", default="increment_hot.lua")
    parser.add_argument("--only", default="", help="comma-separated contenders to run (fastcount,uvicorn,nginx)")
    args = parser.parse_args()
    if not shutil.which("wrk"):
        raise SystemExit("wrk is not installed (Debian: apt-get install wrk)")

    results: list[Measurement] = []
    with temporary_postgres("fastcount-bench-") as database:
        contenders: list[Contender] = [Fastcount(database.dsn, args.script), Uvicorn()]
        if shutil.which("nginx"):
            contenders.append(Nginx(database.data_dir.parent))
        else:
            print("nginx not installed (Debian: apt-get install nginx-light): no nginx baseline", file=sys.stderr)
        if args.only:
            contenders = [c for c in contenders if c.name in args.only.split(",")]
        for round_ in range(1, args.rounds + 1):
            for contender in contenders:  # alternate, so drift on this shared machine hits every contender alike
                result = measure(contender, round_, args)
                results.append(result)
                print(
                    f"{result.contender:10s} round {round_}: {result.requests_per_second:7d} req/s  "
                    f"{result.cpu_us_per_request:6.2f} us CPU/req  p50 {result.latency_ms.get('50', 0):.2f} ms  "
                    f"p99 {result.latency_ms.get('99', 0):.2f} ms  non-2xx {result.non_2xx}  "
                    f"errors {result.socket_errors}  {result.checked_total}",
                    flush=True,
                )

    cpu = {name: statistics.median(r.cpu_us_per_request for r in results if r.contender == name) for name in
           {r.contender for r in results}}  # fmt: skip
    print(f"\nmedian CPU per request ({args.script}, -c{args.connections}, {args.duration:.0f}s x {args.rounds}):")
    for name, value in sorted(cpu.items()):
        print(f"  {name:10s} {value:6.2f} us")
    if "fastcount" in cpu:
        for baseline, target in (("uvicorn", 1 / 3), ("nginx", 1.25)):
            if baseline in cpu:
                ratio = cpu["fastcount"] / cpu[baseline]
                verdict = "meets" if ratio <= target else "MISSES"
                print(f"  fastcount / {baseline}: {ratio:.2f} (target <= {target:.2f}: {verdict})")
    out_dir = BENCH / "results"
    out_dir.mkdir(exist_ok=True)
    out_file = out_dir / f"{time.strftime('%Y%m%d-%H%M%S')}-{Path(args.script).stem}.json"
    out_file.write_text(json.dumps({"args": vars(args), "results": [asdict(r) for r in results]}, indent=2))
    print(f"results written to {out_file.relative_to(ROOT)}")
    return 0 if all(r.non_2xx == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
