"""How a uvloop worker could stop accepting at a connection cap, measured: the cost of each accept path.

`server`: uvloop's own accept (`loop.create_server(sock=...)`), what fastcount used before the cap.
`reader`: our own accept (`loop.add_reader` on the listening socket, `sock.accept()`, then
`loop.connect_accepted_socket` in a task), which can stop at any count by removing the reader.
`toggle`: what pausing by closing an `asyncio.Server` made on a dup() of the socket and making a new one costs.

Each server mode answers one fixed HTTP response per connection and closes it (`Connection: close`), so every request
is a new connection; wrk (pinned to core 1) drives the server (pinned to core 0), and the server's CPU time per
connection is the figure to compare.

    python bench/accept_paths.py [--duration 5] [--rounds 2]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import socket
import statistics
import subprocess
import sys
import time

import uvloop

ANSWER = b"HTTP/1.1 202 Accepted\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


class Answer(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.transport.write(ANSWER)
        self.transport.close()


async def serve(mode: str, sock: socket.socket) -> None:
    loop = asyncio.get_running_loop()
    if mode == "server":
        await loop.create_server(Answer, sock=sock, backlog=4096)
    else:
        sock.setblocking(False)
        tasks: set[asyncio.Task[object]] = set()

        def accept() -> None:
            for _ in range(64):
                try:
                    client, _address = sock.accept()
                except BlockingIOError:
                    return
                task = loop.create_task(loop.connect_accepted_socket(Answer, client))
                tasks.add(task)
                task.add_done_callback(tasks.discard)

        loop.add_reader(sock.fileno(), accept)
    await asyncio.Event().wait()


def toggle_cost(rounds: int = 2000) -> float:
    """Microseconds to close a server made from a dup of the listening socket and make a new one."""

    async def measure() -> float:
        loop = asyncio.get_running_loop()
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(4096)
        server = await loop.create_server(Answer, sock=listener.dup(), backlog=4096)
        started = time.perf_counter()
        for _ in range(rounds):
            server.close()
            server = await loop.create_server(Answer, sock=listener.dup(), backlog=4096)
        elapsed = time.perf_counter() - started
        server.close()
        listener.close()
        return elapsed / rounds * 1e6

    return uvloop.run(measure())


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def run_mode(mode: str, duration: int) -> tuple[float, float]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen(["taskset", "-c", "0", sys.executable, __file__, "--serve", mode, "--port", str(port)])
    try:
        time.sleep(1.0)
        before = cpu_seconds(server.pid)
        command = [
            "taskset", "-c", "1", "wrk", "-t1", "-c64", f"-d{duration}s", "-H", "Connection: close",
            f"http://127.0.0.1:{port}/",
        ]  # fmt: skip
        wrk = subprocess.run(command, capture_output=True, text=True, check=True)
        used = cpu_seconds(server.pid) - before
    finally:
        server.terminate()
        server.wait()
    requests = int(re.search(r"(\d+) requests in", wrk.stdout).group(1))  # type: ignore[union-attr]
    errors = re.search(r"Socket errors: .*", wrk.stdout)
    if errors:
        print(f"  {mode}: {errors.group(0)}")
    return requests / duration, used / requests * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--serve", choices=("server", "reader"), help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", args.port))
        sock.listen(4096)
        uvloop.run(serve(args.serve, sock))
        return 0
    print(f"toggle (close + create_server on a dup): {toggle_cost():.1f} us per pause/resume")
    results: dict[str, list[tuple[float, float]]] = {"server": [], "reader": []}
    for _ in range(args.rounds):
        for mode in results:
            results[mode].append(run_mode(mode, args.duration))
    for mode, runs in results.items():
        rates = [rate for rate, _ in runs]
        costs = [cost for _, cost in runs]
        print(
            f"{mode}: {statistics.median(rates):,.0f} connections/s, server CPU {statistics.median(costs):.1f} us "
            f"per connection (rounds: {', '.join(f'{cost:.1f}' for cost in costs)})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
