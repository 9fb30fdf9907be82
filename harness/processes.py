"""Starting the project's real processes (the fake model server, Celery workers and beat, the
API), for the tests, the bench and the chaos suite alike.

Every process gets its own session (so its whole process group can be signalled), its output
in ``<logs>/<name>.log``, and is stopped at the end: by ``stop_all`` in the caller's
``finally``, and by ``atexit`` if anything slips past that. Readiness is polled with a deadline
(a Celery ping, an HTTP answer), never assumed after a sleep.
"""

from __future__ import annotations

import atexit
import contextlib
import http.client
import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlsplit

from .polling import Deadline, HarnessError, poll

ROOT = Path(__file__).resolve().parent.parent
# Every queue the project declares (CELERY_TASK_QUEUES), as -Q takes them.
QUEUES = "models,tools,maintenance,default"


class ManagedProcess:
    """A process the harness started, in its own session; ``stop`` signals its whole group."""

    def __init__(self, name: str, popen: subprocess.Popen[bytes], log: Path) -> None:
        self.name = name
        self.popen = popen
        self.log = log

    @property
    def pid(self) -> int:
        return self.popen.pid

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def check(self) -> None:
        """Raise HarnessError if the process has exited."""
        code = self.popen.poll()
        if code is not None:
            raise HarnessError(
                f"{self.name} exited with code {code} (log {self.log}):\n{self.log_tail()}"
            )

    def send(self, sig: int) -> None:
        """Send ``sig`` to the process group, if the process is still running."""
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, sig)

    def reap(self, deadline: float) -> None:
        """Wait for the process until ``deadline`` (monotonic), then SIGKILL what is left of
        its group (children that outlived it too)."""
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=max(0.0, deadline - time.monotonic()))
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=5)
        if self in _live:
            _live.remove(self)

    def stop(self, *, grace: float = 15.0, sig: int = signal.SIGTERM) -> None:
        """``sig`` to the process group, SIGKILL to what is left after ``grace`` seconds."""
        self.send(sig)
        self.reap(time.monotonic() + grace)


_live: list[ManagedProcess] = []


def stop_process(process: subprocess.Popen[bytes], *, grace: float) -> None:
    """SIGTERM to the process alone (a warm shutdown: a Celery worker stops its own pool),
    then SIGKILL to its process group if it is still there after ``grace`` seconds."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def stop_all(grace: float = 15.0) -> None:
    """Stop every process still running: SIGTERM to all at once (a warm shutdown), then
    SIGKILL to whatever is left after ``grace`` seconds. Ctrl-C is ignored meanwhile, so a
    second one cannot leave processes behind."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        processes = list(reversed(_live))
        for process in processes:
            process.send(signal.SIGTERM)
        deadline = time.monotonic() + grace
        for process in processes:
            process.reap(deadline)
    finally:
        signal.signal(signal.SIGINT, previous)


atexit.register(stop_all)


def spawn(
    name: str,
    argv: list[str],
    *,
    env: dict[str, str],
    logs: Path,
    capture_stdout: bool = False,
) -> ManagedProcess:
    """Start ``argv`` in its own session with its output in ``logs/<name>.log`` (stdout piped
    to us instead when ``capture_stdout``)."""
    logs.mkdir(parents=True, exist_ok=True)
    log = logs / f"{name}.log"
    with log.open("wb") as out:
        popen = subprocess.Popen(
            argv,
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE if capture_stdout else out,
            stderr=out,
            start_new_session=True,
        )
    process = ManagedProcess(name, popen, log)
    _live.append(process)
    return process


def _http(method: str, url: str, body: Any = None, *, timeout: float = 5.0) -> tuple[int, Any]:
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=timeout)
    try:
        payload = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": "application/json"} if payload is not None else {}
        conn.request(method, parts.path or "/", body=payload, headers=headers)
        response = conn.getresponse()
        data = response.read()
        try:
            return response.status, json.loads(data) if data else None
        except ValueError:
            return response.status, data.decode(errors="replace")
    finally:
        conn.close()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --- The fake model server ----------------------------------------------------------------------


@dataclass
class FakeServer:
    """The project's fake OpenAI-compatible server, as its own process."""

    process: ManagedProcess
    base_url: str  # http://127.0.0.1:<port>/v1, what AGENTSITE_PROVIDER_FAKE_BASE_URL names

    @property
    def root(self) -> str:
        return self.base_url.removesuffix("/v1")

    def configure(self, model: str | None = None, **behaviour: Any) -> None:
        """``POST /_fake/config``: behaviour server-wide, or for ``model`` (e.g. its latency and
        its scripted tool-call turns)."""
        status, answer = _http("POST", f"{self.root}/_fake/config", {"model": model, **behaviour})
        if status != 200:
            raise HarnessError(f"the fake server refused its configuration: {status} {answer}")


