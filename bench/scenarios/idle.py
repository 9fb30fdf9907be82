"""Idle load: what the workers and beat cost with no run active, with an empty runs table and
with many finished runs in it. Periodic tasks that poll per run would cost more in the second.

Beat runs every periodic task (reconciler, outbox relay, approval expiry) every 2 s
(``AGENTSITE_RECONCILE_INTERVAL=2``, set for beat and workers). Each window lasts
``--idle-seconds``; the first starts once an ``agents.reconcile_runs`` task has been seen to
run and at least 11 s after the previous scenario (Postgres reports an idle backend's
transactions up to 10 s late).

Figures, per window:

- ``xact_per_s``: Postgres transactions per second on the bench database
  (``pg_stat_database.xact_commit + xact_rollback``, delta over the window; the bench's own two
  reads are in both windows alike).
- ``cpu_per_s``: CPU seconds (user + system, from /proc/<pid>/stat, children included) used by
  the workers and beat per second of the window: the fraction of one core they keep busy.
- ``periodic_tasks``: the periodic tasks the workers ran, their wall time and database
  statements (p50), and ``statements_per_s``: every statement the workers' tasks executed,
  counted by the probe (exact, where pg_stat_database flushes its counters with a lag).

The second window follows ``--idle-runs`` finished runs inserted in bulk (then VACUUM ANALYZE,
so autovacuum does not pick that window to run). Target: equal within noise; the ratios
(second / first) are reported, and pass at <= 1.25 or within 0.5 transaction/s and 0.01 CPU-s/s
(these figures are small, and the machine is noisy).
"""

from __future__ import annotations

import time
from typing import Any

from harness.polling import Deadline, HarnessError
from harness.processes import start_beat

from ..datastores import transactions, truncate_runs, vacuum_analyze
from ..procstat import cpu_seconds
from ..stats import ratio, summary
from .base import Check, Context, ScenarioResult, fmt, make_agent, progress

PERIODIC = ("agents.reconcile_runs", "tools.deliver_outbox", "approvals.expire_overdue")
TOLERANCE = 1.25
XACT_SLACK = 0.5
CPU_SLACK = 0.01
BATCH = 1000
STATS_SETTLE_S = 11.0  # PGSTAT_IDLE_INTERVAL (10 s) and a margin


def run(ctx: Context, result: ScenarioResult) -> None:
    from agents.models import Run

    opts = ctx.opts
    result.target = f"<= {TOLERANCE} or noise"
    started = time.monotonic()
    truncate_runs()
    agent = make_agent("bench-idle", route="scripted:bench", grants={}, script=[{"text": "ok"}])
    ctx.probe.clear()
    beat = start_beat(env=ctx.env, logs=ctx.logs, schedule=ctx.scratch / "celerybeat-schedule")
    try:

        def alive() -> None:
            ctx.alive()
            beat.check()

        progress("idle: waiting for beat's first reconciler pass")
        ctx.probe.wait_for(
            1,
            Deadline(60, "beat's first agents.reconcile_runs on a worker"),
            alive=alive,
            where=lambda r: r["n"] == "agents.reconcile_runs",
        )
        roots = [*ctx.worker_pids, beat.pid]
        vacuum_analyze()
        # Postgres flushes an idle backend's pending statistics up to 10 s late: without this
        # pause the first window would count the previous scenario's tail. A wait for a
        # timer of Postgres, not for work.
        progress(f"idle: {STATS_SETTLE_S:g} s for Postgres to flush earlier statistics")
        time.sleep(max(0.0, STATS_SETTLE_S - (time.monotonic() - started)))
        progress(f"idle: {opts.idle_seconds:g} s with an empty runs table")
        empty = _window(ctx, roots, opts.idle_seconds, alive)

        progress(f"idle: inserting {opts.idle_runs} finished runs")
        _insert_finished_runs(agent, opts.idle_runs)
        inserted = Run.objects.filter(agent=agent, status=Run.Status.SUCCEEDED).count()
        if inserted != opts.idle_runs:
            raise HarnessError(f"inserted {inserted} finished runs, not {opts.idle_runs}")
        vacuum_analyze(Run._meta.db_table)
        progress(f"idle: {opts.idle_seconds:g} s with {opts.idle_runs} finished runs")
        full = _window(ctx, roots, opts.idle_seconds, alive)
    finally:
        beat.stop(grace=10)

    xact_ratio = ratio(full["xact_per_s"], empty["xact_per_s"])
    cpu_ratio = ratio(full["cpu_per_s"], empty["cpu_per_s"])
    result.figures.update(
        seconds_per_window=opts.idle_seconds,
        finished_runs=opts.idle_runs,
        empty=empty,
        finished=full,
        xact_ratio=xact_ratio,
        cpu_ratio=cpu_ratio,
    )
    result.measured = (
        f"{fmt(full['xact_per_s'])} xact/s, {fmt(full['cpu_per_s'])} CPU-s/s, "
        f"{opts.idle_runs:,} runs"
    )
    result.baseline = f"{fmt(empty['xact_per_s'])} xact/s, {fmt(empty['cpu_per_s'])} CPU-s/s, empty"
    result.ratio = xact_ratio
    result.checks = [
        _within_noise(
            "DB statements/s of the tasks, full vs empty", full, empty, "statements_per_s", 0.5
        ),
        _within_noise("Postgres xact/s, full vs empty", full, empty, "xact_per_s", XACT_SLACK),
        _within_noise("CPU-s/s, full vs empty", full, empty, "cpu_per_s", CPU_SLACK),
    ]
    if not empty["periodic_tasks"].get("agents.reconcile_runs"):
        raise HarnessError("no reconciler pass ran in the first window: is beat running?")


