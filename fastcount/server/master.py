"""The master (arbiter): binds one SO_REUSEPORT socket per worker slot, starts the workers, and keeps them running.

It keeps every listening socket for the life of the service, so a replacement worker inherits its slot's socket and
connections queued there are never reset. Signal handlers only record the signal and wake the main loop through a
self-pipe; one poll() loop does all the work in plain named steps, in every phase: starting, serving, reloading and
stopping (a stop is a state of that loop with a deadline, not a loop of its own). The master runs no event loop,
thread or database connection; it serves the admin listener (metrics) from the same loop, never blocking on it, and
talks to systemd with sd_notify.

Signals: TERM/INT stop gracefully (workers finish and flush; killed after --graceful-timeout); HUP re-reads
--env-file and replaces the workers one slot at a time, each new worker serving before the old one is told to stop;
QUIT stops at once, also in the middle of a graceful stop.

One failure stays one failure: a worker that cannot boot after the service has served is retried on its slot with
back-off while the others keep serving (a reload whose new workers cannot boot is rolled back); only a failure before
the service ever served stops the master. A dead worker's crash journal is committed at once by a short-lived
recovery process (`worker --recover-only`), retried with back-off until it says "J" and exits 0.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import resource
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
from fastcount.settings import Settings, knob_fields
from fastcount.store.journal import recover

log = logging.getLogger(__name__)

HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGCHLD)
# Seconds a serving worker may go without a snapshot before it is killed (the variable is for tests: 30 s is long).
HEARTBEAT_TIMEOUT = float(os.environ.get("FASTCOUNT_HEARTBEAT_TIMEOUT", "30"))
BOOT_TIMEOUT = 60.0  # seconds a new worker may take to start serving
RESPAWN_FIRST_DELAY = 0.5
RESPAWN_MAX_DELAY = 30.0
STABLE_AFTER = 10.0  # a worker that served this long resets its slot's crash back-off
TICK = 1.0  # the loop wakes at least this often (heartbeats, watchdog), sooner for a due deadline


SYSTEMD_ONLY = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")
POLL_IN = select.POLLIN | select.POLLPRI
POLL_OUT = select.POLLOUT
POLL_DONE = select.POLLHUP | select.POLLERR | select.POLLNVAL


class MasterError(RuntimeError):
    pass


def backoff(failures: int) -> float:
    """Seconds before the next try after `failures` failures in a row: none after the first, then 0.5 s doubling."""
    return 0.0 if failures <= 1 else min(RESPAWN_MAX_DELAY, RESPAWN_FIRST_DELAY * 2 ** (failures - 2))


@dataclass(kw_only=True)
class Child:
    """A process the master started, with the read end of its status pipe."""

    process: subprocess.Popen[bytes]
    slot: int
    pipe: int
    started: float = field(default_factory=time.monotonic)
    unread: bytes = b""  # a status message not yet complete

    @property
    def pid(self) -> int:
        return self.process.pid


@dataclass(kw_only=True)
class WorkerProcess(Child):
    generation: int
    last_heartbeat: float = field(default_factory=time.monotonic)
    ready: bool = False
    retiring: bool = False  # told to stop; its slot already has (or will get) a successor
    journal_fd: int = -1  # its crash journal (a memfd): kept if it dies without flushing


@dataclass
class OrphanJournal:
    """A dead worker's crash journal, held by the master until a recovery process has committed it."""

    fd: int
    slot: int
    dead_pid: int
    failures: int = 0
    next_attempt_at: float = 0.0
    recovering: bool = False  # a recovery process has it now


@dataclass(kw_only=True)
class RecoveryProcess(Child):
    journal: OrphanJournal
    committed: bool = False  # it said "J": every batch of the journal is in PostgreSQL


@dataclass
class Slot:
    index: int
    sock: socket.socket
    failures: int = 0
    next_spawn_at: float = 0.0
    paused: bool = False  # out of the SO_REUSEPORT group while no worker of it can boot