def start_fake_server(*, env: dict[str, str], logs: Path) -> FakeServer:
    """``python -m harness.fake_server --port 0``: it prints its base URL once bound."""
    process = spawn(
        "fake-server",
        [sys.executable, "-m", "harness.fake_server", "--port", "0"],
        env=env,
        logs=logs,
        capture_stdout=True,
    )
    assert process.popen.stdout is not None
    line = _read_line(process.popen.stdout, Deadline(30, "the fake model server's base URL"))
    if not line.startswith("http://"):
        process.check()
        raise HarnessError(f"the fake model server printed {line!r}, not its base URL")
    server = FakeServer(process, line.strip())
    poll(
        lambda: _http("GET", f"{server.root}/_fake/config")[0] == 200,
        Deadline(15, "the fake model server to answer"),
        alive=process.check,
    )
    return server


def _read_line(stream: IO[bytes], deadline: Deadline) -> str:
    buffer = b""
    fd = stream.fileno()
    while not buffer.endswith(b"\n"):
        ready, _, _ = select.select([fd], [], [], min(0.5, deadline.remaining()))
        if ready:
            chunk = os.read(fd, 4096)
            if not chunk:
                break
            buffer += chunk
        deadline.check()
    return buffer.decode(errors="replace").strip()


# --- Celery workers and beat --------------------------------------------------------------------


def worker_argv(
    nodename: str,
    *,
    pool: str = "gevent",
    concurrency: int = 100,
    queues: str | None = QUEUES,
    loglevel: str = "WARNING",
    include: tuple[str, ...] = (),
) -> list[str]:
    """``celery worker`` as deployed (Procfile, docker-compose.yml): 2 reserved messages per
    greenlet, 1 per prefork child; no gossip or mingle. ``queues=None``: no -Q, every queue
    the project declares."""
    argv = [
        sys.executable, "-m", "celery", "-A", "agentsite", "worker",
        "-P", pool, "--concurrency", str(concurrency),
        "--prefetch-multiplier", "1" if pool == "prefork" else "2",
        "-n", nodename, "--without-gossip", "--without-mingle", "--loglevel", loglevel,
    ]  # fmt: skip
    if queues is not None:
        argv += ["-Q", queues]
    for module in include:
        argv += ["--include", module]
    return argv


@dataclass
class Worker:
    """One ``celery worker`` process (and its pool's children, under prefork)."""

    index: int
    nodename: str  # what Celery's remote control addresses: <name>-<i>@<host>
    process: ManagedProcess


def start_workers(
    count: int, *, name: str, env: dict[str, str], logs: Path, **options: Any
) -> list[Worker]:
    """``count`` workers named ``<name>-<i>@<host>``, ``options`` as ``worker_argv`` takes them."""
    host = socket.gethostname()
    return [
        Worker(
            index,
            f"{name}-{index}@{host}",
            spawn(
                f"worker-{index}", worker_argv(f"{name}-{index}@%h", **options), env=env, logs=logs
            ),
        )
        for index in range(1, count + 1)
    ]


def wait_workers_ready(
    app: Any,
    nodenames: list[str],
    deadline: Deadline,
    *,
    alive: Callable[[], None] | None = None,
    interval: float = 0.1,
) -> None:
    """Until every worker answers a Celery ping (``alive`` raising breaks the wait)."""
    waiting = set(nodenames)

    def answered() -> bool:
        replies = app.control.ping(destination=sorted(waiting), timeout=0.5) or []
        for reply in replies:
            waiting.difference_update(reply)
        return not waiting

    poll(answered, deadline, interval=interval, alive=alive)


def check_all(processes: Iterable[ManagedProcess]) -> None:
    """HarnessError if one of ``processes`` has exited."""
    for process in processes:
        process.check()


def start_beat(*, env: dict[str, str], logs: Path, schedule: Path) -> ManagedProcess:
    """``celery beat`` with its schedule file in the bench's scratch directory."""
    schedule.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        schedule.unlink()
    argv = [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "agentsite",
        "beat",
        "--schedule",
        str(schedule),
        "--loglevel",
        "WARNING",
    ]
    return spawn("beat", argv, env=env, logs=logs)


# --- The API server ---------------------------------------------------------------------------


@dataclass
class ApiServer:
    """gunicorn with uvicorn workers, as the README deploys the API."""

    process: ManagedProcess
    host: str
    port: int

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"


def start_api(*, workers: int, env: dict[str, str], logs: Path, interval: float = 0.1) -> ApiServer:
    """gunicorn on a free local port with ``workers`` uvicorn workers, answering /healthz."""
    port = free_port()
    argv = [
        sys.executable, "-m", "gunicorn", "agentsite.asgi:application",
        "--worker-class", "uvicorn_worker.UvicornWorker", "--workers", str(workers),
        "--bind", f"127.0.0.1:{port}", "--log-level", "warning", "--graceful-timeout", "5",
        # As deployed: metrics in multiprocess mode (gunicorn reads this file from its working
        # directory by default; named here so that it does not depend on it).
        "--config", "gunicorn.conf.py",
    ]  # fmt: skip
    server = ApiServer(spawn("gunicorn", argv, env=env, logs=logs), "127.0.0.1", port)

    def healthy() -> bool:
        try:
            return _http("GET", f"{server.base_url}/healthz", timeout=1)[0] == 200
        except OSError:
            return False

    poll(
        healthy,
        Deadline(60, "gunicorn to answer /healthz"),
        interval=interval,
        alive=server.process.check,
    )
    return server
