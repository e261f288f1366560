"""The master (arbiter): binds one SO_REUSEPORT socket per worker slot, forks the workers, and keeps them running.

It keeps every listening socket for the life of the service, so a replacement worker inherits its slot's socket and
connections queued there are never reset. Signal handlers only record the signal and wake the main loop through a
self-pipe; the loop does the work in plain steps. The master runs no event loop, thread or database connection.

Signals: TERM/INT stop gracefully (workers finish and flush; killed after --graceful-timeout); HUP replaces the
workers one slot at a time, each new worker serving before the old one is told to stop; QUIT stops at once.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import signal
import socket
import time
from collections import deque
from dataclasses import dataclass, field

from fastcount.observability.logs import configure_logging
from fastcount.server.worker import EXIT_BOOT_ERROR, MSG_HEARTBEAT, MSG_READY, Worker
from fastcount.settings import Settings

log = logging.getLogger(__name__)

HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGCHLD)
HEARTBEAT_TIMEOUT = 30.0  # seconds a serving worker may go without a heartbeat before it is killed
RESPAWN_FIRST_DELAY = 0.5
RESPAWN_MAX_DELAY = 30.0
STABLE_AFTER = 10.0  # a worker that served this long resets its slot's crash back-off


class MasterError(RuntimeError):
    pass


@dataclass
class WorkerProcess:
    pid: int
    slot: int
    generation: int
    pipe: int  # read end of the worker's status pipe
    started: float = field(default_factory=time.monotonic)
    last_heartbeat: float = field(default_factory=time.monotonic)
    ready: bool = False
    retiring: bool = False  # told to stop; its slot already has (or will get) a successor


@dataclass
class Slot:
    index: int
    sock: socket.socket
    failures: int = 0
    next_spawn_at: float = 0.0


def somaxconn() -> int | None:
    try:
        with open("/proc/sys/net/core/somaxconn") as limit:
            return int(limit.read())
    except (OSError, ValueError):
        return None


def bind_slot_sockets(host: str, port: int, count: int, backlog: int) -> list[socket.socket]:
    """One listening socket per slot, all on the same port through SO_REUSEPORT (port 0: the first picks one)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sockets: list[socket.socket] = []
    for _ in range(count):
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            sock.bind((host, port))
        except OSError as error:
            sock.close()
            for opened in sockets:
                opened.close()
            raise MasterError(f"cannot listen on {host}:{port}: {error.strerror}") from None
        sock.listen(backlog)
        sock.setblocking(False)
        port = sock.getsockname()[1]
        sockets.append(sock)
    return sockets


