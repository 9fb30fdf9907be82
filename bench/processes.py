"""The real processes the bench starts, and what /proc says about them.

Every process gets its own session (so its whole process group can be signalled), its output
in ``<results>/logs/<name>.log``, and is stopped at the end: by ``stop_all`` in the harness's
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
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlsplit

from .options import ROOT, Options
from .polling import BenchError, Deadline, poll

QUEUES = "models,tools,maintenance,default"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


class ManagedProcess:
    """A process the bench started, in its own session; ``stop`` signals its whole group."""

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
        """Raise BenchError if the process has exited."""
        code = self.popen.poll()
        if code is not None:
            raise BenchError(
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
            raise BenchError(f"the fake server refused its configuration: {status} {answer}")


def start_fake_server(*, env: dict[str, str], logs: Path) -> FakeServer:
    """``python -m agents.providers.fake_server --port 0``: it prints its base URL once bound."""
    process = spawn(
        "fake-server",
        [sys.executable, "-m", "agents.providers.fake_server", "--port", "0"],
        env=env,
        logs=logs,
        capture_stdout=True,
    )
    assert process.popen.stdout is not None
    line = _read_line(process.popen.stdout, Deadline(30, "the fake model server's base URL"))
    if not line.startswith("http://"):
        process.check()
        raise BenchError(f"the fake model server printed {line!r}, not its base URL")
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


@dataclass
class Worker:
    """One ``celery worker`` process (and its pool's children, under prefork)."""

    index: int
    nodename: str  # what Celery's remote control addresses: bench-<i>@<host>
    process: ManagedProcess


def start_workers(opts: Options, *, env: dict[str, str], logs: Path) -> list[Worker]:
    """``opts.workers`` workers on every queue, with ``bench.probe`` included in each."""
    host = socket.gethostname()
    workers = []
    for index in range(1, opts.workers + 1):
        argv = [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "agentsite",
            "worker",
            "-P",
            opts.pool,
            "-c",
            str(opts.concurrency),
            # As deployed (Procfile, docker-compose.yml): 2 reserved messages per greenlet,
            # 1 per prefork child.
            "--prefetch-multiplier",
            "1" if opts.pool == "prefork" else "2",
            "-Q",
            QUEUES,
            "-n",
            f"bench-{index}@%h",
            "--without-gossip",
            "--without-mingle",
            "--include",
            "bench.probe",
            "--loglevel",
            "WARNING",
        ]
        process = spawn(f"worker-{index}", argv, env=env, logs=logs)
        workers.append(Worker(index, f"bench-{index}@{host}", process))
    return workers


def wait_workers_ready(app: Any, workers: list[Worker], deadline: Deadline) -> None:
    """Until every worker answers a Celery ping (a process that exits breaks the bench)."""
    waiting = {w.nodename for w in workers}

    def answered() -> bool:
        replies = app.control.ping(destination=sorted(waiting), timeout=0.5) or []
        for reply in replies:
            waiting.difference_update(reply)
        return not waiting

    poll(answered, deadline, interval=0.1, alive=lambda: check_all(w.process for w in workers))


def check_all(processes: Any) -> None:
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


def start_api(opts: Options, *, env: dict[str, str], logs: Path) -> ApiServer:
    port = free_port()
    argv = [
        sys.executable,
        "-m",
        "gunicorn",
        "agentsite.asgi:application",
        "--worker-class",
        "uvicorn_worker.UvicornWorker",
        "--workers",
        str(opts.web_workers),
        "--bind",
        f"127.0.0.1:{port}",
        "--log-level",
        "warning",
        "--graceful-timeout",
        "5",
        # As deployed: metrics in multiprocess mode (gunicorn reads this file from its working
        # directory by default; named here so that it does not depend on it).
        "--config",
        "gunicorn.conf.py",
    ]
    server = ApiServer(spawn("gunicorn", argv, env=env, logs=logs), "127.0.0.1", port)

    def healthy() -> bool:
        try:
            return _http("GET", f"{server.base_url}/healthz", timeout=1)[0] == 200
        except OSError:
            return False

    poll(
        healthy,
        Deadline(60, "gunicorn to answer /healthz"),
        interval=0.1,
        alive=server.process.check,
    )
    return server


# --- /proc ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProcStat:
    pid: int
    comm: str
    ppid: int
    ticks: int  # utime + stime + cutime + cstime


def _stat(pid: int) -> ProcStat | None:
    """``pid``'s command, parent and CPU ticks (user + system, itself and its reaped children:
    summing a live tree counts each process once), None if it is gone."""
    try:
        data = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    comm = data[data.find("(") + 1 : data.rfind(")")]
    fields = data[data.rfind(")") + 2 :].split()
    # fields[0] is field 3 of proc(5) (state): ppid is field 4, utime..cstime fields 14-17.
    return ProcStat(pid, comm, int(fields[1]), sum(int(v) for v in fields[11:15]))


def all_processes() -> list[ProcStat]:
    stats = (_stat(int(entry)) for entry in os.listdir("/proc") if entry.isdigit())
    return [s for s in stats if s is not None]


def process_tree(roots: list[int], processes: list[ProcStat] | None = None) -> list[int]:
    """``roots`` and all their live descendants."""
    processes = all_processes() if processes is None else processes
    children: dict[int, list[int]] = {}
    for proc in processes:
        children.setdefault(proc.ppid, []).append(proc.pid)
    alive = {proc.pid for proc in processes}
    tree: list[int] = []
    todo = [pid for pid in roots if pid in alive]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, []))
    return tree


