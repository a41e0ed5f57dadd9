"""A throwaway PostgreSQL on loopback, as the shared store's real server: Debian's
`postgresql` binaries, a cluster made by initdb in a temporary folder, run as a non-root
user (PostgreSQL refuses to run as root), on 127.0.0.1:<free port>. Each test gets a
database of its own, made from a template that already has citext (CREATE DATABASE ...
TEMPLATE copies it in a few milliseconds).

The cluster trades durability for speed (fsync off): it is thrown away with the run.
"""

from __future__ import annotations

import glob
import itertools
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from smtp_server import free_port

USER = "newsletter"  # the role the tests connect as (a password: the store must take it from the environment)
PASSWORD = "pg-test-password"


def bin_dir() -> Path | None:
    for found in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        if os.path.exists(os.path.join(found, "initdb")):
            return Path(found)
    return None


def _run_as() -> list[str]:
    """The prefix that runs a server command as a user PostgreSQL accepts."""
    if os.geteuid() != 0:
        return []
    for name in ("postgres", "nobody"):
        try:
            pwd.getpwnam(name)
            return ["runuser", "-u", name, "--"]
        except KeyError:
            continue
    raise RuntimeError("no non-root user to run PostgreSQL as")


def installed() -> bool:
    return bin_dir() is not None and bool(shutil.which("runuser") or os.geteuid() != 0)


class PostgresServer:
    """`with PostgresServer() as pg:` pg.url(dbname), pg.new_database() -> url."""

    def __init__(self):
        self.bin = bin_dir()
        self.folder = Path(tempfile.mkdtemp(prefix="newsletter-pg-"))
        self.folder.chmod(0o777)  # the server's user must reach it
        self.data = self.folder / "data"
        self.port = free_port()
        self.prefix = _run_as()
        self.names = itertools.count()
        self.process: subprocess.Popen | None = None

    def _as_server(self, *args: str, **kw) -> subprocess.CompletedProcess:
        return subprocess.run([*self.prefix, *args], capture_output=True, text=True, timeout=120, **kw)

    def __enter__(self) -> "PostgresServer":
        pwfile = self.folder / "pw"
        pwfile.write_text(PASSWORD + "\n")
        pwfile.chmod(0o644)
        made = self._as_server(str(self.bin / "initdb"), "-D", str(self.data), "-U", USER, "-A", "scram-sha-256",
                               f"--pwfile={pwfile}", "-E", "UTF8", "--locale=C.UTF-8", "--no-sync")
        if made.returncode:
            raise RuntimeError(f"initdb failed: {made.stderr}")
        pwfile.unlink()
        log = open(self.folder / "server.log", "w")
        self.process = subprocess.Popen(
            [*self.prefix, str(self.bin / "postgres"), "-D", str(self.data), "-p", str(self.port),
             "-c", "listen_addresses=127.0.0.1", "-c", f"unix_socket_directories={self.folder}",
             "-c", "fsync=off", "-c", "full_page_writes=off", "-c", "max_connections=200"],
            stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while True:
            ready = subprocess.run([str(self.bin / "pg_isready"), "-h", "127.0.0.1", "-p", str(self.port)],
                                   capture_output=True)
            if ready.returncode == 0:
                break
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.__exit__()
                raise RuntimeError(f"postgres did not start: {(self.folder / 'server.log').read_text()[-2000:]}")
            time.sleep(0.1)
        self.sql("postgres", "CREATE DATABASE template_newsletter")
        self.sql("template_newsletter", "CREATE EXTENSION citext")
        return self

    def __exit__(self, *exc) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
        shutil.rmtree(self.folder, ignore_errors=True)

    def url(self, dbname: str) -> str:
        """A URL without the password: the store takes it from PGPASSWORD, as it must."""
        return f"postgresql://{USER}@127.0.0.1:{self.port}/{dbname}"

    def env(self) -> dict[str, str]:
        return {"PGPASSWORD": PASSWORD}

    def sql(self, dbname: str, statement: str) -> None:
        import psycopg
        with psycopg.connect(self.url(dbname), password=PASSWORD, autocommit=True) as conn:
            conn.execute(statement)

    def new_database(self) -> str:
        name = f"t{os.getpid()}_{next(self.names)}"
        self.sql("postgres", f"CREATE DATABASE {name} TEMPLATE template_newsletter")
        return self.url(name)
