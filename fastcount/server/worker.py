"""One worker process: a uvloop event loop serving the listening socket its slot inherited, plus the flusher.

The master starts each worker as a fresh interpreter (`python -m fastcount.server.worker`) that inherits two file
descriptors: its slot's listening socket and the write end of its status pipe. A fresh interpreter is what lets a
SIGHUP reload bring in new code, and it shares nothing with the master by accident. Over the pipe the worker says
"R" once it serves and sends a stats snapshot every second (which is also its heartbeat).

SIGTERM means stop gracefully: stop accepting, answer what is in flight, close quiet connections, flush everything,
send a last snapshot, exit 0. SIGINT is ignored: a Ctrl-C reaches the whole process group, and the master turns it
into an orderly SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import math
import os
import signal
import socket
import sys
import time
from typing import Any

import orjson
import uvloop
from psycopg_pool import AsyncConnectionPool

from fastcount.features import Features, build_features
from fastcount.observability.logs import configure_logging
from fastcount.observability.stats import WorkerStats
from fastcount.server.protocol import ConnectionLimits, HttpProtocol, ServerState
from fastcount.server.routing import Router
from fastcount.settings import Settings
from fastcount.store.flusher import Flusher, writer_identity
from fastcount.store.journal import Journal, recover

log = logging.getLogger("fastcount.server.worker")  # not __name__: it is "__main__" when run with -m

EXIT_OK = 0
EXIT_CRASHED = 1
EXIT_BOOT_ERROR = 3  # failed before serving: the master stops rather than respawn into a crash loop
MSG_READY = b"R\n"
MSG_JOURNALS_RECOVERED = b"J\n"  # every batch of the dead workers' journals we were given is committed
CONFIG_ENV = "FASTCOUNT_WORKER_CONFIG"  # settings and DSN, as JSON, from the master


class Worker:
    def __init__(
        self,
        slot: int,
        sock: socket.socket,
        settings: Settings,
        dsn: str,
        status_pipe: int,
        journal_fd: int = -1,
        recover_fds: tuple[int, ...] = (),
    ) -> None:
        self.journal_fd = journal_fd
        self.recover_fds = recover_fds
        self.slot = slot
        self.sock = sock
        self.settings = settings
        self.dsn = dsn
        self.status_pipe = status_pipe
        self.master_pid = os.getppid()
        self.ready = False
        self.stop_requested: asyncio.Event | None = None

    def run(self) -> int:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        loop = uvloop.new_event_loop()
        asyncio.set_event_loop(loop)
        try:
            return loop.run_until_complete(self._serve())
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
        flusher = Flusher(self.dsn, [], settings.flush_interval, writer_identity(self.slot), stats)
        read_pool: AsyncConnectionPool[Any] = AsyncConnectionPool(
            self.dsn,
            min_size=1,
            max_size=2,
            open=False,
            timeout=2.0,
            kwargs={"autocommit": True, "connect_timeout": 5},
            check=AsyncConnectionPool.check_connection,
        )
        await read_pool.open(wait=False)
        features = build_features(settings, flusher, read_pool)
        flusher.buffers = features.buffers
        self._open_journals(flusher, features)

        limits = ConnectionLimits(
            max_body=settings.max_body,
            max_header_bytes=settings.max_header_bytes,
            keepalive_ticks=max(1, math.ceil(settings.keepalive_timeout)),
            read_ticks=max(1, math.ceil(settings.read_timeout)),
            tcp_nodelay=settings.tcp_nodelay,
        )
        state = ServerState(Router(features.routes), limits, stats)
        # backlog= matters: without it asyncio (and uvloop) re-listen the inherited socket with a backlog of 100.
        server = await loop.create_server(lambda: HttpProtocol(state), sock=self.sock, backlog=settings.backlog)
        flush_task = asyncio.create_task(flusher.run(), name="flusher")
        tick_task = asyncio.create_task(self._tick(state, features), name="tick")
        self.ready = True
        self._tell_master(MSG_READY)
        log.info("event=worker_serving slot=%d", self.slot)

        await self.stop_requested.wait()
        log.info("event=worker_stopping slot=%d connections=%d", self.slot, len(state.connections))
        state.stopping = True
        server.close()  # closes only this process's copy of the socket: the master's and a successor's stay open
        while state.connections:  # the tick closes each connection once it has answered or gone quiet
            await asyncio.sleep(0.05)
        await flusher.stop(flush_task)
        tick_task.cancel()
        await read_pool.close()
        self._publish(state, features)  # the last snapshot: the master keeps these counts after we are gone
        log.info("event=worker_stopped slot=%d requests=%d flushes=%d", self.slot, stats.requests, stats.flushes)
        return EXIT_OK

    async def _tick(self, state: ServerState, features: Features) -> None:
        """Once a second, on the second: refresh the Date header, enforce timeouts, publish stats (the heartbeat)."""
        last_second = int(time.time())
        while True:
            # The loop's timers have millisecond resolution and may fire a little early: aim just past the
            # boundary and never tick twice in one second (that would age idle connections too fast).
            await asyncio.sleep(last_second + 1.002 - time.time())
            second = int(time.time())
            if second <= last_second:
                continue
            last_second = second
            for connection in list(state.connections):
                connection.on_tick()
            self._publish(state, features)
            if os.getppid() != self.master_pid and self.stop_requested is not None:
                log.warning("event=master_gone slot=%d", self.slot)
                self.stop_requested.set()

    def _publish(self, state: ServerState, features: Features) -> None:
        state.renderer.tick()  # also moves the counts of cached answers into each route's totals
        answers = {route.name: route.answers for route in state.router.routes if route.answers}
        gauges = {"connections_open": len(state.connections), **features.gauges()}
        self._tell_master(state.stats.snapshot(answers, gauges))

    def _open_journals(self, flusher: Flusher, features: Features) -> None:
        """Start our crash journal; hand the flusher what dead workers' journals still hold, under their identity."""
        buffer = features.journaled
        if self.journal_fd >= 0:
            buffer.journal = Journal(self.journal_fd, flusher.writer_of(buffer))
        recovered = [batch for fd in self.recover_fds for batch in recover(fd)]
        for batch in recovered:
            counts = buffer.replay(batch.records)
            log.warning(
                "event=journal_recovered slot=%d writer=%s seq=%d keys=%d total=%d",
                self.slot,
                batch.writer,
                batch.seq,
                len(counts),
                sum(counts.values()),
            )
            flusher.adopt(buffer, batch.writer, batch.seq, counts)
        for fd in self.recover_fds:
            os.close(fd)
        if not self.recover_fds:
            return
        if recovered:
            flusher.on_adopted_written = lambda: self._tell_master(MSG_JOURNALS_RECOVERED)
        else:
            self._tell_master(MSG_JOURNALS_RECOVERED)

    def _tell_master(self, message: bytes) -> None:
        try:
            os.write(self.status_pipe, message)  # under PIPE_BUF, so all or nothing
        except (BlockingIOError, BrokenPipeError):
            pass  # a full pipe means the master is busy, a broken one that it is gone; neither should stop serving


