"""Postgres and Redis servers of the suite's own, so it can kill and restart them.

The suite never touches the machine's own services: it runs a throwaway Postgres cluster
(``initdb`` in a temporary directory, ``fsync=off``) and a Redis server without persistence,
each on a free port, and removes them at the end. Restarting them is then a real restart:
every connection is cut, new ones are refused for a while, and Redis comes back empty
(every queued, reserved and scheduled message is gone).
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from harness.polling import Deadline, HarnessError, poll
from harness.processes import ManagedProcess, free_port, spawn

POSTGRES_USER = "postgres"  # the OS user that owns the cluster when the suite runs as root


def postgres_bindir() -> Path:
    """Where ``initdb``/``pg_ctl`` are: ``CHAOS_PG_BINDIR``, ``pg_config --bindir``, Debian's
    ``/usr/lib/postgresql/<v>/bin`` (newest), or the PATH."""
    candidates: list[str] = []
    if os.environ.get("CHAOS_PG_BINDIR"):
        candidates.append(os.environ["CHAOS_PG_BINDIR"])
    if shutil.which("pg_config"):
        with contextlib.suppress(OSError, subprocess.CalledProcessError):
            candidates.append(subprocess.check_output(["pg_config", "--bindir"], text=True).strip())
    candidates += sorted(
        glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(p.split("/")[-2]), reverse=True
    )
    initdb = shutil.which("initdb")
    if initdb:
        candidates.append(str(Path(initdb).parent))
    for candidate in candidates:
        if (Path(candidate) / "initdb").exists() and (Path(candidate) / "pg_ctl").exists():
            return Path(candidate)
    raise HarnessError(
        "the chaos suite runs a Postgres server of its own and needs the PostgreSQL server "
        "programs (initdb, pg_ctl): install them (Debian: postgresql) or set CHAOS_PG_BINDIR"
    )


def _as_owner() -> list[str]:
    """Postgres refuses to run as root: run its programs as the ``postgres`` user then."""
    if os.geteuid() != 0:
        return []
    try:
        pwd.getpwnam(POSTGRES_USER)
    except KeyError:
        raise HarnessError(
            "running as root, the suite starts Postgres as the 'postgres' user, which does not "
            "exist here; run it as an ordinary user"
        ) from None
    runuser = shutil.which("runuser") or shutil.which("su")
    if runuser is None or not runuser.endswith("runuser"):
        raise HarnessError("running as root, the suite needs runuser to start Postgres")
    return [runuser, "-u", POSTGRES_USER, "--"]


class PrivatePostgres:
    """A Postgres cluster of the suite's own on 127.0.0.1 (trust auth)."""

    def __init__(self, logs: Path) -> None:
        self.bindir = postgres_bindir()
        self.root = Path(tempfile.mkdtemp(prefix="agentsite-chaos-pg-"))
        self.data = self.root / "data"
        self.log = logs / "postgres.log"
        self.port = free_port()
        self.restarts = 0
        if os.geteuid() == 0:
            shutil.chown(self.root, user=POSTGRES_USER)
        logs.mkdir(parents=True, exist_ok=True)
        self.log.touch()
        if os.geteuid() == 0:
            shutil.chown(self.log, user=POSTGRES_USER)
        try:
            self._run(
                "initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres", "-E", "UTF8",
                "--no-sync",
            )  # fmt: skip
        except BaseException:
            shutil.rmtree(self.root, ignore_errors=True)
            raise

    @property
    def url(self) -> str:
        return f"postgres://postgres@127.0.0.1:{self.port}/agentsite_chaos"

    def _run(self, program: str, *args: str) -> None:
        argv = [*_as_owner(), str(self.bindir / program), *args]
        done = subprocess.run(argv, capture_output=True, text=True, cwd=self.root, check=False)
        if done.returncode != 0:
            raise HarnessError(
                f"{program} failed ({done.returncode}): {done.stderr or done.stdout}"
            )

    def _options(self) -> str:
        return (
            f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off "
            "-c synchronous_commit=off -c full_page_writes=off -c max_connections=300"
        )

    def start(self) -> None:
        self._run(
            "pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", self._options(), "-w",
            "-t", "60", "start",
        )  # fmt: skip

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop")

    def restart(self, down_for: float) -> None:
        """Stop (cutting every connection), stay down ``down_for`` seconds, start again."""
        self.stop("fast")
        time.sleep(down_for)  # the outage itself, not a wait for something to happen
        self.start()
        self.restarts += 1

    def create_database(self) -> None:
        import psycopg

        with psycopg.connect(
            f"postgres://postgres@127.0.0.1:{self.port}/postgres", autocommit=True
        ) as conn:
            conn.execute("CREATE DATABASE agentsite_chaos")

    def remove(self) -> None:
        with contextlib.suppress(HarnessError):
            self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)


class PrivateRedis:
    """A Redis server of the suite's own: no persistence, ``noeviction`` (as the README asks)."""

    def __init__(self, logs: Path, env: dict[str, str]) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise HarnessError("the chaos suite needs redis-server on the PATH")
        self.binary = binary
        self.logs = logs
        self.env = env
        self.port = free_port()
        self.restarts = 0
        self.process: ManagedProcess | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        argv = [
            self.binary,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--maxmemory-policy", "noeviction",
        ]  # fmt: skip
        self.process = spawn(f"redis-{self.restarts}", argv, env=self.env, logs=self.logs)

        def answers() -> bool:
            with socket.socket() as sock:
                sock.settimeout(0.5)
                try:
                    sock.connect(("127.0.0.1", self.port))
                    sock.sendall(b"PING\r\n")
                    return sock.recv(16).startswith(b"+PONG")
                except OSError:
                    return False

        poll(answers, Deadline(20, "the suite's Redis to answer"), alive=self.process.check)

    def kill(self) -> None:
        """SIGKILL: everything it held (queues, unacked and scheduled messages) is gone."""
        if self.process is not None:
            self.process.stop(grace=0, sig=signal.SIGKILL)

    def restart(self, down_for: float) -> None:
        self.kill()
        time.sleep(down_for)  # the outage itself
        self.restarts += 1
        self.start()


class ExistingPostgres:
    """A database of the suite's own on a server it does not manage (and cannot restart):
    dropped and created again. Its name must contain "chaos"."""

    restarts = 0

    def __init__(self, url: str) -> None:
        from urllib.parse import urlsplit

        parts = urlsplit(url)
        self.name = parts.path.lstrip("/")
        if parts.scheme not in ("postgres", "postgresql") or "chaos" not in self.name:
            raise HarnessError(
                f"--database-url must be a postgres:// URL of a database whose name contains "
                f"'chaos' (the suite drops it), not {url!r}"
            )
        self.url = url
        self.maintenance = parts._replace(path="/postgres").geturl()

    def start(self) -> None:
        pass

    def create_database(self) -> None:
        import psycopg
        from psycopg import sql

        with psycopg.connect(self.maintenance, autocommit=True) as conn:
            name = sql.Identifier(self.name)
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(name))
            conn.execute(sql.SQL("CREATE DATABASE {}").format(name))

    def restart(self, down_for: float) -> None:
        raise HarnessError("the suite cannot restart a Postgres it did not start")

    def remove(self) -> None:
        import psycopg
        from psycopg import sql

        with (
            contextlib.suppress(psycopg.Error),
            psycopg.connect(self.maintenance, autocommit=True) as conn,
        ):
            name = sql.Identifier(self.name)
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(name))