def _within_noise(
    name: str, full: dict[str, Any], empty: dict[str, Any], key: str, slack: float
) -> Check:
    """Passes at ratio <= TOLERANCE, or when the difference is under ``slack``: a few hundredths
    of almost nothing is noise, whatever its ratio."""
    value = ratio(full[key], empty[key])
    difference = full[key] - empty[key]
    past = value is None or value > TOLERANCE
    noise = f"+{difference:.3g} <= {slack:g}" if past and difference <= slack else ""
    return Check(name, value, "<=", TOLERANCE, noise=noise)


def _window(ctx: Context, roots: list[int], seconds: float, alive: Any) -> dict[str, Any]:
    ctx.probe.clear()
    xacts = transactions(ctx.database)
    cpu = cpu_seconds(roots)
    started = time.monotonic()
    time.sleep(seconds)  # the measurement window itself
    elapsed = time.monotonic() - started
    cpu = cpu_seconds(roots) - cpu
    xacts = transactions(ctx.database) - xacts
    alive()
    records = ctx.probe.records()
    return {
        "seconds": elapsed,
        "transactions": xacts,
        "xact_per_s": xacts / elapsed,
        "cpu_seconds": cpu,
        "cpu_per_s": cpu / elapsed,
        "periodic_tasks": {n: sum(1 for r in records if r["n"] == n) for n in PERIODIC},
        "periodic_wall_ms": {
            n: summary([r["w"] for r in records if r["n"] == n])["p50"] for n in PERIODIC
        },
        "periodic_queries": {
            n: summary([float(r["q"]) for r in records if r["n"] == n])["p50"] for n in PERIODIC
        },
        "statements": sum(r["q"] for r in records),
        "statements_per_s": sum(r["q"] for r in records) / elapsed,
        "other_tasks": sum(1 for r in records if r["n"] not in PERIODIC),
    }


def _insert_finished_runs(agent: Any, count: int) -> None:
    """``count`` succeeded runs, as if they had run long ago (bulk_create, no steps)."""
    from django.utils import timezone

    from agents.models import Run

    now = timezone.now()
    for start in range(0, count, BATCH):
        Run.objects.bulk_create(
            Run(
                agent=agent,
                agent_version=agent.current_version,
                model_route=agent.model_route,
                input=f"finished run {i}",
                status=Run.Status.SUCCEEDED,
                result="ok",
                started_at=now,
                finished_at=now,
            )
            for i in range(start, min(start + BATCH, count))
        )
