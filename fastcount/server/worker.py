"""One worker process: a uvloop event loop serving the listening socket its slot inherited, plus the flusher.

The master starts each worker as a fresh interpreter (`python -m fastcount.server.worker`) that inherits two file
descriptors: its slot's listening socket and the write end of its status pipe. A fresh interpreter is what lets a
SIGHUP reload bring in new code, and it shares nothing with the master by accident. Over the pipe the worker says
"R" once it serves and sends a stats snapshot every second (which is also its heartbeat).

Connections are accepted by the worker's own loop (`Acceptor`), not by uvloop's server: that is what lets a worker
stop accepting at --max-connections (new connections wait in the socket's backlog, which the master keeps open) and
survive accept() errors such as EMFILE without resetting the connections queued behind them.

SIGTERM means stop gracefully: stop accepting, answer what is in flight, close quiet connections, flush everything,
send a last snapshot, exit 0. SIGINT is ignored: a Ctrl-C reaches the whole process group, and the master turns it
into an orderly SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import errno
import gc
import importlib
import logging
import math
import os
import resource
import signal
import socket
import sys
import time
from collections.abc import Callable, Coroutine, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import orjson
import uvloop

from fastcount.observability.logs import configure_logging
from fastcount.observability.stats import WorkerStats
from fastcount.server.protocol import ConnectionLimits, HttpProtocol, ServerState
from fastcount.server.routing import Route, Router
from fastcount.settings import Settings

if TYPE_CHECKING:
    from fastcount.features.base import FeatureMetric

log = logging.getLogger("fastcount.server.worker")  # not __name__: it is "__main__" when run with -m

EXIT_OK = 0
EXIT_CRASHED = 1
EXIT_BOOT_ERROR = 3  # failed before serving: the master stops rather than respawn into a crash loop
MSG_READY = b"R\n"
MSG_JOURNALS_RECOVERED = b"J\n"  # every batch of the dead workers' journals we were given is committed
CONFIG_ENV = "FASTCOUNT_WORKER_CONFIG"  # settings, DSN and application, as JSON, from the master
MAX_UNSENT = 1 << 20  # bytes of status messages kept while the master does not read
JOB_FIRST_DELAY = 1.0  # seconds before a failed background job starts again (doubling, up to JOB_MAX_DELAY)
JOB_MAX_DELAY = 60.0
TICK_ERROR_LOG_EVERY = 60.0  # seconds: a tick that keeps failing is logged once a minute, and survived
# Test-only fault injection: every stats snapshot raises, as a bug in a feature's metrics would. Unset in production.
FAILPOINT_PUBLISH_ENV = "FASTCOUNT_FAILPOINT_PUBLISH_RAISES"
# Descriptors a worker keeps for everything but clients: a PostgreSQL connection per flusher lane (3 buffers) and
# their reconnects, the read pool (2), the features' background connections, Kafka and callback sockets, the
# journal, the status pipe, the listening socket, the event loop's own. Counted generously: running out of them
# is what stops the flusher.
FD_RESERVE = 64
ACCEPT_BATCH = 64  # connections accepted per wake-up at most, so a flood of them cannot starve the requests
ACCEPT_BACKOFF = 0.1  # seconds without accepting after accept() failed for want of a resource
ACCEPT_LOG_EVERY = 10.0  # seconds: the cap reached, or accept() failing, is logged at most this often
ACCEPT_HINTS = {
    "EMFILE": "the worker's descriptor limit is used up: raise LimitNOFILE= (systemd) or ulimit -n, "
    "or lower --max-connections",
    "ENFILE": "the system's open-file limit is used up: raise fs.file-max (systemd/sysctl.d/60-fastcount.conf)",
    "ENOBUFS": "the kernel is short of socket memory: check free memory and net.ipv4.tcp_mem",
    "ENOMEM": "the kernel is short of memory: check free memory and net.ipv4.tcp_mem",
}


class Application(Protocol):
    """What the worker runs besides HTTP (fastcount/app.py builds it): routes, flush lanes, journal, jobs, metrics."""

    def routes(self) -> list[Route]: ...
    def open_journal(self, fd: int) -> None: ...
    def adopt_journals(self, fds: Sequence[int]) -> int: ...
    async def start(self) -> None: ...
    def background(self) -> list[Callable[[], Coroutine[Any, Any, None]]]: ...
    async def stop(self) -> None: ...
    def metrics(self) -> list[FeatureMetric]: ...

    @property
    def flusher(self) -> Any: ...


ApplicationFactory = Callable[[Settings, str, int, WorkerStats], Application]


def load_application(spec: str) -> ApplicationFactory:
    """'package.module:Name' -> the factory (gunicorn's app URI, in short)."""
    module_name, _, attribute = spec.partition(":")
    factory: ApplicationFactory = getattr(importlib.import_module(module_name), attribute)
    return factory


class Worker:
    def __init__(
        self,
        slot: int,
        sock: socket.socket | None,
        settings: Settings,
        dsn: str,
        status_pipe: int,
        factory: ApplicationFactory,
        journal_fd: int = -1,
        recover_fds: tuple[int, ...] = (),
    ) -> None:
        self.slot = slot
        self.sock = sock
        self.settings = settings
        self.dsn = dsn
        self.status_pipe = status_pipe
        self.factory = factory
        self.journal_fd = journal_fd
        self.recover_fds = recover_fds
        self.master_pid = os.getppid()
        self.ready = False
        self.stop_requested: asyncio.Event | None = None
        self.tick_failed_at = -math.inf
        self.unsent = bytearray()  # status messages the pipe has not taken yet
        self.described: set[str] = set()  # metric names whose help text the master has been sent
        self.publish_raises = bool(os.environ.get(FAILPOINT_PUBLISH_ENV))
        self.acceptor: Acceptor | None = None
        self.answered_at_tick = 0  # requests answered as of the last tick: did any come since?

    def run(self, serve: bool = True) -> int:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        loop = uvloop.new_event_loop()
        asyncio.set_event_loop(loop)
        try:
            return loop.run_until_complete(self._serve() if serve else self._recover_only())
        except Exception:
            log.exception("event=worker_failed slot=%d ready=%s", self.slot, self.ready)
            return EXIT_CRASHED if self.ready else EXIT_BOOT_ERROR
        finally:
            loop.close()

    async def _serve(self) -> int:
        settings = self.settings
        loop = asyncio.get_running_loop()
        self.stop_requested = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, self.stop_requested.set)

        stats = WorkerStats()
        app = self.factory(settings, self.dsn, self.slot, stats)
        if self.journal_fd >= 0:
            app.open_journal(self.journal_fd)
        self._adopt(app)
        await app.start()
        # What start-up created lives as long as the worker: out of the collector's sight, a full collection walks
        # only what came later (it walked everything: 22-38 ms with the loop held, at random moments under load).
        gc.collect()
        gc.freeze()

        limits = ConnectionLimits(
            max_body=settings.max_body,
            max_header_bytes=settings.max_header_bytes,
            keepalive_ticks=max(1, math.ceil(settings.keepalive_timeout)),
            read_ticks=max(1, math.ceil(settings.read_timeout)),
            tcp_nodelay=settings.tcp_nodelay,
        )
        state = ServerState(Router(app.routes()), limits, stats)
        assert self.sock is not None, "a serving worker inherits its slot's socket"
        # listen() again: it puts a slot the master took out of the SO_REUSEPORT group (no worker booted) back in.
        self.sock.listen(settings.backlog)
        fd_limit = descriptor_limit()
        max_connections = connection_cap(settings.max_connections, fd_limit)
        if max_connections > fd_limit - FD_RESERVE:
            log.warning(
                "event=max_connections_above_fd_limit slot=%d max_connections=%d fd_limit=%d reserve=%d "
                "hint='accepts will fail with EMFILE and the flusher may not reconnect; raise LimitNOFILE= (or "
                "ulimit -n) to at least %d, or lower --max-connections'",
                self.slot,
                max_connections,
                fd_limit,
                FD_RESERVE,
                max_connections + FD_RESERVE,
            )
        acceptor = self.acceptor = Acceptor(self.sock, state, max_connections, fd_limit, self.slot)
        acceptor.start()
        tick_task = asyncio.create_task(self._tick(state, app), name="tick")
        stats.loop_lag.start(loop)
        jobs = [
            asyncio.create_task(self._supervise(job, stats), name=getattr(job, "__name__", "job"))
            for job in app.background()
        ]
        self.ready = True
        self._tell_master(MSG_READY)
        log.info("event=worker_serving slot=%d fd_limit=%d max_connections=%d", self.slot, fd_limit, max_connections)

        await self.stop_requested.wait()
        log.info("event=worker_stopping slot=%d connections=%d", self.slot, len(state.connections))
        state.stopping = True
        acceptor.close()
        while state.connections:  # the tick closes each connection once it has answered or gone quiet
            await asyncio.sleep(0.05)
        for job in jobs:
            job.cancel()
        await asyncio.gather(*jobs, return_exceptions=True)
        await app.stop()
        tick_task.cancel()
        stats.loop_lag.stop()
        try:
            self._publish(state, app)  # the last snapshot: the master keeps these counts after we are gone
        except Exception:
            log.exception("event=last_snapshot_failed slot=%d", self.slot)
        log.info("event=worker_stopped slot=%d requests=%d flushes=%d", self.slot, stats.requests, stats.flushes)
        return EXIT_OK

    async def _supervise(self, job: Callable[[], Coroutine[Any, Any, None]], stats: WorkerStats) -> None:
        """Run a feature's background job for the life of the worker: one that fails is logged, counted and started
        again with back-off, never left dead in silence (a window report that stops is a lost report)."""
        name = getattr(job, "__qualname__", repr(job))
        delay = JOB_FIRST_DELAY
        while True:
            started = time.monotonic()
            try:
                await job()
                return
            except Exception:
                stats.background_job_failures += 1
                if time.monotonic() - started > JOB_MAX_DELAY:
                    delay = JOB_FIRST_DELAY  # it ran a good while: not a crash loop
                log.exception("event=background_job_failed slot=%d job=%s restart_in=%.1fs", self.slot, name, delay)
                await asyncio.sleep(delay)
                delay = min(JOB_MAX_DELAY, delay * 2)

    async def _recover_only(self) -> int:
        """Commit dead workers' journals and exit: the master runs this beside the live workers, so a journal is
        recovered at once, whatever its slot is doing. Exit 0 (after `J`) only once everything is committed."""
        loop = asyncio.get_running_loop()
        self.stop_requested = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, self.stop_requested.set)
        app = self.factory(self.settings, self.dsn, self.slot, WorkerStats())
        done = asyncio.Event()
        app.flusher.on_adopted_written = done.set
        if not self._adopt(app, tell_master=False):
            done.set()
        await app.start()
        stop_wait = asyncio.ensure_future(self.stop_requested.wait())
        await asyncio.wait([asyncio.ensure_future(done.wait()), stop_wait], return_when=asyncio.FIRST_COMPLETED)
        stop_wait.cancel()
        if not done.is_set():
            log.error("event=recovery_interrupted slot=%d", self.slot)
            return EXIT_CRASHED  # the master keeps the journals and tries again (or reports them lost)
        await app.stop()
        self._tell_master(MSG_JOURNALS_RECOVERED)
        log.info("event=recovery_done slot=%d journals=%d", self.slot, len(self.recover_fds))
        return EXIT_OK

    def _adopt(self, app: Application, tell_master: bool = True) -> int:
        """Hand the flusher what dead workers' journals still hold, under their identity."""
        if not self.recover_fds:
            return 0
        batches = app.adopt_journals(self.recover_fds)
        for fd in self.recover_fds:
            os.close(fd)
        if tell_master:
            if batches:
                app.flusher.on_adopted_written = lambda: self._tell_master(MSG_JOURNALS_RECOVERED)
            else:
                self._tell_master(MSG_JOURNALS_RECOVERED)
        return batches

    async def _tick(self, state: ServerState, app: Application) -> None:
        """Once a second, on the second: refresh the Date header, enforce timeouts, publish stats (the heartbeat).
        An error in one tick is logged and survived: a silent heartbeat would get a healthy worker killed."""
        last_second = int(time.time())
        while True:
            # The loop's timers have millisecond resolution and may fire a little early: aim just past the
            # boundary and never tick twice in one second (that would age idle connections too fast).
            await asyncio.sleep(last_second + 1.002 - time.time())
            second = int(time.time())
            if second <= last_second:
                continue
            last_second = second
            try:
                for connection in list(state.connections):
                    connection.on_tick()  # also moves each connection's request count into the stats
                answered = state.stats.requests
                state.stats.loop_lag.pace(busy=answered != self.answered_at_tick)
                self.answered_at_tick = answered
                self._publish(state, app)
            except Exception:
                now = time.monotonic()
                if now - self.tick_failed_at >= TICK_ERROR_LOG_EVERY:
                    self.tick_failed_at = now
                    log.exception("event=tick_failed slot=%d", self.slot)
                self._tell_master(b"S{}\n")  # still alive: the heartbeat must not stop with the stats
            if os.getppid() != self.master_pid and self.stop_requested is not None:
                log.warning("event=master_gone slot=%d", self.slot)
                self.stop_requested.set()

    def _publish(self, state: ServerState, app: Application) -> None:
        if self.publish_raises:
            raise RuntimeError("injected failure: publishing stats")
        state.renderer.tick()  # also moves the counts of cached answers into each route's totals
        answers = {route.name: route.answers for route in state.router.routes if route.answers}
        gauges: dict[str, float] = {"connections_open": len(state.connections)}
        if self.acceptor is not None:
            gauges["fd_limit"] = self.acceptor.fd_limit
            gauges["max_connections"] = self.acceptor.max_connections
            gauges["accept_paused"] = int(self.acceptor.paused)
        counters: dict[str, float] = {}
        help_texts: dict[str, str] = {}  # sent once per series name: snapshots stay small
        for metric in app.metrics():
            key = metric.name
            if metric.labels:
                key += "{" + ",".join(f'{name}="{value}"' for name, value in metric.labels) + "}"
            (counters if metric.kind == "counter" else gauges)[key] = metric.value
            if metric.name not in self.described:
                self.described.add(metric.name)
                help_texts[metric.name] = metric.help
        self._tell_master(state.stats.snapshot(answers, gauges, counters, help_texts))

    def _tell_master(self, message: bytes) -> None:
        """Messages are lines; one longer than PIPE_BUF may be written in parts, so what the pipe does not take now
        waits (in order) for the next call. A full pipe means the master is busy, a broken one that it is gone:
        neither may stop serving."""
        self.unsent += message
        try:
            written = os.write(self.status_pipe, self.unsent)
        except (BlockingIOError, BrokenPipeError):
            written = 0
        del self.unsent[:written]
        if len(self.unsent) > MAX_UNSENT:  # the master is not reading: keep the newest whole messages only
            cut = self.unsent.find(b"\n", len(self.unsent) - MAX_UNSENT)
            del self.unsent[: cut + 1 if cut != -1 else len(self.unsent)]