def rss_bytes(pids: list[int]) -> int:
    """Sum of VmRSS (resident memory) of ``pids``."""
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
                    break
        except OSError:
            continue
    return total


def cpu_seconds(roots: list[int]) -> float:
    """CPU seconds (user + system) used so far by ``roots`` and their children."""
    processes = all_processes()
    tree = set(process_tree(roots, processes))
    return sum(p.ticks for p in processes if p.pid in tree) / CLOCK_TICKS


def _machine_ticks() -> tuple[int, int]:
    """(busy, total) CPU ticks of the whole machine since boot, from /proc/stat."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    total = sum(fields[:8])  # guest time is already inside user
    return total - idle, total


class CpuMeter:
    """CPU seconds used between ``start`` and ``stop`` by named groups of processes: process
    trees (``trees``: name -> root pids), single processes (``pids``: name -> pid) and every
    process of a command (``commands``: name -> comm, e.g. all ``postgres`` processes: the whole
    cluster, other databases included), plus how busy the whole machine was
    (``machine_busy``: 0..1 of every core)."""

    def __init__(
        self,
        *,
        trees: dict[str, list[int]],
        pids: dict[str, int] | None = None,
        commands: dict[str, str] | None = None,
    ) -> None:
        self.trees = trees
        self.pids = pids or {}
        self.commands = commands or {}
        self.before: dict[str, float] = {}
        self.machine_before = (0, 0)
        self.started = 0.0

    def _read(self) -> dict[str, float]:
        processes = all_processes()
        seconds: dict[str, float] = {}
        for name, roots in self.trees.items():
            tree = set(process_tree(roots, processes))
            seconds[name] = sum(p.ticks for p in processes if p.pid in tree) / CLOCK_TICKS
        for name, pid in self.pids.items():
            seconds[name] = sum(p.ticks for p in processes if p.pid == pid) / CLOCK_TICKS
        for name, comm in self.commands.items():
            seconds[name] = sum(p.ticks for p in processes if p.comm == comm) / CLOCK_TICKS
        return seconds

    def start(self) -> CpuMeter:
        self.before = self._read()
        self.machine_before = _machine_ticks()
        self.started = time.monotonic()
        return self

    def stop(self) -> dict[str, float]:
        """CPU seconds per group, ``seconds`` elapsed and ``machine_busy``."""
        after = self._read()
        busy, total = _machine_ticks()
        used = {name: after[name] - self.before.get(name, 0.0) for name in after}
        used["seconds"] = time.monotonic() - self.started
        spent = total - self.machine_before[1]
        used["machine_busy"] = (busy - self.machine_before[0]) / spent if spent else 0.0
        return used


@dataclass
class RssSampler:
    """Samples the summed VmRSS of process trees every ``interval`` seconds in a thread; the
    peak is the figure."""

    roots: list[int]
    interval: float = 0.2
    peak_bytes: int = 0
    peak_per_root: dict[int, int] = field(default_factory=dict)
    samples: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> RssSampler:
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._sample()

    def _sample(self) -> None:
        per_root = {root: rss_bytes(process_tree([root])) for root in self.roots}
        self.peak_bytes = max(self.peak_bytes, sum(per_root.values()))
        for root, value in per_root.items():
            self.peak_per_root[root] = max(self.peak_per_root.get(root, 0), value)
        self.samples += 1

    @property
    def peak_worker_mb(self) -> float:
        """The largest peak of one root's tree (one worker with its children)."""
        return max(self.peak_per_root.values(), default=0) / 2**20

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            self._sample()
            self._stop.wait(max(0.0, self.interval - (time.monotonic() - started)))

    @property
    def peak_mb(self) -> float:
        return self.peak_bytes / 2**20
