"""The embedded PostgreSQL: a private cluster under --data-dir, used when no DSN is given.

Binaries come from the `pgserver` wheel when installed, else from `pg_config --bindir` or PATH. The cluster listens
on 127.0.0.1 only, on a port remembered in the data directory. One fastcount at a time owns a data directory (a lock
held for the life of the process), so a second start cannot stop the first one's cluster. This module starts and
stops that server; schema and queries live in database.py.
"""

from __future__ import annotations

import errno
import fcntl
import importlib.util
import logging
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)

INSTALL_HINT = (
    "no PostgreSQL server binaries found: install the 'pgserver' wheel (pip install pgserver, Python <= 3.12), "
    "or PostgreSQL itself (Debian: apt-get install postgresql), or pass --dsn to use an existing server"
)
SERVICE_USER = "fastcount-pg"  # who runs postgres when we are root: initdb and postgres refuse to run as root
PORT_FILE = "fastcount.port"
LOCK_FILE = "fastcount.lock"


class EmbeddedPostgresError(RuntimeError):
    pass


class DataDirInUse(EmbeddedPostgresError):
    def __init__(self, data_dir: str, pid: int | None) -> None:
        holder = "another fastcount" + (f" (pid {pid})" if pid else "")
        super().__init__(f"data directory {data_dir} is in use by {holder}; stop it or use --data-dir")
        self.pid = pid