def run_recovery(slot: int, status_fd: int, recover_fds: tuple[int, ...], settings: Settings, dsn: str) -> int:
    """`--recover-only`: commit dead workers' journals under their own ledger identities, say "J", exit 0. The master
    keeps the journals until then, so a recovery that fails or is killed can simply run again."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    async def commit_all() -> None:
        flusher = Flusher(dsn, [], settings.flush_interval, writer_identity(slot), WorkerStats())
        # build_features wants a read pool; a recovery serves no reads, so it is never opened.
        unused_pool: AsyncConnectionPool[Any] = AsyncConnectionPool(dsn, min_size=1, max_size=1, open=False)
        buffer = build_features(settings, flusher, unused_pool).journaled
        for fd in recover_fds:
            for batch in recover(fd):
                counts = buffer.replay(batch.records)
                log.warning(
                    "event=journal_recovered slot=%d writer=%s seq=%d keys=%d total=%d",
                    slot,
                    batch.writer,
                    batch.seq,
                    len(counts),
                    sum(counts.values()),
                )
                flusher.adopt(buffer, batch.writer, batch.seq, counts)
        # A stopping flusher writes what it adopted (retrying with back-off) and returns once a pass finds nothing.
        await flusher.stop(asyncio.create_task(flusher.run(), name="recovery"))

    configure_logging(settings.log_level, f"recovery{slot}")
    loop = uvloop.new_event_loop()
    try:
        loop.run_until_complete(commit_all())
    except Exception:
        log.exception("event=recovery_failed slot=%d", slot)
        return EXIT_CRASHED
    finally:
        loop.close()
    os.write(status_fd, MSG_JOURNALS_RECOVERED)
    return EXIT_OK


def worker_config(settings: Settings, dsn: str) -> str:
    return orjson.dumps({"settings": dataclasses.asdict(settings), "dsn": dsn}).decode()


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
    if args.recover_only:
        return run_recovery(args.slot, args.status_fd, tuple(args.recover_fd), settings, config["dsn"])
    configure_logging(settings.log_level, f"worker{args.slot}")
    try:
        sock = socket.socket(fileno=args.listen_fd)
        os.set_blocking(args.status_fd, False)
        worker = Worker(
            args.slot, sock, settings, config["dsn"], args.status_fd, args.journal_fd, tuple(args.recover_fd)
        )
        return worker.run()
    except Exception:
        log.exception("event=worker_boot_failed slot=%d", args.slot)
        return EXIT_BOOT_ERROR


if __name__ == "__main__":
    sys.exit(main())
