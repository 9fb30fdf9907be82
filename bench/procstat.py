"""What /proc says about the processes the bench started: CPU seconds and resident memory."""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


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