class Master:
    def __init__(self, settings: Settings, dsn: str) -> None:
        self.settings = settings
        self.dsn = dsn
        self.slots: list[Slot] = []
        self.workers: dict[int, WorkerProcess] = {}
        self.generation = 0
        self.reload_queue: deque[int] = deque()
        self.signal_queue: deque[int] = deque()
        self.wakeup_read = -1
        self.wakeup_write = -1
        self.stopping = False
        self.announced_serving = False
        self.restarts = 0
        self.port = 0

    # -- the main loop ----------------------------------------------------------------------------------------------

    def run(self) -> int:
        settings = self.settings
        limit = somaxconn()
        if limit is not None and settings.backlog > limit:
            log.warning(
                "event=backlog_capped backlog=%d somaxconn=%d hint='raise net.core.somaxconn'", settings.backlog, limit
            )
        sockets = bind_slot_sockets(settings.host, settings.port, settings.workers, settings.backlog)
        self.slots = [Slot(index, sock) for index, sock in enumerate(sockets)]
        self.port = sockets[0].getsockname()[1]
        log.info("event=listening host=%s port=%d workers=%d", settings.host, self.port, settings.workers)
        self.install_signals()
        try:
            for slot in self.slots:
                self.spawn_worker(slot)
            while not self.stopping:
                self.sleep()
                self.read_worker_messages()
                self.reap_workers()
                if self.handle_signals():
                    break
                self.advance_reload()
                self.murder_unresponsive_workers()
                self.manage_workers()
            return 0
        except MasterError as error:
            log.error("event=master_halt reason=%r", str(error))
            self.stop(graceful=False)
            return 1
        finally:
            for slot in self.slots:
                slot.sock.close()

    def install_signals(self) -> None:
        self.wakeup_read, self.wakeup_write = os.pipe()
        for fd in (self.wakeup_read, self.wakeup_write):
            os.set_blocking(fd, False)
        for signum in HANDLED_SIGNALS:
            signal.signal(signum, self._record_signal)

    def _record_signal(self, signum: int, _frame: object) -> None:
        self.signal_queue.append(signum)
        try:
            os.write(self.wakeup_write, b"!")
        except BlockingIOError:
            pass

    def sleep(self, timeout: float = 1.0) -> None:
        watched = [self.wakeup_read, *(worker.pipe for worker in self.workers.values() if worker.pipe >= 0)]
        try:
            readable, _, _ = select.select(watched, [], [], timeout)
        except OSError as error:
            if error.errno != errno.EINTR:
                raise
            return
        if self.wakeup_read in readable:
            try:
                while os.read(self.wakeup_read, 512):
                    pass
            except BlockingIOError:
                pass

    def handle_signals(self) -> bool:
        """Act on recorded signals; True when the master should leave its loop."""
        while self.signal_queue:
            signum = self.signal_queue.popleft()
            if signum == signal.SIGCHLD:
                continue  # reap_workers runs every turn anyway
            if signum == signal.SIGHUP:
                self.reload()
            elif signum == signal.SIGQUIT:
                log.info("event=stop mode=immediate")
                self.stop(graceful=False)
                return True
            else:
                log.info("event=stop mode=graceful signal=%s", signal.Signals(signum).name)
                self.stop(graceful=True)
                return True
        return False

    # -- workers ----------------------------------------------------------------------------------------------------

    def spawn_worker(self, slot: Slot) -> WorkerProcess | None:
        if time.monotonic() < slot.next_spawn_at:
            return None
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: become a worker and never return into the master's code
            code = 1
            try:
                os.close(read_end)
                self._close_master_only_fds(slot)
                for signum in HANDLED_SIGNALS:
                    signal.signal(signum, signal.SIG_DFL)
                os.set_blocking(write_end, False)
                configure_logging(self.settings.log_level, f"worker{slot.index}")
                code = Worker(slot.index, slot.sock, self.settings, self.dsn, write_end).run()
            except BaseException:
                log.exception("event=worker_boot_failed slot=%d", slot.index)
                code = EXIT_BOOT_ERROR
            finally:
                logging.shutdown()
                os._exit(code)
        os.close(write_end)
        os.set_blocking(read_end, False)
        worker = WorkerProcess(pid, slot.index, self.generation, read_end)
        self.workers[pid] = worker
        log.info("event=worker_spawned slot=%d pid=%d generation=%d", slot.index, pid, self.generation)
        return worker

    def _close_master_only_fds(self, own_slot: Slot) -> None:
        os.close(self.wakeup_read)
        os.close(self.wakeup_write)
        for worker in self.workers.values():
            if worker.pipe >= 0:
                os.close(worker.pipe)
        for slot in self.slots:
            if slot is not own_slot:
                slot.sock.close()

    def read_worker_messages(self) -> None:
        now = time.monotonic()
        for worker in self.workers.values():
            if worker.pipe < 0:
                continue
            try:
                data = os.read(worker.pipe, 4096)
            except BlockingIOError:
                continue
            if not data:  # the worker closed its end: it is exiting; reap_workers will collect it
                os.close(worker.pipe)
                worker.pipe = -1
                continue
            if MSG_HEARTBEAT in data or MSG_READY in data:
                worker.last_heartbeat = now
            if MSG_READY in data and not worker.ready:
                worker.ready = True
                log.info("event=worker_ready slot=%d pid=%d", worker.slot, worker.pid)
        if not self.announced_serving and self._every_slot_serving():
            self.announced_serving = True
            log.info("event=serving port=%d workers=%d", self.port, len(self.slots))

    def _every_slot_serving(self) -> bool:
        serving = {worker.slot for worker in self.workers.values() if worker.ready and not worker.retiring}
        return len(serving) == len(self.slots)

    def reap_workers(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            worker = self.workers.pop(pid, None)
            if worker is None:
                continue
            if worker.pipe >= 0:
                os.close(worker.pipe)
            self._account_exit(worker, status)

    def _account_exit(self, worker: WorkerProcess, status: int) -> None:
        code = os.waitstatus_to_exitcode(status)
        if worker.retiring or self.stopping:
            log.info("event=worker_exited slot=%d pid=%d code=%d", worker.slot, worker.pid, code)
            return
        self.restarts += 1
        slot = self.slots[worker.slot]
        lived = time.monotonic() - worker.started
        if code == EXIT_BOOT_ERROR and not worker.ready:
            if self.reload_queue:  # the new code or settings do not boot: keep the workers that do
                log.error("event=reload_aborted generation=%d reason=worker_boot_failed", self.generation)
                self.reload_queue.clear()
                return
            raise MasterError(f"worker {worker.pid} of slot {worker.slot} failed to boot; see its log above")
        slot.failures = 1 if lived >= STABLE_AFTER else slot.failures + 1
        delay = 0.0 if slot.failures == 1 else min(RESPAWN_MAX_DELAY, RESPAWN_FIRST_DELAY * 2 ** (slot.failures - 2))
        slot.next_spawn_at = time.monotonic() + delay
        log.warning(
            "event=worker_died slot=%d pid=%d code=%d lived=%.1fs respawn_in=%.1fs",
            worker.slot,
            worker.pid,
            code,
            lived,
            delay,
        )

    def manage_workers(self) -> None:
        """Give every slot without a serving-or-starting worker a new one."""
        if self.stopping:
            return
        staffed = {worker.slot for worker in self.workers.values() if not worker.retiring}
        for slot in self.slots:
            if slot.index not in staffed:
                self.spawn_worker(slot)

    def murder_unresponsive_workers(self) -> None:
        now = time.monotonic()
        for worker in self.workers.values():
            if worker.ready and now - worker.last_heartbeat > HEARTBEAT_TIMEOUT:
                log.error("event=worker_unresponsive slot=%d pid=%d action=kill", worker.slot, worker.pid)
                self._signal(worker, signal.SIGKILL)
                worker.last_heartbeat = now

    # -- reload and stop --------------------------------------------------------------------------------------------

    def reload(self) -> None:
        """Rolling replacement: per slot, start the new worker, wait until it serves, then retire the old one."""
        self.generation += 1
        self.reload_queue = deque(slot.index for slot in self.slots)
        log.info("event=reload generation=%d", self.generation)
        self.advance_reload()

    def advance_reload(self) -> None:
        while self.reload_queue:
            index = self.reload_queue[0]
            current = [w for w in self.workers.values() if w.slot == index and not w.retiring]
            successor = next((w for w in current if w.generation == self.generation), None)
            if successor is None:
                self.spawn_worker(self.slots[index])
                return
            if not successor.ready:
                return
            for worker in current:
                if worker is not successor:
                    worker.retiring = True
                    self._signal(worker, signal.SIGTERM)
            self.reload_queue.popleft()
            if not self.reload_queue:
                log.info("event=reload_done generation=%d", self.generation)

    def stop(self, graceful: bool) -> None:
        self.stopping = True
        for worker in self.workers.values():
            self._signal(worker, signal.SIGTERM if graceful else signal.SIGKILL)
        deadline = time.monotonic() + (self.settings.graceful_timeout if graceful else 5.0)
        while self.workers and time.monotonic() < deadline:
            self.sleep(0.1)
            self.read_worker_messages()
            self.reap_workers()
        for worker in list(self.workers.values()):
            log.error("event=worker_killed slot=%d pid=%d reason=graceful_timeout", worker.slot, worker.pid)
            self._signal(worker, signal.SIGKILL)
        while self.workers:
            self.sleep(0.1)
            self.reap_workers()
        log.info("event=stopped restarts=%d", self.restarts)

    def _signal(self, worker: WorkerProcess, signum: int) -> None:
        try:
            os.kill(worker.pid, signum)
        except ProcessLookupError:
            pass
