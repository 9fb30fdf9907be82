"""What every scenario shares: its result, the running processes, the probe's records, and
building agents and runs in the bench database."""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from harness.polling import Deadline, poll
from harness.processes import FakeServer, Worker, check_all

from ..options import Options
from ..probe import PROBE_KEY
from ..procstat import CpuMeter, RssSampler
from ..stats import summary

STARTED = time.monotonic()


def progress(message: str) -> None:
    """One line on stderr, so the table on stdout stays clean."""
    print(f"[{time.monotonic() - STARTED:7.1f}s] {message}", file=sys.stderr, flush=True)


@dataclass
class Check:
    """One target: ``value`` ``op`` ``limit`` (op is ">=" or "<="). ``noise`` names why a
    value past the limit still passes (a difference too small to mean anything), if it does."""

    name: str
    value: float | None
    op: str
    limit: float
    unit: str = ""
    noise: str = ""

    @property
    def passed(self) -> bool | None:
        if self.noise:
            return True
        if self.value is None:
            return None
        return self.value >= self.limit if self.op == ">=" else self.value <= self.limit

    def describe(self) -> str:
        value = "n/a" if self.value is None else f"{self.value:.3g}"
        unit = f" {self.unit}" if self.unit else ""
        verdict = {True: "PASS", False: "MISS", None: "n/a"}[self.passed]
        noise = f", within noise: {self.noise}" if self.noise else ""
        return (
            f"{self.name}: {value}{unit} (target {self.op} {self.limit:g}{unit}{noise}) {verdict}"
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "value": self.value,
            "op": self.op,
            "limit": self.limit,
            "unit": self.unit,
            "noise": self.noise,
            "passed": self.passed,
        }


@dataclass
class ScenarioResult:
    """A scenario's row in the table (``measured``, ``baseline``, ``ratio``, ``target``), its
    targets (``checks``) and every raw figure (``figures``, into latest.json). ``error`` says
    why the bench broke in this scenario (figures measured so far are kept)."""

    name: str
    measured: str = ""
    baseline: str = ""
    ratio: float | None = None
    target: str = ""
    checks: list[Check] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    error: str | None = None
    seconds: float = 0.0

    @property
    def verdict(self) -> str:
        if self.error:
            return "BROKEN"
        outcomes = [c.passed for c in self.checks]
        if not outcomes:
            return "-"
        if any(o is False for o in outcomes):
            return "MISS"
        return "PASS" if all(outcomes) else "n/a"

    def as_dict(self) -> dict[str, Any]:
        return {
            "verdict": self.verdict,
            "measured": self.measured,
            "baseline": self.baseline,
            "ratio": self.ratio,
            "target": self.target,
            "checks": [c.as_dict() for c in self.checks],
            "figures": self.figures,
            "notes": self.notes,
            "error": self.error,
            "seconds": round(self.seconds, 1),
        }


@dataclass
class Context:
    """The running bench: its options, processes and the Celery app of this process."""

    opts: Options
    app: Any
    env: dict[str, str]
    logs: Path
    scratch: Path
    fake: FakeServer
    probe: Probe
    database: str
    workers: list[Worker] = field(default_factory=list)

    def alive(self) -> None:
        """HarnessError if a worker or the fake server has died."""
        check_all([w.process for w in self.workers] + [self.fake.process])

    @property
    def worker_pids(self) -> list[int]:
        return [w.process.pid for w in self.workers]

    def cpu_meter(self) -> CpuMeter:
        """A started meter of the CPU used by the workers, the fake server, this harness,
        Postgres and Redis (see ``cpu_breakdown``)."""
        return CpuMeter(
            trees={"workers": self.worker_pids, "fake_server": [self.fake.process.pid]},
            pids={"harness": os.getpid()},
            commands={"postgres": "postgres", "redis": "redis-server"},
        ).start()


def cpu_breakdown(used: dict[str, float], per: int, unit: str) -> dict[str, Any]:
    """CPU seconds per group over a phase, and milliseconds of each per ``unit`` (e.g. per
    step): on a 2-core machine, what a step costs in CPU bounds the steps per second."""
    groups = {k: v for k, v in used.items() if k not in ("seconds", "machine_busy")}
    return {
        "seconds": used["seconds"],
        "machine_busy": used["machine_busy"],
        "cpu_seconds": groups,
        f"cpu_ms_per_{unit}": {k: v * 1000 / per for k, v in groups.items()} if per else {},
    }


