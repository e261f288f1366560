"""Benchmark runner: fastcount against uvicorn, bare and nginx baselines, measured the same way in the same run.

"bare" (bench/bare_baseline.py) is the floor of a Python server of this shape: uvloop, httptools and orjson doing
POST /increment and nothing else (increment scripts, 1 worker); fastcount / bare is what fastcount's own work costs.

For each round it starts each contender pinned to core 0, drives it with wrk pinned to core 1 (keep-alive, no
pipelining; this runner and the PostgreSQL it starts for fastcount are on core 1 too), and reads the server's CPU
time (all its processes, from /proc) before and after. CPU per request is the figure that compares fairly: wrk
saturates its own core near 100k req/s here. For fastcount it then stops the server (graceful: final flush) and
checks that PostgreSQL holds a total no smaller than the requests wrk completed and no larger than that plus the
requests that could have been in flight.

While wrk runs against fastcount, two probes run from this process: the loop-lag gauges are read from the admin port
once a second (the longest event-loop lag of each second, wall clock and on-CPU), and a freshness probe posts a new
key every 50 ms on its own connection and polls PostgreSQL every 5 ms for it: the time from the 202 to the row.
With --workers 2 every server and wrk share both cores (nothing pinned apart).

    python bench/run.py [--duration 10] [--rounds 2] [--connections 64] [--script increment_hot.lua] [--workers 1]
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
import threading
import time
import urllib.request
from collections.abc import Callable
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
FRESHNESS_EVERY = 0.05  # seconds between freshness probe requests
FRESHNESS_POLL = 0.005  # seconds between PostgreSQL polls for the probe keys
TARGET_CPU_RATIO = 1.15  # fastcount / nginx, CPU per request
TARGET_VERVE_CPU_RATIO = 1.25  # the same for verve_*.lua (issue #8)
TARGET_P99_RATIO = 3.0  # fastcount / nginx, p99 latency
TARGET_LOOP_LAG_MS = 1.0


@dataclass
class Measurement:
    contender: str
    round: int
    requests: int
    seconds: float
    requests_per_second: float
    cpu_seconds: float
    cpu_us_per_request: float
    # of it, in user space: the kernel's share (TCP, epoll) is alike for every contender, so what a server adds is here
    user_us_per_request: float
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


def cpu_seconds(pids: list[int], user_only: bool = False) -> float:
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + (0 if user_only else int(fields[12]))  # utime, stime
    return total / CLOCK_TICKS


def run_wrk(port: int, script: str, duration: float, connections: int, cpus: str = CLIENT_CPU) -> dict[str, object]:
    command = [
        "taskset", "-c", cpus, "wrk", "-t1", f"-c{connections}", f"-d{int(duration)}s", "--latency",
        "-s", str(BENCH / script), f"http://127.0.0.1:{port}",
    ]  # fmt: skip
    output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    requests = int(re.search(r"(\d+) requests in ([\d.]+)(\w+)", output).group(1))  # type: ignore[union-attr]
    latency = {
        pct: _to_ms(value, unit) for pct, value, unit in re.findall(r"^\s+(50|75|90|99)%\s+([\d.]+)(\w+)", output, re.M)
    }
    tail = re.search(r"tail-us p99=(\d+) p999=(\d+) max=(\d+)", output)
    if tail:  # the script's done() reports microseconds, finer than wrk's own table
        latency["99"], latency["99.9"], latency["max"] = (int(n) / 1000 for n in tail.groups())
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
    workers = 1

    @property
    def cpus(self) -> str:
        return SERVER_CPU if self.workers == 1 else "0,1"

    def start(self, port: int) -> subprocess.Popen[bytes]:
        raise NotImplementedError

    def probes_start(self, port: int) -> None:
        """Start what watches the server while wrk drives it (nothing, for a baseline)."""

    def probes_stop(self) -> dict[str, object]:
        return {}

    def after(self, process: subprocess.Popen[bytes], completed: int, connections: int) -> str:
        return ""


class LagWatcher(threading.Thread):
    """Reads the per-second loop-lag gauges from the admin port: the longest lag of each second, any worker."""

    def __init__(self, admin_port: int) -> None:
        super().__init__(daemon=True)
        self.url = f"http://127.0.0.1:{admin_port}/metrics"
        self.stopped = threading.Event()
        self.wall: list[float] = []
        self.own: list[float] = []

    def run(self) -> None:
        while not self.stopped.wait(1.0):
            try:
                text = urllib.request.urlopen(self.url, timeout=2).read().decode()
            except OSError:
                continue
            for name, into in (("max", self.wall), ("own_max", self.own)):
                values = re.findall(rf"^fastcount_event_loop_lag_{name}_seconds{{[^}}]*}} (\S+)$", text, re.M)
                if values:
                    into.append(max(float(v) for v in values))


class FreshnessProbe(threading.Thread):
    """Posts a new key every FRESHNESS_EVERY on its own connection; a second thread polls PostgreSQL for the keys
    answered 202 and not yet seen. Freshness: the time from the 202 to the row being visible."""

    def __init__(self, port: int, dsn: str) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.dsn = dsn
        self.stopped = threading.Event()
        self.finished = threading.Event()
        self.answered: dict[str, float] = {}  # key -> when its 202 arrived
        self.lock = threading.Lock()
        self.delays: list[float] = []
        self.sent = 0
        self.poller = threading.Thread(target=self.poll, daemon=True)
        self.prefix = f"fresh-{port}-{time.monotonic_ns()}-"

    def run(self) -> None:
        self.poller.start()
        sock = socket.create_connection(("127.0.0.1", self.port))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with sock:
            while not self.stopped.wait(FRESHNESS_EVERY):
                key = f"{self.prefix}{self.sent}"
                body = json.dumps({"key": key, "value": 1}).encode()
                sock.sendall(
                    b"POST /increment HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
                    b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
                )
                answer = b""
                while b"\r\n\r\n" not in answer:
                    chunk = sock.recv(4096)
                    if not chunk:
                        return
                    answer += chunk
                self.sent += 1
                if answer.startswith(b"HTTP/1.1 202"):
                    with self.lock:
                        self.answered[key] = time.monotonic()

    def poll(self) -> None:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            while True:
                with self.lock:
                    waiting = list(self.answered)
                if waiting:
                    found = conn.execute("SELECT key FROM counters WHERE key = ANY(%s)", (waiting,)).fetchall()
                    now = time.monotonic()
                    with self.lock:
                        for (key,) in found:
                            self.delays.append(now - self.answered.pop(key))
                if self.finished.wait(FRESHNESS_POLL):
                    return

    def finish(self, settle: float) -> None:
        """Stop posting, give the server `settle` seconds to flush the last keys as it always does, stop polling."""
        self.stopped.set()
        self.join(5)
        deadline = time.monotonic() + settle
        while self.answered and time.monotonic() < deadline:
            time.sleep(FRESHNESS_POLL)
        self.finished.set()
        self.poller.join(5)


class Fastcount(Contender):
    name = "fastcount"

    def __init__(
        self,
        dsn: str,
        script: str,
        workers: int = 1,
        flush_interval: float = 1.0,
        root: Path = ROOT,
        name: str = "",
        postgres_pid: int = 0,
    ) -> None:
        self.name = name or self.name
        self.postgres_pid = postgres_pid  # its postmaster: PostgreSQL's CPU during the run is reported beside ours
        self.postgres_cpu = (0.0, 0.0)  # (CPU seconds, monotonic time) at probes_start
        self.root = root  # another checkout's package, to compare two versions in one run
        self.dsn = dsn
        self.workers = workers
        self.flush_interval = flush_interval
        self.admin_port = 0
        self.freshness_probe = not Path(script).name.startswith("verve")
        self.lag: LagWatcher | None = None
        self.fresh: FreshnessProbe | None = None
        self.probe_requests = 0
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
        self.admin_port = free_port()
        command = [sys.executable, "-m", "fastcount", "serve", "--port", str(port), "--dsn", self.dsn]
        command += ["--workers", str(self.workers), "--flush-interval", str(self.flush_interval)]
        command += ["--admin-port", str(self.admin_port)]  # every feature on, metrics included
        env = {**os.environ, "PYTHONPATH": str(self.root)}
        return subprocess.Popen(
            ["taskset", "-c", self.cpus, *command], cwd=self.root, env=env, stderr=subprocess.DEVNULL
        )

    def probes_start(self, port: int) -> None:
        if self.postgres_pid:
            self.postgres_cpu = (cpu_seconds(process_tree(self.postgres_pid)), time.monotonic())
        self.lag = LagWatcher(self.admin_port)
        self.lag.start()
        if self.freshness_probe:
            self.fresh = FreshnessProbe(port, self.dsn)
            self.fresh.start()

    def probes_stop(self) -> dict[str, object]:
        extra: dict[str, object] = {}
        if self.postgres_pid:
            # On 2 cores PostgreSQL shares wrk's core: its flush work there delays wrk, and what wrk measures (see
            # the README's benchmark section: 38 ms a second of PostgreSQL CPU alone moved fastcount's p99 from ~1.7
            # to ~4.4 ms). Reported so that every run shows how much of it there was.
            used, since = self.postgres_cpu
            elapsed = max(time.monotonic() - since, 1e-3)
            extra["postgres_cpu_ms_per_s"] = round(
                (cpu_seconds(process_tree(self.postgres_pid)) - used) / elapsed * 1000
            )
        if self.lag is not None:
            self.lag.stopped.set()
            self.lag.join(5)
            extra["loop_lag_max_ms"] = round(max(self.lag.wall, default=0.0) * 1000, 2)
            extra["loop_lag_own_max_ms"] = round(max(self.lag.own, default=0.0) * 1000, 2)
            extra["seconds_own_lag_over_1ms"] = sum(1 for own in self.lag.own if own > 0.001)
            extra["seconds_watched"] = len(self.lag.own)
        self.probe_requests = 0
        if self.fresh is not None:
            self.fresh.finish(settle=self.flush_interval + 1.0)
            self.probe_requests = self.fresh.sent
            extra.update(self.freshness(sorted(self.fresh.delays)))
            self.fresh = None
        return extra

    def freshness(self, delays: list[float]) -> dict[str, object]:
        if not delays:
            return {"freshness_samples": 0}
        return {
            "freshness_samples": len(delays),
            "freshness_p50_ms": round(delays[len(delays) // 2] * 1000, 1),
            "freshness_p99_ms": round(delays[min(len(delays) - 1, int(len(delays) * 0.99))] * 1000, 1),
            "freshness_max_ms": round(delays[-1] * 1000, 1),
        }

    def after(self, process: subprocess.Popen[bytes], completed: int, connections: int) -> str:
        completed += self.probe_requests  # the freshness probe's keys count too (value 1 each)
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

    def __init__(self, workers: int = 1) -> None:
        self.workers = workers

    def start(self, port: int) -> subprocess.Popen[bytes]:
        command = [
            sys.executable, "-m", "uvicorn", "asgi_baseline:app", "--port", str(port), "--workers", str(self.workers),
            "--loop", "uvloop", "--http", "httptools", "--no-access-log", "--log-level", "warning",
        ]  # fmt: skip
        return subprocess.Popen(["taskset", "-c", self.cpus, *command], cwd=BENCH, stderr=subprocess.DEVNULL)


class Bare(Contender):
    """bench/bare_baseline.py: uvloop + httptools + orjson and nothing else, the floor for a Python server."""

    name = "bare"

    def start(self, port: int) -> subprocess.Popen[bytes]:
        command = [sys.executable, "bare_baseline.py", str(port)]
        return subprocess.Popen(["taskset", "-c", self.cpus, *command], cwd=BENCH, stderr=subprocess.DEVNULL)


class Nginx(Contender):
    name = "nginx"

    def __init__(self, workdir: Path, workers: int = 1) -> None:
        self.workdir = workdir
        self.workers = workers

    def start(self, port: int) -> subprocess.Popen[bytes]:
        config = self.workdir / f"nginx-{port}.conf"
        config.write_text(
            f"""
            daemon off; worker_processes {self.workers}; pid {self.workdir}/nginx-{port}.pid; error_log stderr error;
            events {{ worker_connections 4096; }}
            http {{
                access_log off;
                client_body_temp_path {self.workdir};
                server {{ listen 127.0.0.1:{port} backlog=4096 reuseport; location / {{ return 202; }} }}
            }}
            """
        )
        command = ["nginx", "-c", str(config), "-p", str(self.workdir)]
        return subprocess.Popen(["taskset", "-c", self.cpus, *command], stderr=subprocess.DEVNULL)


def measure(contender: Contender, round_: int, args: argparse.Namespace) -> Measurement:
    port = free_port()
    process = contender.start(port)
    try:
        wait_for_port(port)
        time.sleep(0.5)
        client_cpus = CLIENT_CPU if args.workers == 1 else "0,1"
        warmup = run_wrk(port, args.script, 1, args.connections, client_cpus)
        pids = process_tree(process.pid)
        contender.probes_start(port)
        before, user_before = cpu_seconds(pids), cpu_seconds(pids, user_only=True)
        started = time.monotonic()
        result = run_wrk(port, args.script, args.duration, args.connections, client_cpus)
        elapsed = time.monotonic() - started
        used, user = cpu_seconds(pids) - before, cpu_seconds(pids, user_only=True) - user_before
        extra = contender.probes_stop()
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
            user_us_per_request=round(user / requests * 1e6, 2),
            latency_ms=result["latency_ms"],  # type: ignore[arg-type]
            non_2xx=int(result["non_2xx"]) + int(warmup["non_2xx"]),  # type: ignore[call-overload]
            socket_errors=int(result["socket_errors"]),  # type: ignore[call-overload]
            checked_total=checked,
            extra=extra,
        )
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM if contender.name != "nginx" else signal.SIGQUIT)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()


def _median(results: list[Measurement], name: str, value: Callable[[Measurement], float]) -> float:
    return statistics.median(value(r) for r in results if r.contender == name)


def summarise(results: list[Measurement], args: argparse.Namespace) -> None:
    """Medians over the rounds, and the ratios of each round (fastcount and the baseline measured side by side)."""
    names = sorted({r.contender for r in results})
    print(
        f"\nmedians ({args.script}, -c{args.connections}, {args.duration:.0f}s x {args.rounds}, "
        f"{args.workers} worker(s)):"
    )
    for name in names:
        print(
            f"  {name:10s} {_median(results, name, lambda r: r.cpu_us_per_request):6.2f} us CPU/req "
            f"({_median(results, name, lambda r: r.user_us_per_request):5.2f} user)  "
            f"p99 {_median(results, name, lambda r: r.latency_ms.get('99', 0)):6.2f} ms  "
            f"p99.9 {_median(results, name, lambda r: r.latency_ms.get('99.9', 0)):6.2f} ms"
        )
    for contender in ("before", "fastcount"):
        ours = [r for r in results if r.contender == contender]
        if ours:
            _judge(contender, ours, results, args)
    bare = {r.round: r for r in results if r.contender == "bare"}
    nginx = [(bare[r.round], r) for r in results if r.contender == "nginx" and r.round in bare]
    if nginx:  # the floor: what any Python server of this shape costs above nginx
        floor = statistics.median(a.cpu_us_per_request / b.cpu_us_per_request for a, b in nginx)
        print(f"  bare / nginx: CPU {floor:.2f}  [the Python floor; median of per-round ratios]")


def _judge(contender: str, ours: list[Measurement], results: list[Measurement], args: argparse.Namespace) -> None:
    for baseline in ("nginx", "uvicorn", "bare", "before"):
        if baseline == contender:
            continue
        theirs = {r.round: r for r in results if r.contender == baseline}
        pairs = [(r, theirs[r.round]) for r in ours if r.round in theirs]
        if not pairs:
            continue
        cpu = statistics.median(a.cpu_us_per_request / b.cpu_us_per_request for a, b in pairs)
        p99 = statistics.median(a.latency_ms.get("99", 0) / max(b.latency_ms.get("99", 0), 1e-3) for a, b in pairs)
        line = f"  {contender} / {baseline}: CPU {cpu:.2f}"
        if baseline == "nginx":
            target = TARGET_VERVE_CPU_RATIO if Path(args.script).name.startswith("verve") else TARGET_CPU_RATIO
            line += f" (target <= {target}: {'meets' if cpu <= target else 'MISSES'})"
            line += (
                f", p99 {p99:.2f} (target <= {TARGET_P99_RATIO}: {'meets' if p99 <= TARGET_P99_RATIO else 'MISSES'})"
            )
        elif baseline == "before":  # another version in the same rounds: rounds drift together, so pair them
            line += f", p99 {p99:.2f}"
        print(line + "  [median of per-round ratios]")
    walls = [float(r.extra.get("loop_lag_max_ms", 0)) for r in ours]  # type: ignore[arg-type]
    owns = [float(r.extra.get("loop_lag_own_max_ms", 0)) for r in ours]  # type: ignore[arg-type]
    over = sum(int(r.extra.get("seconds_own_lag_over_1ms", 0)) for r in ours)  # type: ignore[call-overload]
    seconds = sum(int(r.extra.get("seconds_watched", 0)) for r in ours)  # type: ignore[call-overload]
    print(
        f"  {contender} max loop lag: {max(walls):.2f} ms wall clock (rounds' median {statistics.median(walls):.2f}), "
        f"{max(owns):.2f} ms on its CPU (rounds' median {statistics.median(owns):.2f}; {over} of {seconds} seconds "
        f"over 1 ms) (target <= {TARGET_LOOP_LAG_MS} ms: {'meets' if max(owns) <= TARGET_LOOP_LAG_MS else 'MISSES'})"
    )
    fresh = [float(r.extra["freshness_p99_ms"]) for r in ours if "freshness_p99_ms" in r.extra]  # type: ignore[arg-type]
    if fresh:
        limit = args.flush_interval * 1000 + 100
        worst = max(fresh)
        print(
            f"  {contender} freshness p99 (202 -> row in PostgreSQL): {statistics.median(fresh):.0f} ms median of "
            f"rounds, worst {worst:.0f} ms (target <= {limit:.0f} ms: {'meets' if worst <= limit else 'MISSES'})"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--script", default="increment_hot.lua")
    parser.add_argument(
        "--only", default="", help="comma-separated contenders to run (fastcount,before,uvicorn,bare,nginx)"
    )
    parser.add_argument("--workers", type=int, default=1, help="1: server on core 0, wrk on core 1; 2: all on both")
    parser.add_argument("--flush-interval", type=float, default=1.0, help="fastcount's --flush-interval")
    parser.add_argument(
        "--postgres-cpu",
        choices=("client", "server"),
        default="client",
        help="with 1 worker, the core of the PostgreSQL fastcount flushes to: wrk's (default: the best p99) or the"
        " server's (its work then takes the worker's time, not wrk's: CPU per request as if it ran elsewhere)",
    )
    parser.add_argument(
        "--compare-with",
        type=Path,
        help="a directory holding another version's fastcount/ package (`git archive <rev> fastcount | tar -x -C DIR`),"
        " run as contender 'before' beside this one",
    )
    args = parser.parse_args()
    if not shutil.which("wrk"):
        raise SystemExit("wrk is not installed (Debian: apt-get install wrk)")

    results: list[Measurement] = []
    if args.workers == 1:
        # This process (its probes) and the PostgreSQL it starts share wrk's core: the server under test has core 0 to
        # itself, as nginx has. Left free, PostgreSQL ran on the worker's core about as often as not, and its flush
        # work there doubled fastcount's p99 (6.7-7.7 ms against 4.3 ms with it on core 1). Its CPU is not counted
        # as fastcount's either way.
        os.sched_setaffinity(0, {int(CLIENT_CPU)})
    with temporary_postgres("fastcount-bench-") as database:
        postmaster = int((database.pgdata / "postmaster.pid").read_text().split()[0])
        if args.workers == 1 and args.postgres_cpu == "server":
            # On wrk's core, PostgreSQL's flush work slows wrk, and a worker that wrk no longer saturates spends more
            # CPU per request (fewer ready connections per loop pass). Backends forked later inherit this.
            for pid in process_tree(postmaster):
                os.sched_setaffinity(pid, {int(SERVER_CPU)})
        contenders: list[Contender] = [
            Fastcount(database.dsn, args.script, args.workers, args.flush_interval, postgres_pid=postmaster),
            Uvicorn(args.workers),
        ]
        if args.workers == 1 and Path(args.script).name.startswith("increment"):
            contenders.append(Bare())  # it answers POST /increment only
        if args.compare_with:
            before = Fastcount(
                database.dsn, args.script, args.workers, args.flush_interval, args.compare_with, "before", postmaster
            )
            contenders.insert(1, before)
        if shutil.which("nginx"):
            contenders.append(Nginx(database.data_dir.parent, args.workers))
        else:
            print("nginx not installed (Debian: apt-get install nginx-light): no nginx baseline", file=sys.stderr)
        if args.only:
            contenders = [c for c in contenders if c.name in args.only.split(",")]
        for round_ in range(1, args.rounds + 1):
            # alternate, and reverse the order every other round, so drift on this shared machine hits all alike
            for contender in contenders if round_ % 2 else contenders[::-1]:
                result = measure(contender, round_, args)
                results.append(result)
                probes = "".join(f"  {name} {value}" for name, value in result.extra.items())
                print(
                    f"{result.contender:10s} round {round_}: {result.requests_per_second:7d} req/s  "
                    f"{result.cpu_us_per_request:6.2f} us CPU/req ({result.user_us_per_request:5.2f} user)  "
                    f"p50 {result.latency_ms.get('50', 0):.2f} ms  "
                    f"p99 {result.latency_ms.get('99', 0):.2f} ms  p99.9 {result.latency_ms.get('99.9', 0):.2f} ms  "
                    f"non-2xx {result.non_2xx}  errors {result.socket_errors}  {result.checked_total}{probes}",
                    flush=True,
                )

    summarise(results, args)
    out_dir = BENCH / "results"
    out_dir.mkdir(exist_ok=True)
    out_file = out_dir / f"{time.strftime('%Y%m%d-%H%M%S')}-{Path(args.script).stem}.json"
    out_file.write_text(
        json.dumps(
            {
                "args": vars(args) | {"compare_with": str(args.compare_with or "")},
                "results": [asdict(r) for r in results],
            },
            indent=2,
        )
    )
    print(f"results written to {out_file.relative_to(ROOT)}")
    return 0 if all(r.non_2xx == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