def somaxconn() -> int | None:
    try:
        with open("/proc/sys/net/core/somaxconn") as limit:
            return int(limit.read())
    except (OSError, ValueError):
        return None


def raise_fd_limit() -> None:
    """Every client connection is a descriptor: take the soft RLIMIT_NOFILE up to the hard limit (a desktop's `ulimit
    -n` is often 1024 under a far higher hard limit). Workers inherit it; each logs the limit it runs with."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:  # Linux refuses an infinite NOFILE; its ceiling is fs.nr_open
        try:
            with open("/proc/sys/fs/nr_open") as nr_open:
                hard = int(nr_open.read())
        except (OSError, ValueError):
            hard = soft
    if soft != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
        except (OSError, ValueError) as error:
            log.warning("event=fd_limit_not_raised soft=%d hard=%d error=%r", soft, hard, str(error))
            return
        log.info("event=fd_limit_raised from=%d to=%d", soft, hard)


def _in_use(what: str, host: str, port: int) -> MasterError:
    return MasterError(
        f"{what} port {port} on {host} is already in use: another fastcount (or another server) is probably "
        "running there; stop it or choose another port"
    )


def refuse_a_port_in_use(host: str, port: int, what: str = "the") -> None:
    """SO_REUSEPORT lets a second fastcount join the first one's group and split its traffic. A plain bind (no
    SO_REUSEPORT; SO_REUSEADDR so a TIME_WAIT leftover is no obstacle) fails while anyone listens on the port."""
    if port == 0:
        return
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as error:
            if error.errno == errno.EADDRINUSE:
                raise _in_use(what, host, port) from None
            raise MasterError(f"cannot listen on {host}:{port}: {error.strerror}") from None


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
            if error.errno == errno.EADDRINUSE:
                raise _in_use("the", settings.host, port) from None
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
        self.application = application  # what workers load (module:factory); the master never imports it
        self.sections = sections  # the features' settings classes, to re-read them on reload
        self.settings = settings
        self.dsn = dsn
        self.overrides = overrides or {}  # the command-line flags: they still win when a reload re-reads settings
        self.slots: list[Slot] = []
        self.workers: dict[int, WorkerProcess] = {}
        self.recoveries: dict[int, RecoveryProcess] = {}
        self.journals: list[OrphanJournal] = []
        self.generation = 0
        self.generations_started = 0  # generation numbers are never reused, even by a reload that was rolled back
        self.reload_queue: deque[int] = deque()
        self.reload_rollback: tuple[Settings, int] | None = None  # what an aborted reload goes back to
        self.signal_queue: deque[int] = deque()
        self.wakeup_read = -1
        self.wakeup_write = -1
        self.stop_deadline: float | None = None  # set once a stop is requested: workers are killed at that time
        self.stop_reason = ""
        self.killed_all = False
        self.exit_code = 0
        self.serving = False
        self.ever_serving = False  # every slot served at least once: from then on a failure never stops the master
        self.port = 0
        self.metrics = MetricsBook(settings.workers)
        self.systemd = SystemdNotifier()
        self.admin: AdminServer | None = None
        # systemd talks to the master alone (NotifyAccess=main): workers do not get its sockets.
        self._worker_environ = {k: v for k, v in os.environ.items() if k not in SYSTEMD_ONLY}

    @property
    def stopping(self) -> bool:
        return self.stop_deadline is not None

    # -- the main loop ----------------------------------------------------------------------------------------------

    def run(self) -> int:
        raise_fd_limit()  # before the first fork: workers inherit it
        self.listen()
        self.install_signals()
        try:
            for slot in self.slots:
                self.spawn_worker(slot)
            while True:
                readable, writable = self.sleep()
                self.read_messages()
                self.reap_children()
                self.serve_admin(readable, writable)
                self.handle_signals()
                self.advance_reload()
                self.manage_workers()
                self.manage_recoveries()
                self.murder_unresponsive_workers()
                self.systemd.watchdog()
                if self.stopping and self.advance_stop():
                    break
            log.info("event=stopped restarts=%d code=%d", self.metrics.worker_restarts, self.exit_code)
            return self.exit_code
        finally:
            self.kill_leftovers()
            for sock in {id(slot.sock): slot.sock for slot in self.slots}.values():
                sock.close()
            if self.admin is not None:
                self.admin.close()

    def listen(self) -> None:
        """Refuse a port someone already serves, then bind the admin listener and the slots' sockets."""
        settings = self.settings
        limit = somaxconn()
        if limit is not None and settings.backlog > limit:
            log.warning(
                "event=backlog_capped backlog=%d somaxconn=%d hint='raise net.core.somaxconn (systemd/sysctl.d)'",
                settings.backlog,
                limit,
            )
        refuse_a_port_in_use(settings.host, settings.port)
        # The admin listener first: failing on it must not have joined (and then left) another instance's group.
        if settings.admin_port:
            try:
                self.admin = AdminServer(settings.admin_host, settings.admin_port, self.metrics.exposition)
            except OSError as error:
                if error.errno == errno.EADDRINUSE:
                    raise _in_use("admin", settings.admin_host, settings.admin_port) from None
                raise MasterError(
                    f"cannot listen on admin {settings.admin_host}:{settings.admin_port}: {error.strerror}"
                ) from None
        try:
            sockets = bind_listening_sockets(settings)
        except MasterError:
            if self.admin is not None:
                self.admin.close()
            raise
        self.slots = [Slot(index, sock) for index, sock in enumerate(sockets)]
        self.port = sockets[0].getsockname()[1]
        log.info(
            "event=listening host=%s port=%d workers=%d reuse_port=%s admin=%s",
            settings.host,
            self.port,
            settings.workers,
            settings.reuse_port,
            f"{settings.admin_host}:{settings.admin_port}" if self.admin else "off",
        )

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

    def sleep(self) -> tuple[set[int], set[int]]:
        """Wait for a signal, a worker's message, an admin client or the next deadline; return the ready fds."""
        poller = select.poll()
        for fd in (self.wakeup_read, *(child.pipe for child in self._children() if child.pipe >= 0)):
            poller.register(fd, POLL_IN)
        if self.admin is not None:
            for fd in self.admin.readers():
                poller.register(fd, POLL_IN)
            for fd in self.admin.writers():
                poller.register(fd, POLL_OUT)
        events = poller.poll(self._timeout() * 1000)
        readable = {fd for fd, event in events if event & (POLL_IN | POLL_DONE)}
        writable = {fd for fd, event in events if event & (POLL_OUT | POLL_DONE)}
        if self.wakeup_read in readable:
            try:
                while os.read(self.wakeup_read, 512):
                    pass
            except BlockingIOError:
                pass
        return readable, writable

    def _timeout(self) -> float:
        now = time.monotonic()
        due = [now + TICK]
        if self.stop_deadline is not None and not self.killed_all:
            due.append(self.stop_deadline)
        if self.admin is not None and (admin_due := self.admin.next_deadline()) is not None:
            due.append(admin_due)
        due += [slot.next_spawn_at for slot in self.slots if slot.next_spawn_at > now]
        if not self.killed_all:
            due += [j.next_attempt_at for j in self.journals if not j.recovering and j.next_attempt_at > now]
        return max(0.0, min(due) - now)

    def _children(self) -> list[Child]:
        return [*self.workers.values(), *self.recoveries.values()]

    def handle_signals(self) -> None:
        while self.signal_queue:
            signum = self.signal_queue.popleft()
            if signum == signal.SIGCHLD:
                continue  # reap_children runs every turn anyway
            if signum == signal.SIGHUP:
                if self.stopping:
                    log.info("event=reload_ignored reason=stopping")
                else:
                    self.reload()
            elif signum == signal.SIGQUIT:
                log.info("event=stop mode=immediate")
                self.request_stop(graceful=False, reason="immediate_stop")
            elif self.stopping:
                log.info("event=stop_already_requested signal=%s", signal.Signals(signum).name)
            else:
                log.info("event=stop mode=graceful signal=%s", signal.Signals(signum).name)
                self.request_stop(graceful=True, reason="graceful_timeout")

    def serve_admin(self, readable: set[int], writable: set[int]) -> None:
        if self.admin is not None:
            self.admin.serve(readable, writable)  # after read_messages: answers carry the freshest snapshots

    # -- workers ----------------------------------------------------------------------------------------------------

    def spawn_worker(self, slot: Slot) -> WorkerProcess | None:
        """Start a fresh interpreter as the slot's worker; it inherits the slot's socket and a status pipe."""
        if time.monotonic() < slot.next_spawn_at:
            return None
        listen_fd = slot.sock.fileno()
        journal_fd = -1
        read_end, write_end = os.pipe()
        try:
            command = [
                sys.executable, "-m", "fastcount.server.worker",
                "--slot", str(slot.index), "--listen-fd", str(listen_fd), "--status-fd", str(write_end),
            ]  # fmt: skip
            if self.settings.crash_journal_mb:
                journal_fd = os.memfd_create(f"fastcount-journal-w{slot.index}")
                command += ["--journal-fd", str(journal_fd)]
            process = subprocess.Popen(
                command,
                pass_fds=(listen_fd, write_end, *([journal_fd] if journal_fd >= 0 else [])),
                env={**self._worker_environ, CONFIG_ENV: worker_config(self.settings, self.dsn, self.application)},
                process_group=0,  # a terminal's Ctrl-C reaches the master alone, which stops the workers in order
            )
        except OSError as error:  # no memory, no fds, no processes left: a failed boot, retried with back-off
            for fd in (read_end, journal_fd):
                if fd >= 0:
                    os.close(fd)
            self.metrics.worker_boot_failures += 1
            slot.failures += 1
            slot.next_spawn_at = time.monotonic() + backoff(max(2, slot.failures))
            log.error("event=worker_spawn_failed slot=%d error=%r", slot.index, str(error))
            return None
        finally:
            os.close(write_end)
        os.set_blocking(read_end, False)
        worker = WorkerProcess(
            process=process, slot=slot.index, generation=self.generation, pipe=read_end, journal_fd=journal_fd
        )
        self.workers[process.pid] = worker
        log.info("event=worker_spawned slot=%d pid=%d generation=%d", slot.index, process.pid, self.generation)
        return worker

    def read_messages(self) -> None:
        for child in self._children():
            self._read_pipe(child)
        serving = self._every_slot_serving()
        if serving and not self.serving and not self.stopping:
            log.info("event=serving port=%d workers=%d", self.port, len(self.slots))
            self.systemd.ready(f"serving on port {self.port} with {len(self.slots)} workers")
            self.ever_serving = True
        self.serving = serving
        self.metrics.ready_workers = sum(1 for w in self.workers.values() if w.ready and not w.retiring)
        self.metrics.journals_pending = len(self.journals)

    def _read_pipe(self, child: Child) -> None:
        """Handle every complete message the child has written; close the pipe at end of file (it is exiting)."""
        if child.pipe < 0:
            return
        data = b""
        try:
            while True:
                chunk = os.read(child.pipe, 65536)
                if not chunk:
                    self._close_pipe(child)
                    break
                data += chunk
        except BlockingIOError:
            pass
        except OSError as error:  # cannot happen with a pipe we own; never let it stop the loop
            log.error("event=status_pipe_failed slot=%d pid=%d error=%r", child.slot, child.pid, str(error))
            self._close_pipe(child)
        if data:
            self._handle_messages(child, data, time.monotonic())

    def _close_pipe(self, child: Child) -> None:
        if child.pipe >= 0:
            os.close(child.pipe)
            child.pipe = -1

    def _handle_messages(self, child: Child, data: bytes, now: float) -> None:
        *lines, child.unread = (child.unread + data).split(b"\n")
        if isinstance(child, RecoveryProcess):
            child.committed = child.committed or b"J" in lines
            return
        assert isinstance(child, WorkerProcess)
        for line in lines:
            if line == b"R":
                child.ready = True
                child.last_heartbeat = now
                log.info("event=worker_ready slot=%d pid=%d", child.slot, child.pid)
                slot = self.slots[child.slot]
                if slot.paused:  # the worker listened on the socket again, which put it back in the group
                    slot.paused = False
                    log.info("event=slot_resumed slot=%d pid=%d", child.slot, child.pid)
            elif line.startswith(b"S"):
                child.last_heartbeat = now
                try:
                    snapshot = orjson.loads(line[1:])
                except orjson.JSONDecodeError:
                    snapshot = None
                if isinstance(snapshot, dict):
                    self.metrics.record(child.pid, child.slot, snapshot)
                else:
                    log.warning("event=bad_worker_message slot=%d pid=%d", child.slot, child.pid)

    def _every_slot_serving(self) -> bool:
        serving = {worker.slot for worker in self.workers.values() if worker.ready and not worker.retiring}
        return len(serving) == len(self.slots)

    def reap_children(self) -> None:
        for child in self._children():
            code = child.process.poll()
            if code is None:
                continue
            self._read_pipe(child)  # its last snapshot, or the "J" a recovery process sent just before exiting
            self._close_pipe(child)  # exited, but something still holds the write end (cannot happen; be safe)
            if isinstance(child, RecoveryProcess):
                del self.recoveries[child.pid]
                self._account_recovery(child, code)
            elif isinstance(child, WorkerProcess):
                del self.workers[child.pid]
                self.metrics.retire(child.pid)
                self._keep_or_free_journal(child, code)
                self._account_exit(child, code)

    def _keep_or_free_journal(self, worker: WorkerProcess, code: int) -> None:
        fd, worker.journal_fd = worker.journal_fd, -1
        if fd < 0:
            return
        # A clean exit flushed everything; a worker that died before it accepted anything left nothing to commit.
        if code == 0 or not recover(fd):
            os.close(fd)
            return
        self.journals.append(OrphanJournal(fd, worker.slot, worker.pid))
        log.warning("event=journal_kept slot=%d pid=%d code=%d action=recover", worker.slot, worker.pid, code)

    def _account_exit(self, worker: WorkerProcess, code: int) -> None:
        if worker.retiring or self.stopping:
            log.info("event=worker_exited slot=%d pid=%d code=%d", worker.slot, worker.pid, code)
            return
        slot = self.slots[worker.slot]
        # Exited on its own (not killed by a signal: Popen reports those as negative codes) before it ever served:
        # the code or the settings do not boot (EXIT_BOOT_ERROR, or an import error's 1).
        if code > 0 and not worker.ready:
            self._boot_failed(worker, slot, code)
            return
        self.metrics.worker_restarts += 1
        lived = time.monotonic() - worker.started
        slot.failures = 1 if lived >= STABLE_AFTER else slot.failures + 1
        delay = backoff(slot.failures)
        slot.next_spawn_at = time.monotonic() + delay
        log.warning(
            "event=worker_died slot=%d pid=%d code=%d lived=%.1fs respawn_in=%.1fs",
            worker.slot,
            worker.pid,
            code,
            lived,
            delay,
        )

    def _boot_failed(self, worker: WorkerProcess, slot: Slot, code: int) -> None:
        """One worker that cannot boot costs its slot, never the workers that serve."""
        self.metrics.worker_boot_failures += 1
        if not self.ever_serving:  # at first start: the code or settings do not boot, and nothing was accepted yet
            self.exit_code = 1
            log.error(
                "event=master_halt reason=%r",
                f"worker {worker.pid} of slot {worker.slot} failed to boot before the service ever served; "
                "see its log above",
            )
            self.request_stop(graceful=True, reason="master_halt")
            return
        if self.reload_queue and worker.generation == self.generation:
            self._abort_reload(worker)
        slot.failures += 1
        delay = backoff(max(2, slot.failures))  # never retry code that did not boot without a pause
        slot.next_spawn_at = time.monotonic() + delay
        log.error(
            "event=worker_boot_failed slot=%d pid=%d code=%d generation=%d retry_in=%.1fs",
            worker.slot,
            worker.pid,
            code,
            worker.generation,
            delay,
        )
        self._pause_if_unstaffed(slot)

    def _pause_if_unstaffed(self, slot: Slot) -> None:
        """A slot socket nobody accepts on would hold the connections the kernel hands it until a worker boots: take
        it out of the SO_REUSEPORT group (shutdown keeps its address) so they go to the slots that serve. The next
        worker's listen() puts it back."""
        if not self.settings.reuse_port or slot.paused:
            return
        if any(w.slot == slot.index and not w.retiring for w in self.workers.values()):
            return
        try:
            slot.sock.shutdown(socket.SHUT_RDWR)
        except OSError as error:
            log.warning("event=slot_pause_failed slot=%d error=%r", slot.index, str(error))
            return
        slot.paused = True
        log.warning("event=slot_paused slot=%d reason=no_worker_boots", slot.index)

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

    # -- dead workers' journals -------------------------------------------------------------------------------------

    def manage_recoveries(self) -> None:
        """Start a recovery process for every kept journal that has none and is due (also while stopping)."""
        if self.killed_all:
            return
        now = time.monotonic()
        for journal in self.journals:
            if not journal.recovering and now >= journal.next_attempt_at:
                self.spawn_recovery(journal)

    def spawn_recovery(self, journal: OrphanJournal) -> None:
        read_end, write_end = os.pipe()
        command = [
            sys.executable, "-m", "fastcount.server.worker", "--slot", str(journal.slot),
            "--status-fd", str(write_end), "--recover-only", "--recover-fd", str(journal.fd),
        ]  # fmt: skip
        try:
            process = subprocess.Popen(
                command,
                pass_fds=(write_end, journal.fd),
                env={**self._worker_environ, CONFIG_ENV: worker_config(self.settings, self.dsn, self.application)},
                process_group=0,
            )
        except OSError as error:
            os.close(read_end)
            self._recovery_failed(journal, f"spawn failed: {error}")
            return
        finally:
            os.close(write_end)
        os.set_blocking(read_end, False)
        self.recoveries[process.pid] = RecoveryProcess(
            process=process, slot=journal.slot, pipe=read_end, journal=journal
        )
        journal.recovering = True
        log.info("event=recovery_spawned slot=%d pid=%d dead_pid=%d", journal.slot, process.pid, journal.dead_pid)

    def _account_recovery(self, recovery: RecoveryProcess, code: int) -> None:
        journal = recovery.journal
        journal.recovering = False
        if code == 0 and recovery.committed:
            self.journals.remove(journal)
            os.close(journal.fd)
            log.info(
                "event=journals_recovered slot=%d pid=%d dead_pid=%d", journal.slot, recovery.pid, journal.dead_pid
            )
            return
        self._recovery_failed(journal, f"recovery process {recovery.pid} exited with {code}")

    def _recovery_failed(self, journal: OrphanJournal, reason: str) -> None:
        self.metrics.journal_recovery_failures += 1
        journal.failures += 1
        delay = backoff(journal.failures + 1)
        journal.next_attempt_at = time.monotonic() + delay
        log.warning(
            "event=journal_recovery_failed slot=%d dead_pid=%d reason=%r retry_in=%.1fs",
            journal.slot,
            journal.dead_pid,
            reason,
            delay,
        )

    # -- reload and stop --------------------------------------------------------------------------------------------

    def reload(self) -> None:
        """Rolling replacement: per slot, start the new worker, wait until it serves, then retire the old one."""
        self.systemd.reloading()
        if self.reload_rollback is None:  # a reload during a reload rolls back to what served before either
            self.reload_rollback = (self.settings, self.generation)
        self._reread_settings()
        self.generations_started += 1
        self.generation = self.generations_started
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
        # Knobs declared knob(restart=True), the core's and the features', compared as resolved (a feature's default
        # is in no `sections` dict) and kept as the master started with them.
        kept: dict[str, Any] = {}
        kept_sections: dict[str, Any] = {}
        changed = []
        for owner, spec in knob_fields(self.sections):
            if not spec.metadata.get("restart"):
                continue
            core = owner is Settings
            old = getattr(self.settings if core else self.settings.section(owner), spec.name)
            new = getattr(fresh if core else fresh.section(owner), spec.name)
            (kept if core else kept_sections)[spec.name] = old
            if new != old:
                changed.append(spec.name)
        if changed:
            log.warning("event=reload_settings_need_restart settings=%s action=keep_current", ",".join(changed))
        self.settings = dataclasses.replace(fresh, **kept, sections={**fresh.sections, **kept_sections})

    def _abort_reload(self, worker: WorkerProcess) -> None:
        """The new code or settings do not boot: keep the workers that serve, and go back to what they run."""
        assert self.reload_rollback is not None
        aborted = self.generation
        self.settings, self.generation = self.reload_rollback
        self.reload_rollback = None
        self.reload_queue.clear()
        self.metrics.reloads_aborted += 1
        log.error(
            "event=reload_aborted generation=%d reason=worker_boot_failed slot=%d pid=%d rolled_back_to=%d",
            aborted,
            worker.slot,
            worker.pid,
            self.generation,
        )
        self.systemd.ready("reload failed: new workers did not boot; old workers kept")

    def advance_reload(self) -> None:
        if self.stopping:
            return
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
                self.reload_rollback = None
                log.info("event=reload_done generation=%d", self.generation)
                self.systemd.ready(f"serving on port {self.port}; reload {self.generation} done")

    def request_stop(self, graceful: bool, reason: str) -> None:
        """Enter (or hurry) the stop: workers get SIGTERM now and SIGKILL at the deadline; an immediate stop's
        deadline is now. The main loop carries on (signals, reaping, admin) until every child is gone."""
        now = time.monotonic()
        if self.stop_deadline is None:
            self.stop_deadline = now + (self.settings.graceful_timeout if graceful else 0.0)
            self.stop_reason = reason
            self.systemd.stopping()
            self.reload_queue.clear()
            if graceful:
                for worker in self.workers.values():
                    self._signal(worker, signal.SIGTERM)
        elif not graceful and self.stop_deadline > now:
            self.stop_deadline = now
            self.stop_reason = reason

    def advance_stop(self) -> bool:
        """One step of a stop; True once every child is gone and nothing is left worth waiting for."""
        assert self.stop_deadline is not None
        if not self.killed_all and time.monotonic() >= self.stop_deadline:
            self.killed_all = True
            for worker in self.workers.values():
                log.error("event=worker_killed slot=%d pid=%d reason=%s", worker.slot, worker.pid, self.stop_reason)
                self._signal(worker, signal.SIGKILL)
            for recovery in self.recoveries.values():
                log.error(
                    "event=recovery_killed slot=%d pid=%d reason=%s", recovery.slot, recovery.pid, self.stop_reason
                )
                self._signal(recovery, signal.SIGKILL)
        if self.workers or self.recoveries:
            return False
        if not self.killed_all and any(journal.next_attempt_at < self.stop_deadline for journal in self.journals):
            return False  # a failed recovery is retried if its back-off ends before the deadline
        if self.journals:
            # Counts answered 202 are gone: the exit code says so (systemd and scripts must not see a clean stop).
            self.exit_code = 1
            log.error("event=journals_lost count=%d reason=stopped_before_they_could_be_committed", len(self.journals))
            for journal in self.journals:
                os.close(journal.fd)
            self.journals.clear()
        return True

    def kill_leftovers(self) -> None:
        """Only after an unexpected error in the loop: no child may outlive its master unsupervised."""
        for child in self._children():
            log.error("event=child_killed slot=%d pid=%d reason=master_exiting", child.slot, child.pid)
            self._signal(child, signal.SIGKILL)
            child.process.wait()
            self._close_pipe(child)
        self.workers.clear()
        self.recoveries.clear()

    def _signal(self, child: Child, signum: int) -> None:
        try:
            os.kill(child.pid, signum)
        except ProcessLookupError:
            pass