class Probe:
    """The records ``bench.probe`` pushes from the workers, one per task (see its docstring)."""

    def __init__(self, redis_url: str) -> None:
        import redis

        # Any: redis-py's stubs type every answer as "Awaitable or value".
        self.redis: Any = redis.Redis.from_url(redis_url)

    def clear(self) -> None:
        self.redis.delete(PROBE_KEY)

    def records(self) -> list[dict[str, Any]]:
        return [json.loads(raw) for raw in self.redis.lrange(PROBE_KEY, 0, -1)]

    def wait_for(
        self,
        count: int,
        deadline: Deadline,
        *,
        alive: Callable[[], None],
        where: Callable[[dict[str, Any]], bool] = lambda r: True,
    ) -> list[dict[str, Any]]:
        """All records, once at least ``count`` of them satisfy ``where``."""

        def enough() -> list[dict[str, Any]] | None:
            if self.redis.llen(PROBE_KEY) < count:
                return None
            records = self.records()
            return records if sum(1 for r in records if where(r)) >= count else None

        return poll(enough, deadline, interval=0.05, alive=alive)


# --- Agents and runs --------------------------------------------------------------------------


def make_agent(slug: str, *, route: str, grants: Any, script: list[Any] | None = None) -> Any:
    """An agent published in the bench database, as tests/conftest.py ``make_agent`` does."""
    from agents.models import Agent
    from agents.services import save_agent

    agent = Agent(slug=slug, name=slug, model_route=route, script=script or [], max_steps=20)
    return save_agent(agent=agent, grants=grants)


def submit_runs(agent: Any, count: int, *, owner: Any = None) -> tuple[float, float]:
    """Submit ``count`` runs one after another through ``agents.services.submit_run`` (the
    API's code path minus HTTP). Returns (unix time of the first submit, of the last return)."""
    from agents.services import submit_run

    started = time.time()
    for i in range(count):
        submit_run(agent=agent, input=f"bench input {i}", owner=owner)
    return started, time.time()


def wait_runs_final(ctx: Context, agent: Any, deadline: Deadline) -> None:
    """Until none of ``agent``'s runs is queued, running or waiting for a reviewer."""
    from agents.models import Run

    poll(
        lambda: not Run.objects.filter(agent=agent, status__in=Run.ACTIVE_STATUSES).exists(),
        deadline,
        interval=0.1,
        alive=ctx.alive,
    )


def run_outcomes(agent: Any) -> dict[str, Any]:
    """How ``agent``'s runs ended, and the first errors of those that failed."""
    from django.db.models import Count, Max

    from agents.models import Run

    runs = Run.objects.filter(agent=agent)
    statuses = dict(runs.values_list("status").annotate(n=Count("id")).values_list("status", "n"))
    errors = list(runs.exclude(status=Run.Status.SUCCEEDED).values_list("error_code", "error")[:5])
    last: datetime | None = runs.aggregate(last=Max("finished_at"))["last"]
    return {
        "statuses": statuses,
        "failed": sum(n for s, n in statuses.items() if s != Run.Status.SUCCEEDED),
        "errors": [f"{code}: {message}" for code, message in errors],
        "last_finished_at": last.timestamp() if last else None,
    }


def send_tasks(app: Any, name: str, count: int, *, args: list[Any] | None = None) -> float:
    """Publish ``count`` tasks ``name`` to the ``models`` queue as fast as this process can;
    returns the unix time before the first."""
    started = time.time()
    with app.producer_or_acquire() as producer:
        for _ in range(count):
            app.send_task(name, args=args or [], queue="models", producer=producer)
    return started


def task_baseline(
    ctx: Context, name: str, count: int, *, args: list[Any] | None = None, timeout: float = 60
) -> dict[str, Any]:
    """Send ``count`` tasks ``name`` at once and time them to the last one's end in a worker:
    ``tasks_per_s`` = count / (last end - first send). Also their wall time, the CPU used
    meanwhile and the workers' peak RSS."""
    ctx.probe.clear()
    meter = ctx.cpu_meter()
    with RssSampler(ctx.worker_pids) as rss:
        sent = send_tasks(ctx.app, name, count, args=args)
        records = ctx.probe.wait_for(
            count,
            Deadline(timeout, f"{count} {name} tasks"),
            alive=ctx.alive,
            where=lambda r: r["n"] == name,  # a stray task's record must not end the wait
        )
    records = [r for r in records if r["n"] == name]
    seconds = max(r["e"] for r in records) - sent
    return {
        "tasks": count,
        "seconds": seconds,
        "tasks_per_s": count / seconds,
        "wall_ms": summary([r["w"] for r in records]),
        "peak_rss_mb": rss.peak_mb,
        "cpu": cpu_breakdown(meter.stop(), count, "task"),
    }


def pooled_rate(*baselines: dict[str, Any]) -> float:
    """Tasks per second over several baseline passes taken together (before and after the
    scenario: a drift of the machine's speed in between is averaged out)."""
    return sum(b["tasks"] for b in baselines) / sum(b["seconds"] for b in baselines)


def step_records(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The records of tasks that performed a step: a model call or a tool call."""
    return [r for r in records if r["m"] or r["k"]]


def fmt(value: float | None, digits: int = 3) -> str:
    """A figure for the table: 3 significant digits, thousands separated."""
    if value is None:
        return "n/a"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.{digits}g}"
