"""A throwaway PostgreSQL server for tests and benchmarks: Debian's `postgresql` binaries,
`initdb` + `pg_ctl` on a temporary folder, a free loopback port, stopped by its PID.

PostgreSQL refuses to run as root, so as root the server runs as the `postgres` system user
(`runuser -u postgres`), owning only its own temporary folder.
"""

from __future__ import annotations

import glob
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from tests.conftest import free_port

PASSWORD = "pg-canary-Secret-7731"  # tests check it never reaches a message or a log


def pg_bin_dir() -> Path | None:
    """The folder holding initdb and pg_ctl: on PATH, or Debian's /usr/lib/postgresql/<version>/bin."""
    found = shutil.which("initdb")
    if found:
        return Path(os.path.realpath(found)).parent
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    return Path(candidates[-1]).parent if candidates else None


def why_unavailable() -> str | None:
    """None when a server can be started here, else the reason (for a skip message)."""
    if pg_bin_dir() is None:
        return "PostgreSQL server binaries (Debian package `postgresql`) are not installed"
    if os.geteuid() == 0 and shutil.which("runuser") is None:
        return "running as root without `runuser` to start PostgreSQL as an unprivileged user"
    if os.geteuid() == 0:
        try:
            import pwd

            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root and there is no `postgres` user to run the server as"
    try:
        import dagster_postgres  # noqa: F401
        import psycopg2  # noqa: F401
    except ImportError as exc:
        return f"dagster-postgres / psycopg2 not installed: {exc}"
    return None


class PostgresServer:
    """initdb on a temp folder, `postgres` on 127.0.0.1:<free port>, user `specdraft` with a password."""

    def __init__(self, user: str = "specdraft", db: str = "dagster"):
        self.bin = pg_bin_dir()
        self.user, self.db = user, db
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="specdraft-pg-"))
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"postgresql://{self.user}:{PASSWORD}@127.0.0.1:{self.port}/{self.db}"

    def _as_owner(self, cmd: list[str]) -> list[str]:
        return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd

    def start(self, timeout_s: float = 30) -> "PostgresServer":
        data = self.dir / "data"
        pwfile = self.dir / "pw"
        pwfile.write_text(PASSWORD + "\n")
        if os.geteuid() == 0:
            shutil.chown(self.dir, "postgres")
            shutil.chown(pwfile, "postgres")
        subprocess.run(self._as_owner([str(self.bin / "initdb"), "-D", str(data), "-U", self.user, "-A", "scram-sha-256",
                                       f"--pwfile={pwfile}", "--no-sync", "-E", "UTF8"]),
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        # The server itself (not pg_ctl) so its PID is ours to stop; a socket dir inside the temp folder.
        self.proc = subprocess.Popen(
            self._as_owner([str(self.bin / "postgres"), "-D", str(data), "-h", "127.0.0.1", "-p", str(self.port),
                            "-k", str(self.dir), "-c", "fsync=off", "-c", "max_connections=200",
                            "-c", "shared_buffers=32MB"]),
            stdout=open(self.dir / "server.log", "w"), stderr=subprocess.STDOUT, start_new_session=True,
        )
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"postgres exited with {self.proc.returncode}: {(self.dir / 'server.log').read_text()[-2000:]}")
            ready = subprocess.run([str(self.bin / "pg_isready"), "-h", "127.0.0.1", "-p", str(self.port)],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            if ready.returncode == 0:
                break
            time.sleep(0.2)
        else:
            raise RuntimeError("postgres did not accept connections within 30 s")
        import psycopg2

        conn = psycopg2.connect(f"postgresql://{self.user}:{PASSWORD}@127.0.0.1:{self.port}/postgres")
        conn.autocommit = True
        conn.cursor().execute(f"CREATE DATABASE {self.db}")
        conn.close()
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            # runuser forwards signals to the server; the server's process group holds its workers.
            os.killpg(self.proc.pid, signal.SIGINT)  # "fast" shutdown: clients cut, the server stops its children
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        shutil.rmtree(self.dir, ignore_errors=True)
