"""The master (arbiter): binds one SO_REUSEPORT socket per worker slot, starts the workers, and keeps them running.

It keeps every listening socket for the life of the service, so a replacement worker inherits its slot's socket and
connections queued there are never reset. Signal handlers only record the signal and wake the main loop through a
self-pipe; the loop does the work in plain steps. The master runs no event loop, thread or database connection; it
serves the admin listener (metrics) from the same select() loop and talks to systemd with sd_notify.

Signals: TERM/INT stop gracefully (workers finish and flush; killed after --graceful-timeout); HUP re-reads
--env-file and replaces the workers one slot at a time, each new worker serving before the old one is told to stop;
QUIT stops at once.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from fastcount.observability.admin import AdminServer
from fastcount.observability.metrics import MetricsBook
from fastcount.observability.systemd import SystemdNotifier
from fastcount.server.worker import CONFIG_ENV, worker_config
from fastcount.settings import Settings
from fastcount.store.journal import journal_size

log = logging.getLogger(__name__)

HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGCHLD)
HEARTBEAT_TIMEOUT = 30.0  # seconds a serving worker may go without a snapshot before it is killed
BOOT_TIMEOUT = 60.0  # seconds a new worker may take to start serving
RESPAWN_FIRST_DELAY = 0.5
RESPAWN_MAX_DELAY = 30.0
STABLE_AFTER = 10.0  # a worker that served this long resets its slot's crash back-off
# Settings a reload cannot change: the sockets, slots and database the master holds for its whole life.
RESTART_ONLY = (
    "host", "port", "workers", "reuse_port", "backlog", "tcp_defer_accept",
    "admin_host", "admin_port", "dsn", "data_dir",
)  # fmt: skip


SYSTEMD_ONLY = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


class MasterError(RuntimeError):
    pass


@dataclass
class WorkerProcess:
    process: subprocess.Popen[bytes]
    slot: int
    generation: int
    pipe: int  # read end of the worker's status pipe
    started: float = field(default_factory=time.monotonic)
    last_heartbeat: float = field(default_factory=time.monotonic)
    ready: bool = False
    retiring: bool = False  # told to stop; its slot already has (or will get) a successor
    unread: bytes = b""  # a status message not yet complete
    journal_fd: int = -1  # its crash journal (a memfd): kept if it dies without flushing
    recovering: list[int] = field(default_factory=list)  # dead workers' journals it was given

    @property
    def pid(self) -> int:
        return self.process.pid


@dataclass
class Slot:
    index: int
    sock: socket.socket
    failures: int = 0
    next_spawn_at: float = 0.0
    orphans: list[int] = field(default_factory=list)  # journals of dead workers, until a successor commits them


def somaxconn() -> int | None:
    try:
        with open("/proc/sys/net/core/somaxconn") as limit:
            return int(limit.read())
    except (OSError, ValueError):
        return None


def bind_listening_sockets(settings: Settings) -> list[socket.socket]:
    """One socket per slot, all on one port through SO_REUSEPORT (port 0: the first picks it); or, with
    reuse_port off, one socket that every slot shares."""
    family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
    count = settings.workers if settings.reuse_port else 1
    port = settings.port
    sockets: list[socket.socket] = []
    for _ in range(count):
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if settings.reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if settings.tcp_defer_accept:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, settings.tcp_defer_accept)
        try:
            sock.bind((settings.host, port))
        except OSError as error:
            sock.close()
            for opened in sockets:
                opened.close()
            raise MasterError(f"cannot listen on {settings.host}:{port}: {error.strerror}") from None
        sock.listen(settings.backlog)
        port = sock.getsockname()[1]
        sockets.append(sock)
    return sockets * settings.workers if not settings.reuse_port else sockets


class Master:
    def __init__(
        self,
        settings: Settings,
        dsn: str,
        overrides: dict[str, Any] | None = None,
        application: str = "fastcount.app:WorkerApp",
        sections: Sequence[type] = (),
    ) -> None:
        self.settings = settings
        self.application = application  # what workers load (module:factory); the master never imports it
        self.sections = sections  # the features' settings classes, to re-read them on reload
        self.dsn = dsn
        self.overrides = overrides or {}  # the command-line flags: they still win when a reload re-reads settings
        self.slots: list[Slot] = []
        self.workers: dict[int, WorkerProcess] = {}
        self.generation = 0
        self.reload_queue: deque[int] = deque()
        self.signal_queue: deque[int] = deque()
        self.wakeup_read = -1
        self.wakeup_write = -1
        self.stopping = False
        self.serving = False
        self.port = 0
        self.metrics = MetricsBook(settings.workers)
        self.systemd = SystemdNotifier()
        self.admin: AdminServer | None = None
        # systemd talks to the master alone (NotifyAccess=main): workers do not get its sockets.
        self._worker_environ = {k: v for k, v in os.environ.items() if k not in SYSTEMD_ONLY}

    # -- the main loop ----------------------------------------------------------------------------------------------

    def run(self) -> int:
        settings = self.settings
        limit = somaxconn()
        if limit is not None and settings.backlog > limit:
            log.warning(
                "event=backlog_capped backlog=%d somaxconn=%d hint='raise net.core.somaxconn (systemd/sysctl.d)'",
                settings.backlog,
                limit,
            )
        sockets = bind_listening_sockets(settings)
        self.slots = [Slot(index, sock) for index, sock in enumerate(sockets)]
        self.port = sockets[0].getsockname()[1]
        if settings.admin_port:
            try:
                self.admin = AdminServer(settings.admin_host, settings.admin_port, self.metrics.exposition)
            except OSError as error:
                raise MasterError(
                    f"cannot listen on admin {settings.admin_host}:{settings.admin_port}: {error.strerror}"
                ) from None
        log.info(
            "event=listening host=%s port=%d workers=%d reuse_port=%s admin=%s",
            settings.host,
            self.port,
            settings.workers,
            settings.reuse_port,
            f"{settings.admin_host}:{settings.admin_port}" if self.admin else "off",
        )
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
                self.systemd.watchdog()
            return 0
        except MasterError as error:
            log.error("event=master_halt reason=%r", str(error))
            self.stop(graceful=False)
            return 1
        finally:
            for sock in {id(slot.sock): slot.sock for slot in self.slots}.values():
                sock.close()
            if self.admin is not None:
                self.admin.close()

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
        watched: list[Any] = [self.wakeup_read, *(w.pipe for w in self.workers.values() if w.pipe >= 0)]
        if self.admin is not None:
            watched.append(self.admin)
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
        if self.admin is not None and self.admin in readable:
            self.read_worker_messages()  # answer with the freshest snapshots
            self.admin.handle_pending()

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
        """Start a fresh interpreter as the slot's worker; it inherits the slot's socket and a status pipe."""
        if time.monotonic() < slot.next_spawn_at:
            return None
        read_end, write_end = os.pipe()
        listen_fd = slot.sock.fileno()
        command = [
            sys.executable, "-m", "fastcount.server.worker",
            "--slot", str(slot.index), "--listen-fd", str(listen_fd), "--status-fd", str(write_end),
        ]  # fmt: skip
        journal_fd = -1
        if self.settings.crash_journal_mb:
            journal_fd = os.memfd_create(f"fastcount-journal-w{slot.index}")
            os.ftruncate(journal_fd, journal_size(self.settings.crash_journal_mb << 20))
            command += ["--journal-fd", str(journal_fd)]
        for orphan in slot.orphans:
            command += ["--recover-fd", str(orphan)]
        try:
            process = subprocess.Popen(
                command,
                pass_fds=(listen_fd, write_end, *([journal_fd] if journal_fd >= 0 else []), *slot.orphans),
                env={**self._worker_environ, CONFIG_ENV: worker_config(self.settings, self.dsn, self.application)},
            )
        finally:
            os.close(write_end)
        os.set_blocking(read_end, False)
        worker = WorkerProcess(process, slot.index, self.generation, read_end, journal_fd=journal_fd)
        worker.recovering = list(slot.orphans)
        self.workers[process.pid] = worker
        log.info("event=worker_spawned slot=%d pid=%d generation=%d", slot.index, process.pid, self.generation)
        return worker

    def read_worker_messages(self) -> None:
        for worker in self.workers.values():
            self._read_pipe(worker)
        serving = self._every_slot_serving()
        if serving and not self.serving:
            log.info("event=serving port=%d workers=%d", self.port, len(self.slots))
            self.systemd.ready(f"serving on port {self.port} with {len(self.slots)} workers")
        self.serving = serving
        self.metrics.ready_workers = sum(1 for w in self.workers.values() if w.ready and not w.retiring)

    def _read_pipe(self, worker: WorkerProcess) -> None:
        """Handle every complete message the worker has written; close the pipe at end of file (it is exiting)."""
        if worker.pipe < 0:
            return
        data = b""
        try:
            while True:
                chunk = os.read(worker.pipe, 65536)
                if not chunk:
                    os.close(worker.pipe)
                    worker.pipe = -1
                    break
                data += chunk
        except BlockingIOError:
            pass
        if data:
            self._handle_messages(worker, data, time.monotonic())

    def _handle_messages(self, worker: WorkerProcess, data: bytes, now: float) -> None:
        *lines, worker.unread = (worker.unread + data).split(b"\n")
        for line in lines:
            if line == b"R":
                worker.ready = True
                worker.last_heartbeat = now
                log.info("event=worker_ready slot=%d pid=%d", worker.slot, worker.pid)
            elif line == b"J":
                self._journals_recovered(worker)
            elif line.startswith(b"S"):
                worker.last_heartbeat = now
                try:
                    self.metrics.record(worker.pid, worker.slot, orjson.loads(line[1:]))
                except orjson.JSONDecodeError:
                    log.warning("event=bad_worker_message slot=%d pid=%d", worker.slot, worker.pid)

    def _journals_recovered(self, worker: WorkerProcess) -> None:
        slot = self.slots[worker.slot]
        for fd in worker.recovering:
            if fd in slot.orphans:
                slot.orphans.remove(fd)
                os.close(fd)
                # Another worker given the same journal (a reload during recovery) must not later close
                # whatever new file reuses this descriptor number.
                for other in self.workers.values():
                    if other is not worker and fd in other.recovering:
                        other.recovering.remove(fd)
        log.info("event=journals_recovered slot=%d pid=%d journals=%d", worker.slot, worker.pid, len(worker.recovering))
        worker.recovering = []

    def _keep_or_free_journal(self, worker: WorkerProcess, code: int) -> None:
        if worker.journal_fd < 0:
            return
        if code == 0:  # a clean exit flushed everything: the journal is empty
            os.close(worker.journal_fd)
        else:
            self.slots[worker.slot].orphans.append(worker.journal_fd)
            log.warning("event=journal_kept slot=%d pid=%d code=%d", worker.slot, worker.pid, code)
        worker.journal_fd = -1

    def _every_slot_serving(self) -> bool:
        serving = {worker.slot for worker in self.workers.values() if worker.ready and not worker.retiring}
        return len(serving) == len(self.slots)

    def reap_workers(self) -> None:
        for worker in list(self.workers.values()):
            code = worker.process.poll()
            if code is None:
                continue
            del self.workers[worker.pid]
            self._read_pipe(worker)  # its last snapshot, and a "J" it may have sent just before exiting
            if worker.pipe >= 0:  # exited, but something still holds the write end (cannot happen; be safe)
                os.close(worker.pipe)
                worker.pipe = -1
            self.metrics.retire(worker.pid)
            self._keep_or_free_journal(worker, code)
            self._account_exit(worker, code)

    def _account_exit(self, worker: WorkerProcess, code: int) -> None:
        if worker.retiring or self.stopping:
            log.info("event=worker_exited slot=%d pid=%d code=%d", worker.slot, worker.pid, code)
            return
        self.metrics.worker_restarts += 1
        slot = self.slots[worker.slot]
        lived = time.monotonic() - worker.started
        # Exited on its own (not killed by a signal: Popen reports those as negative codes) before it ever served:
        # the code or the settings do not boot (EXIT_BOOT_ERROR, or an import error's 1). Respawning cannot help.
        if code > 0 and not worker.ready:
            if self.reload_queue:  # the new code or settings do not boot: keep the workers that do
                log.error("event=reload_aborted generation=%d reason=worker_boot_failed", self.generation)
                self.reload_queue.clear()
                self.systemd.ready("reload failed: new workers did not boot; old workers kept")
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
            silent = now - worker.last_heartbeat
            if (worker.ready and silent > HEARTBEAT_TIMEOUT) or (not worker.ready and silent > BOOT_TIMEOUT):
                log.error("event=worker_unresponsive slot=%d pid=%d action=kill", worker.slot, worker.pid)
                self._signal(worker, signal.SIGKILL)
                worker.last_heartbeat = now

    # -- reload and stop --------------------------------------------------------------------------------------------

    def reload(self) -> None:
        """Rolling replacement: per slot, start the new worker, wait until it serves, then retire the old one."""
        self.systemd.reloading()
        self._reread_settings()
        self.generation += 1
        self.metrics.reloads += 1
        self.reload_queue = deque(slot.index for slot in self.slots)
        log.info("event=reload generation=%d", self.generation)
        self.advance_reload()

    def _reread_settings(self) -> None:
        if not self.settings.env_file:
            return
        try:
            fresh = Settings.from_sources(self.overrides, sections=self.sections)
        except (OSError, ValueError) as error:
            log.error("event=reload_settings_rejected reason=%r action=keep_current", str(error))
            return
        kept = {name: getattr(self.settings, name) for name in RESTART_ONLY}
        changed = [name for name, value in kept.items() if getattr(fresh, name) != value]
        if changed:
            log.warning("event=reload_settings_need_restart settings=%s action=keep_current", ",".join(changed))
        self.settings = dataclasses.replace(fresh, **kept)

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
                self.systemd.ready(f"serving on port {self.port}; reload {self.generation} done")

    def stop(self, graceful: bool) -> None:
        self.stopping = True
        self.systemd.stopping()
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
        unrecovered = sum(len(slot.orphans) for slot in self.slots)
        if unrecovered:
            log.error("event=journals_lost count=%d reason=stopped_before_a_worker_could_flush_them", unrecovered)
        log.info("event=stopped restarts=%d", self.metrics.worker_restarts)

    def _signal(self, worker: WorkerProcess, signum: int) -> None:
        try:
            os.kill(worker.pid, signum)
        except ProcessLookupError:
            pass
