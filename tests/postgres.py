"""A throwaway PostgreSQL server for the test suite.

    with PostgresServer() as pg:        # initdb in a temp dir, pg_ctl start on a free loopback port
        pg.url                          # postgresql+psycopg://postgres@127.0.0.1:PORT/svdserve
        pg.new_database("t1")           # a fresh empty database, returns its URL

The server binaries come from Debian's `postgresql-15` package (`make services` installs it) or from PATH.
PostgreSQL refuses to run as root, so as root initdb and pg_ctl run as the `postgres` system user (created by
the Debian package) through `runuser`, and the temp dir is handed to that user.
"""

from __future__ import annotations

import atexit
import os
import re
import shutil
import socket
import subprocess
import tempfile
import uuid
from pathlib import Path

DEBIAN_PG_ROOT = Path("/usr/lib/postgresql")
PG_PROGRAMS = ("initdb", "pg_ctl", "postgres")
PG_SYSTEM_USER = "postgres"
DATABASE = "svdserve"
START_TIMEOUT_S = 60
_IDENTIFIER = re.compile(r"[a-z_][a-z0-9_]{0,62}")


def _has_programs(d: Path) -> bool:
    return all(os.access(d / p, os.X_OK) for p in PG_PROGRAMS)


def _version_key(d: Path) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", d.name)) or (-1,)


def find_pg_bin() -> Path | None:
    """The directory holding initdb, pg_ctl and postgres: Debian's /usr/lib/postgresql/<highest>/bin first, else
    the directory of `pg_ctl` on PATH; None when neither has all three."""
    if DEBIAN_PG_ROOT.is_dir():
        for version in sorted(DEBIAN_PG_ROOT.iterdir(), key=_version_key, reverse=True):
            if _has_programs(version / "bin"):
                return version / "bin"
    pg_ctl = shutil.which("pg_ctl")
    if pg_ctl and _has_programs(Path(pg_ctl).parent):
        return Path(pg_ctl).parent
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgresError(RuntimeError):
    pass


class PostgresServer:
    """A private PostgreSQL cluster in a temp dir, listening on 127.0.0.1 only, trust auth, fsync off.

    `start()` / `stop()` or a `with` block. After start: `.url` (the `svdserve` database), `.port`, `.datadir`,
    `.log`, and `.new_database(name=None) -> url`.
    """

    def __init__(self, bin_dir: Path | None = None, database: str = DATABASE):
        bin_dir = bin_dir or find_pg_bin()
        if bin_dir is None:
            raise PostgresError("PostgreSQL server binaries (initdb, pg_ctl, postgres) not found")
        self.bin_dir = Path(bin_dir)
        self.database = database
        self.as_root = os.geteuid() == 0
        self.tmp: Path | None = None
        self.port: int | None = None
        self.url: str | None = None

    # ---- paths ----------------------------------------------------------------------------------------------

    @property
    def datadir(self) -> Path:
        return self._tmp / "data"

    @property
    def log(self) -> Path:
        return self._tmp / "postgres.log"

    @property
    def _tmp(self) -> Path:
        if self.tmp is None:
            raise PostgresError("server not started")
        return self.tmp

    def log_tail(self, n: int = 4000) -> str:
        try:
            return self.log.read_text(errors="replace")[-n:]
        except OSError as e:
            return f"(no log: {e})"

    # ---- processes ------------------------------------------------------------------------------------------

    def _run(self, program: str, *args: str, timeout: float = START_TIMEOUT_S + 30) -> str:
        cmd = [str(self.bin_dir / program), *args]
        if self.as_root:
            cmd = ["runuser", "-u", PG_SYSTEM_USER, "--", *cmd]
        # no PG* variables from the caller's environment (PGDATA, PGPORT, ...) may steer the tools
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env["LC_ALL"] = "C"
        try:
            res = subprocess.run(cmd, cwd=self._tmp, env=env, stdin=subprocess.DEVNULL, capture_output=True,
                                 text=True, timeout=timeout)
        except subprocess.TimeoutExpired as e:
            raise PostgresError(f"{' '.join(cmd)} timed out after {timeout:.0f} s\n"
                                f"--- log tail ---\n{self.log_tail()}") from e
        except FileNotFoundError as e:
            raise PostgresError(f"{' '.join(cmd)}: {e}") from e
        if res.returncode != 0:
            raise PostgresError(f"{' '.join(cmd)} exited with {res.returncode}\n{res.stdout}{res.stderr}"
                                f"--- log tail ---\n{self.log_tail()}")
        return res.stdout

    def _make_tmp(self) -> Path:
        tmp = Path(tempfile.mkdtemp(prefix="svdserve-pg-", dir="/tmp"))
        if self.as_root:
            try:
                shutil.chown(tmp, PG_SYSTEM_USER, PG_SYSTEM_USER)
            except LookupError as e:
                shutil.rmtree(tmp, ignore_errors=True)
                raise PostgresError(f"running as root, but there is no '{PG_SYSTEM_USER}' system user to run "
                                    f"PostgreSQL as (Debian's postgresql-15 package creates it)") from e
        return tmp

    def start(self) -> PostgresServer:
        if self.tmp is not None:
            raise PostgresError("server already started")
        self.tmp = self._make_tmp()
        atexit.register(self.stop)  # no orphaned postmaster if the caller never gets to stop()
        try:
            self._run("initdb", "-D", str(self.datadir), "-U", "postgres", "--auth=trust", "-E", "UTF8",
                      "--no-locale", "--no-sync")
            # the free port may be taken between probing and binding: try a few
            for attempt in range(3):
                self.port = _free_port()
                opts = (f"-p {self.port} -k {self._tmp} -c listen_addresses=127.0.0.1 -c fsync=off "
                        f"-c synchronous_commit=off -c full_page_writes=off")
                try:
                    self._run("pg_ctl", "-D", str(self.datadir), "-l", str(self.log), "-o", opts, "-w",
                              "-t", str(START_TIMEOUT_S), "start")
                    break
                except PostgresError:
                    if attempt == 2 or "already in use" not in self.log_tail():
                        raise
            self.url = self.new_database(self.database)
        except BaseException:
            try:
                self.stop()
            except PostgresError:
                pass  # the first error (it carries the log tail) is the one to report
            raise
        return self

    def _connect(self):
        import psycopg

        try:
            return psycopg.connect(host="127.0.0.1", port=self.port, user="postgres", dbname="postgres",
                                   autocommit=True, connect_timeout=10)
        except psycopg.Error as e:
            raise PostgresError(f"cannot connect to the test PostgreSQL on port {self.port}: {e}\n"
                                f"--- log tail ---\n{self.log_tail()}") from e

    def url_for(self, name: str) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{name}"

    def new_database(self, name: str | None = None) -> str:
        """CREATE DATABASE `name` (default: a unique name), empty; returns its SQLAlchemy URL."""
        from psycopg import sql

        name = name or f"t_{uuid.uuid4().hex[:16]}"
        if not _IDENTIFIER.fullmatch(name):
            raise ValueError(f"database name must match {_IDENTIFIER.pattern}: {name!r}")
        with self._connect() as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return self.url_for(name)

    def stop(self) -> None:
        if self.tmp is None:
            return
        try:
            if (self.datadir / "postmaster.pid").exists():
                self._run("pg_ctl", "-D", str(self.datadir), "-m", "immediate", "-w", "-t", "30", "stop",
                          timeout=60)
        finally:
            atexit.unregister(self.stop)
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp = None
            self.url = None

    def __enter__(self) -> PostgresServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