def descriptor_limit() -> int:
    """The soft RLIMIT_NOFILE this process runs with (the master raised it to the hard limit before forking)."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


def connection_cap(configured: int, fd_limit: int) -> int:
    """--max-connections, or with 0 what the descriptor limit allows once FD_RESERVE is set aside (at least 1)."""
    return configured or max(1, fd_limit - FD_RESERVE)


def open_descriptors() -> int:
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return -1


class Acceptor:
    """Accepts the slot's connections while fewer than `max_connections` are open.

    At the cap it stops watching the listening socket: new connections complete their handshake and wait in the
    socket's backlog (the master keeps the socket, so nothing resets them) until a connection closes. An accept()
    that fails for want of a resource (EMFILE, ENFILE, ENOBUFS, ENOMEM) leaves the connection queued too; the worker
    counts it, stops accepting for ACCEPT_BACKOFF instead of spinning on a socket that stays readable, and says
    what to raise at most once per ACCEPT_LOG_EVERY. uvloop's own server could do neither: it cannot pause, and on
    EMFILE libuv accepts and closes every queued connection to drain the backlog.
    """

    def __init__(self, sock: socket.socket, state: ServerState, max_connections: int, fd_limit: int, slot: int) -> None:
        self.loop = asyncio.get_running_loop()
        self.sock = sock
        self.fd = sock.fileno()
        self.state = state
        self.stats = state.stats
        self.max_connections = max_connections
        self.fd_limit = fd_limit
        self.slot = slot
        self.open = 0  # accepted and not yet lost: counted from accept(), before uvloop makes the transport
        self.reading = False
        self.closed = False
        self.backoff: asyncio.TimerHandle | None = None
        self.adopting: set[asyncio.Task[Any]] = set()
        self.capped_since_log = 0
        self.capped_logged_at = -math.inf
        self.errors_since_log: dict[str, int] = {}
        self.errors_logged_at = -math.inf

    @property
    def paused(self) -> bool:
        return not self.reading and not self.closed

    def start(self) -> None:
        self.sock.setblocking(False)
        state = self.state
        state.connection_closed = self.connection_closed
        self._resume()

    def close(self) -> None:
        """Stop accepting for good (the worker stops); connections already accepted carry on."""
        self.closed = True
        self._stop_reading()
        if self.backoff is not None:
            self.backoff.cancel()
            self.backoff = None
        self.sock.close()  # this process's copy only: the master's and a successor's stay open

    def connection_closed(self) -> None:
        self.open -= 1
        if not self.reading and self.backoff is None and not self.closed and self.open < self.max_connections:
            self._resume()

    def _resume(self) -> None:
        self.backoff = None
        if self.closed or self.reading:
            return
        self.loop.add_reader(self.fd, self._accept_ready)
        self.reading = True

    def _stop_reading(self) -> None:
        if self.reading:
            self.loop.remove_reader(self.fd)
            self.reading = False

    def _accept_ready(self) -> None:
        for _ in range(ACCEPT_BATCH):
            if self.open >= self.max_connections:
                self._reach_cap()
                return
            try:
                client, _address = self.sock.accept()
            except BlockingIOError:
                return
            except ConnectionAbortedError:  # the client gave up while queued: nothing to do
                continue
            except OSError as error:
                self._accept_failed(error)
                return
            self.open += 1
            task = self.loop.create_task(self.loop.connect_accepted_socket(self._protocol, client))
            self.adopting.add(task)
            task.add_done_callback(self._adopted)

    def _protocol(self) -> HttpProtocol:
        return HttpProtocol(self.state)

    def _adopted(self, task: asyncio.Task[Any]) -> None:
        """connect_accepted_socket failed before the protocol saw the connection: it will never report it lost."""
        self.adopting.discard(task)
        if task.cancelled() or task.exception() is not None:
            if not task.cancelled():
                log.warning("event=connection_setup_failed slot=%d error=%r", self.slot, str(task.exception()))
            self.connection_closed()

    def _reach_cap(self) -> None:
        self._stop_reading()
        self.stats.accept_pauses += 1
        self.capped_since_log += 1
        now = time.monotonic()
        if now - self.capped_logged_at >= ACCEPT_LOG_EVERY:
            self.capped_logged_at = now
            log.warning(
                "event=max_connections_reached slot=%d connections=%d max_connections=%d fd_limit=%d times=%d "
                "hint='new connections wait in the listen backlog until others close; raise LimitNOFILE= (or "
                "ulimit -n) and --max-connections, or add workers'",
                self.slot,
                self.open,
                self.max_connections,
                self.fd_limit,
                self.capped_since_log,
            )
            self.capped_since_log = 0

    def _accept_failed(self, error: OSError) -> None:
        name = errno.errorcode.get(error.errno or 0, str(error.errno))
        self.stats.accept_errors[name] = self.stats.accept_errors.get(name, 0) + 1
        self.errors_since_log[name] = self.errors_since_log.get(name, 0) + 1
        self._stop_reading()
        self.backoff = self.loop.call_later(ACCEPT_BACKOFF, self._resume_after_backoff)
        now = time.monotonic()
        if now - self.errors_logged_at >= ACCEPT_LOG_EVERY:
            self.errors_logged_at = now
            log.error(
                "event=accept_failed slot=%d errno=%s errors=%s connections=%d max_connections=%d fd_limit=%d "
                "open_fds=%d action=retry_in_%.1fs hint=%r",
                self.slot,
                name,
                ",".join(f"{key}:{count}" for key, count in sorted(self.errors_since_log.items())),
                self.open,
                self.max_connections,
                self.fd_limit,
                open_descriptors(),
                ACCEPT_BACKOFF,
                ACCEPT_HINTS.get(name, str(error.strerror)),
            )
            self.errors_since_log.clear()

    def _resume_after_backoff(self) -> None:
        self.backoff = None
        if self.open < self.max_connections:
            self._resume()


def worker_config(settings: Settings, dsn: str, application: str) -> str:
    return orjson.dumps({"settings": dataclasses.asdict(settings), "dsn": dsn, "application": application}).decode()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="a fastcount worker (started by the master, not by hand)")
    parser.add_argument("--slot", type=int, required=True)
    parser.add_argument("--listen-fd", type=int, default=-1)
    parser.add_argument("--status-fd", type=int, required=True)
    parser.add_argument("--journal-fd", type=int, default=-1)
    parser.add_argument("--recover-fd", type=int, action="append", default=[])
    parser.add_argument("--recover-only", action="store_true", help="commit the --recover-fd journals, then exit")
    args = parser.parse_args(argv)
    config = orjson.loads(os.environ.pop(CONFIG_ENV))
    settings = Settings(**config["settings"])
    configure_logging(settings.log_level, f"recovery{args.slot}" if args.recover_only else f"worker{args.slot}")
    try:
        factory = load_application(config["application"])
        sock = socket.socket(fileno=args.listen_fd) if args.listen_fd >= 0 else None
        os.set_blocking(args.status_fd, False)
        worker = Worker(
            args.slot, sock, settings, config["dsn"], args.status_fd, factory, args.journal_fd, tuple(args.recover_fd)
        )
        return worker.run(serve=not args.recover_only)
    except Exception:
        log.exception("event=worker_boot_failed slot=%d", args.slot)
        return EXIT_BOOT_ERROR


if __name__ == "__main__":
    sys.exit(main())
