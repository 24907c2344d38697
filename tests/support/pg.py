"""A throwaway PostgreSQL cluster for the tests: `initdb` in a temp dir, a server on a free
port (TCP on 127.0.0.1 and a Unix socket in the dir), trust auth for user `eg`, fsync off.

    cluster = PGCluster.start(tmp)          # one per test session (tests/fleet/conftest.py)
    url = cluster.new_database()            # a fresh database per test: tests stay independent
    cluster.sigstop() / .sigcont() / .kill9() / .restart()   # the server misbehaving
    cluster.stop()

Binaries come from PATH or /usr/lib/postgresql/*/bin (`./dev setup` installs them where
missing); `PGCluster.binaries()` is None without them (the fixture then skips, loudly).
PostgreSQL refuses to run as root: as root, the server runs as user `postgres`.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import psycopg

USER = "eg"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PGCluster:
    def __init__(self, bindir: Path, data: Path, port: int) -> None:
        self.bindir, self.data, self.port = bindir, data, port
        self.host = "127.0.0.1"
        self.url = f"postgresql://{USER}@{self.host}:{port}/postgres"
        self._databases = 0

    @staticmethod
    def binaries() -> Path | None:
        """The directory holding initdb, pg_ctl and postgres, or None."""
        found = shutil.which("pg_ctl")
        candidates = ([Path(found).parent] if found else []) + [
            Path(p) for p in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)
        ]
        for d in candidates:
            if all((d / b).exists() for b in ("initdb", "pg_ctl", "postgres")):
                return d
        return None

    @classmethod
    def start(cls, tmp: Path | None = None, *, password: str | None = None) -> PGCluster:
        """A running cluster. With `password`, TCP connections need it (scram-sha-256) and the
        admin connection uses the Unix socket (trust)."""
        bindir = cls.binaries()
        if bindir is None:
            raise FileNotFoundError("PostgreSQL binaries (initdb, pg_ctl, postgres) not found: run ./dev setup")
        # A dir of its own under /tmp, not pytest's (mode 0700, closed to the postgres user);
        # short: the Unix socket's path must fit in 107 bytes.
        base = Path(tempfile.mkdtemp(prefix="eg-pg-", dir=tmp if tmp is not None and len(str(tmp)) < 60 else None))
        base.chmod(0o755)
        data = base / "data"
        data.mkdir(mode=0o700)
        cluster = cls(bindir, data, _free_port())
        cluster.base = base
        cluster._chown()
        auth = ["--auth=trust"]
        if password is not None:
            pwfile = base / "pwfile"
            pwfile.write_text(password + "\n")
            pwfile.chmod(0o644)
            auth = ["--auth-local=trust", "--auth-host=scram-sha-256", f"--pwfile={pwfile}"]
        cluster.password = password
        cluster._run(str(bindir / "initdb"), "-D", str(data), "-U", USER, *auth, "-E", "UTF8", "--no-sync")
        if password is not None:
            pwfile.unlink()
        cluster._pg_ctl_start()
        return cluster

    base: Path
    password: str | None = None

    # --- running as the postgres user when root -------------------------------------------

    def _as_owner(self) -> list[str]:
        return ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []

    def _chown(self) -> None:
        if os.geteuid() == 0:
            pw = pwd.getpwnam("postgres")
            for p in (self.base, self.data):
                os.chown(p, pw.pw_uid, pw.pw_gid)

    def _run(self, *argv: str) -> None:
        subprocess.run([*self._as_owner(), *argv], check=True, capture_output=True, timeout=60)

    def _pg_ctl_start(self) -> None:
        options = f"-p {self.port} -k {self.data} -c listen_addresses={self.host} -c fsync=off -c max_connections=200"
        self._run(
            str(self.bindir / "pg_ctl"),
            "-D",
            str(self.data),
            "-o",
            options,
            "-l",
            str(self.data / "log"),
            "-w",
            "start",
        )

    # --- databases ---------------------------------------------------------------------------

    def admin(self) -> psycopg.Connection:
        if self.password is not None:  # the Unix socket: trust
            return psycopg.connect(
                host=str(self.data), port=self.port, user=USER, dbname="postgres", autocommit=True, connect_timeout=5
            )
        return psycopg.connect(self.url, autocommit=True, connect_timeout=5)

    def new_database(self) -> str:
        """A fresh, empty database; returns its URL (no password: trust auth)."""
        self._databases += 1
        name = f"eg_{self._databases}_{secrets.token_hex(3)}"
        with self.admin() as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return f"postgresql://{USER}@{self.host}:{self.port}/{name}"

    # --- misbehaving -------------------------------------------------------------------------

    @property
    def pid(self) -> int:
        return int((self.data / "postmaster.pid").read_text().split()[0])

    def _children(self) -> list[int]:
        found = []
        for stat in glob.glob("/proc/[0-9]*/stat"):
            with contextlib.suppress(OSError, ValueError, IndexError):
                if int(Path(stat).read_text().split(")")[-1].split()[1]) == self.pid:
                    found.append(int(stat.split("/")[2]))
        return found

    def sigstop(self) -> None:
        """Freeze the server (postmaster and every backend): connections hang, nothing answers."""
        for pid in [self.pid, *self._children()]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSTOP)

    def sigcont(self) -> None:
        pids = [self.pid, *self._children()]
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)

    def kill9(self) -> None:
        """SIGKILL the postmaster and every backend (a crash); `restart()` brings it back."""
        pids = [self.pid, *self._children()]
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(_alive(p) for p in pids):
            time.sleep(0.05)

    def restart(self) -> None:
        """Start the server again (after kill9 or stop), on the same port."""
        with contextlib.suppress(FileNotFoundError):
            if not _alive(self.pid):  # a killed postmaster may linger as a zombie nobody reaps:
                for stale in ("postmaster.pid", f".s.PGSQL.{self.port}.lock", f".s.PGSQL.{self.port}"):
                    (self.data / stale).unlink(missing_ok=True)  # its lock files would stop the restart
        self._pg_ctl_start()

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self.sigcont()
        with contextlib.suppress(Exception):
            self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(self.base, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie still answers kill(0): look at its state
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    return False


def pg_rows(
    url: str, where: str = "TRUE", args: tuple[object, ...] = (), expect: int | None = None, timeout: float = 5.0
) -> list[dict[str, object]]:
    """The audit rows in the PostgreSQL store at `url` matching `where`, by id, waiting
    (bounded) until at least `expect` are there (the proxy's writer commits in batches)."""
    from psycopg.rows import dict_row

    deadline = time.monotonic() + timeout
    while True:
        with psycopg.connect(url, autocommit=True, row_factory=dict_row) as conn:
            rows = conn.execute(f"SELECT * FROM audit WHERE {where} ORDER BY id", args).fetchall()  # type: ignore[arg-type]
        if expect is None or len(rows) >= expect or time.monotonic() > deadline:
            return rows
        time.sleep(0.05)