class DataDirLock:
    """An exclusive flock on <data-dir>/fastcount.lock, which also records the holder's pid for the message.

    The kernel drops the lock when the process dies, however it dies, so a stale file never blocks a start. The
    descriptor is not inheritable: neither workers nor the postmaster keep the lock after the holder is gone.
    """

    def __init__(self, data_dir: Path, shown_as: str) -> None:
        self.path = data_dir / LOCK_FILE
        self.shown_as = shown_as
        self._fd = -1

    def acquire(self) -> None:
        """Take the lock without waiting; DataDirInUse if another process holds it, OSError if the file is unusable."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            os.close(fd)
            if error.errno not in (errno.EWOULDBLOCK, errno.EACCES):
                raise
            raise DataDirInUse(self.shown_as, self._holder()) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    @property
    def held(self) -> bool:
        return self._fd >= 0

    def release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)  # closing drops the flock; the file stays, it is harmless
            self._fd = -1

    def _holder(self) -> int | None:
        try:
            text = self.path.read_text().strip()
        except OSError:
            return None
        return int(text) if text.isdigit() else None  # empty while the holder is between flock and write


def find_bindir() -> Path:
    spec = importlib.util.find_spec("pgserver")  # locate without importing: its import has side effects
    if spec is not None and spec.origin is not None:
        candidate = Path(spec.origin).parent / "pginstall" / "bin"
        if (candidate / "pg_ctl").exists():
            return candidate
    pg_config = shutil.which("pg_config")
    if pg_config:
        bindir = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True).stdout.strip()
        if bindir and (Path(bindir) / "pg_ctl").exists() and (Path(bindir) / "initdb").exists():
            return Path(bindir)
    found = shutil.which("pg_ctl")
    if found and (Path(found).parent / "initdb").exists():
        return Path(found).parent
    raise EmbeddedPostgresError(INSTALL_HINT)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _port_is_free(port: int) -> bool:
    with socket.socket() as probe:
        # As PostgreSQL binds: with SO_REUSEADDR, so the last run's connections in TIME_WAIT do not make the
        # remembered port look taken (the DSN changed on every restart: new-user trial).
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


class EmbeddedPostgres:
    def __init__(self, data_dir: str | os.PathLike[str], port: int = 0) -> None:
        """`port`: the one to listen on; 0: the one remembered in the data directory if free, else any free one."""
        self.data_dir = Path(data_dir).expanduser().resolve()
        self.requested_port = port
        self.pgdata = self.data_dir / "pgdata"
        self.lock = DataDirLock(self.data_dir, str(data_dir))
        self.bindir = find_bindir()
        self.port = 0
        self.launched = False  # `pg_ctl start` was run by this object
        self._run_as: str | None = None
        if os.geteuid() == 0:
            self._run_as = self._ensure_service_user()

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def start(self) -> str:
        """Lock the data directory, create the cluster if needed and start it; returns the DSN.

        Raises DataDirInUse, touching nothing, when another fastcount holds the directory. A server running there
        without a holder (left by a fastcount that was killed) is reused.
        """
        try:
            self.data_dir.mkdir(parents=True, exist_ok=True)
            self.lock.acquire()
        except OSError as error:
            raise EmbeddedPostgresError(f"cannot use data directory {self.lock.shown_as}: {error.strerror}") from None
        try:
            return self._start_locked()
        except BaseException:
            try:
                self._stop_interrupted_start()
            finally:
                self.lock.release()
            raise

    def _start_locked(self) -> str:
        running_port = self._running_port()
        if running_port:
            self.port = running_port
            log.info("event=embedded_postgres_reused data_dir=%s dsn=%s", self.pgdata, self.dsn)
            if self.requested_port and self.requested_port != running_port:
                log.warning(
                    "event=embedded_port_ignored requested=%d running=%d reason='a PostgreSQL left running in the"
                    " data directory is reused on its port; stop fastcount, then pg_ctl -D %s stop, to move it'",
                    self.requested_port, running_port, self.pgdata,
                )  # fmt: skip
            return self.dsn
        self.port = self._choose_port()  # before initdb: a port taken by another program fails without side effects
        if not (self.pgdata / "PG_VERSION").exists():
            self._initdb()
        (self.data_dir / PORT_FILE).write_text(str(self.port))
        options = f"-p {self.port} -c listen_addresses=127.0.0.1 -c unix_socket_directories=''"
        # A session of its own: a Ctrl-C for fastcount must not also shut PostgreSQL down under the final flush.
        self.launched = True
        self._pg_ctl(
            "-w", "-t", "60", "-l", str(self.pgdata / "postgres.log"), "-o", options, "start", new_session=True
        )
        log.info("event=embedded_postgres_started data_dir=%s dsn=%s", self.pgdata, self.dsn)
        return self.dsn

    def _stop_interrupted_start(self) -> None:
        """A start that failed or was interrupted (Ctrl-C while `pg_ctl start` waits) may leave a postmaster running
        in its own session, where the interrupt does not reach it: stop it, or nothing would (the lock is released).
        """
        if not self.launched:
            return
        deadline = time.monotonic() + 10  # the postmaster writes its pid file moments after it was forked
        while not (self.pgdata / "postmaster.pid").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        try:
            self._pg_ctl("-w", "-t", "60", "-m", "fast", "stop")
            log.info("event=embedded_postgres_stopped data_dir=%s reason=start_interrupted", self.pgdata)
        except EmbeddedPostgresError:
            pass  # it was not running

    def stop(self) -> None:
        """Stop the server this object started or reused; release the data directory."""
        if self.lock.held:
            if self._running_port():
                self._pg_ctl("-w", "-t", "60", "-m", "fast", "stop")
                log.info("event=embedded_postgres_stopped data_dir=%s", self.pgdata)
            self.lock.release()

    def _choose_port(self) -> int:
        remembered = self.data_dir / PORT_FILE
        if self.port:
            return self.port
        if self.requested_port:
            if not _port_is_free(self.requested_port):
                raise EmbeddedPostgresError(
                    f"--embedded-port {self.requested_port} is in use on 127.0.0.1; give another or 0 (any free port)"
                )
            return self.requested_port
        if remembered.exists():
            port = int(remembered.read_text().strip() or 0)
            if port and _port_is_free(port):
                return port
        return _free_port()

    def _running_port(self) -> int:
        """The port of a live postmaster for this data directory, or 0."""
        pid_file = self.pgdata / "postmaster.pid"
        if not pid_file.exists():
            return 0
        status = subprocess.run(
            self._command("pg_ctl", "-D", str(self.pgdata), "status"), capture_output=True, text=True
        )
        if status.returncode != 0:
            return 0
        lines = pid_file.read_text().splitlines()
        return int(lines[3]) if len(lines) > 3 and lines[3].strip().isdigit() else 0

    def _initdb(self) -> None:
        self.pgdata.mkdir(parents=True, exist_ok=True)
        self._hand_over(self.pgdata)
        log.info("event=embedded_postgres_initdb data_dir=%s", self.pgdata)
        result = subprocess.run(
            self._command(
                "initdb",
                "-D",
                str(self.pgdata),
                "-U",
                "postgres",
                "--auth=trust",
                "--encoding=UTF8",
                "--no-instructions",
            ),
            capture_output=True,
            text=True,
        )
        if result.returncode != 0:
            raise EmbeddedPostgresError(f"initdb failed in {self.pgdata}: {result.stderr.strip()}")

    def _pg_ctl(self, *args: str, new_session: bool = False) -> None:
        # Output goes to files, not pipes: the postmaster inherits pg_ctl's stdout, and a pipe would never close.
        with tempfile.TemporaryFile("w+") as output:
            result = subprocess.run(
                self._command("pg_ctl", "-D", str(self.pgdata), *args),
                stdout=output,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=new_session,
            )
            output.seek(0)
            message = output.read()
        if result.returncode != 0:
            log_file = self.pgdata / "postgres.log"
            tail = log_file.read_text()[-2000:] if log_file.exists() else ""
            raise EmbeddedPostgresError(f"pg_ctl {args[-1]} failed: {message.strip()}\n{tail}")

    def _command(self, program: str, *args: str) -> list[str]:
        command = [str(self.bindir / program), *args]
        if self._run_as:
            return ["runuser", "-u", self._run_as, "--", *command]
        return command

    def _ensure_service_user(self) -> str:
        for name in ("postgres", SERVICE_USER):
            try:
                pwd.getpwnam(name)
                return name
            except KeyError:
                continue
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", SERVICE_USER],
            check=True,
            capture_output=True,
        )
        return SERVICE_USER

    def _hand_over(self, path: Path) -> None:
        """As root, give the cluster directory to the service user and make sure it can reach it."""
        if not self._run_as:
            return
        entry = pwd.getpwnam(self._run_as)
        os.chown(path, entry.pw_uid, entry.pw_gid)
        os.chmod(path, 0o700)
        # The service user must be able to traverse to the data and the binaries: grant search (x, not read) on the
        # parent folders that lack it, as pgserver itself does when run as root.
        for parent in {*path.parents, *self.bindir.parents}:
            mode = os.stat(parent).st_mode
            if not mode & 0o001:
                os.chmod(parent, mode | 0o001)
                log.warning("event=granted_search_permission path=%s for_user=%s", parent, self._run_as)


@contextmanager
def temporary_postgres(prefix: str = "fastcount-", port: int = 0) -> Iterator[EmbeddedPostgres]:
    """A throw-away cluster for tests and benchmarks: started in a new temporary directory (on `port`, else a free
    one), removed after."""
    workdir = Path(tempfile.mkdtemp(prefix=prefix))
    workdir.chmod(0o755)  # as root, PostgreSQL runs as another user, who must reach its data directory
    database = EmbeddedPostgres(workdir / "db")
    database.port = port
    try:
        database.start()
        yield database
    finally:
        database.stop()
        shutil.rmtree(workdir, ignore_errors=True)
