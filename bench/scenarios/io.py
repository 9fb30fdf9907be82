"""I/O-bound scale: many runs submitted at once, each 3 model calls over real HTTP to the fake
server at ``--io-latency-ms`` (two turns that call the calculator, then the answer).

Figures:

- ``seconds``: from the first submit to the last run's ``finished_at`` (all runs final).
- ``model_calls_per_s``: succeeded model steps / ``seconds``.
- ``peak_rss_per_worker_mb`` (the target's figure): the peak VmRSS of one worker process with
  its children, the largest over the workers; ``peak_rss_mb``: the peak of their sum. Sampled
  from /proc every 0.2 s while the runs are in flight.
- ``failed``: runs that did not succeed (target: none).
- ``model_call_ms``, ``overhead_ms``, ``connection_wait_ms``: per step task, the time inside the
  model call, the rest of its wall time, and of that the time getting a pooled database
  connection (see ``engine``).
- ``peak_model_calls_in_flight``: the most model calls open at one moment, across workers (at
  most S; fewer when something else bounds them, e.g. database connections held meanwhile).
- ``baseline.tasks_per_s``: as many ``bench.wait`` tasks as model calls, each blocking
  ``--io-latency-ms`` (``time.sleep``: cooperative under gevent), sent at once to the same
  queue and workers, divided by the time from the first send to the last one's end; measured
  right before the runs and again right after, pooled.
- ``ideal``: the bound set by task slots alone, with S = workers x concurrency slots, L the
  latency and R runs of 3 sequential calls: at most S calls are in flight, so the runs take at
  least ``3 L ceil(R / S)`` seconds (their chains run in waves of S) and at most
  ``3 R / (3 L ceil(R / S))`` calls/s. The wait tasks' bound is ``ceil(3 R / S) L`` seconds.

Targets: model calls/s >= 70% of the wait tasks/s; peak worker RSS <= 400 MB; no run fails.
"""

from __future__ import annotations

import math

from harness.polling import Deadline, HarnessError

from ..procstat import RssSampler
from ..stats import peak_overlap, ratio, summary
from .base import (
    Check,
    Context,
    ScenarioResult,
    cpu_breakdown,
    fmt,
    make_agent,
    pooled_rate,
    progress,
    run_outcomes,
    step_records,
    submit_runs,
    task_baseline,
    wait_runs_final,
)

MODEL = "bench-io"
WARMUP_MODEL = "bench-io-warmup"
CALLS_PER_RUN = 3
TOOL_TURNS = [
    [{"name": "calculator", "arguments": {"expression": "6 * 7"}}],
    [{"name": "calculator", "arguments": {"expression": "(6 * 7) + 1"}}],
]


def run(ctx: Context, result: ScenarioResult) -> None:
    from agents.models import Step

    opts = ctx.opts
    runs = opts.io_runs
    calls = runs * CALLS_PER_RUN
    latency = opts.io_latency_ms / 1000
    slots = opts.total_concurrency
    result.target = ">= 0.7, <= 400 MB, 0 failed"
    ctx.fake.configure(MODEL, tool_calls=TOOL_TURNS, latency_ms=opts.io_latency_ms)
    ctx.fake.configure(WARMUP_MODEL, tool_calls=TOOL_TURNS, latency_ms=0)
    warmup = make_agent(
        "bench-io-warmup", route=f"fake:{WARMUP_MODEL}", grants={"calculator": "allow"}
    )
    agent = make_agent("bench-io", route=f"fake:{MODEL}", grants={"calculator": "allow"})

    progress("io: warm-up (HTTP clients in every worker)")
    submit_runs(warmup, max(4, 2 * opts.workers))
    wait_runs_final(ctx, warmup, Deadline(60, "the io warm-up runs"))

    progress(f"io: baseline, {calls} tasks waiting {opts.io_latency_ms} ms each")
    wait_timeout = 60 + calls * latency / max(1, min(slots, 50))
    before = task_baseline(ctx, "bench.wait", calls, args=[latency], timeout=wait_timeout)

    progress(f"io: {runs} runs x {CALLS_PER_RUN} model calls at {opts.io_latency_ms} ms")
    ctx.probe.clear()
    meter = ctx.cpu_meter()
    with RssSampler(ctx.worker_pids) as rss:
        started, submitted = submit_runs(agent, runs)
        wait_runs_final(
            ctx,
            agent,
            Deadline(120 + calls * latency / max(1, min(slots, 20)), "the io runs to finish"),
        )
    used = meter.stop()
    outcomes = run_outcomes(agent)
    model_calls = Step.objects.filter(
        run__agent=agent, kind=Step.Kind.MODEL, status=Step.Status.SUCCEEDED
    ).count()
    succeeded = Step.objects.filter(run__agent=agent, status=Step.Status.SUCCEEDED).count()
    # The last task's record is pushed after its transaction (and the run's finished_at).
    records = ctx.probe.wait_for(
        succeeded,
        Deadline(30, "the probe records of every step"),
        alive=ctx.alive,
        where=lambda r: bool(r["m"] or r["k"]),
    )
    performed = step_records(records)
    progress(f"io: baseline again, {calls} waiting tasks")
    after = task_baseline(ctx, "bench.wait", calls, args=[latency], timeout=wait_timeout)
    wait_rate = pooled_rate(before, after)
    wait_ideal_seconds = math.ceil(calls / slots) * latency
    result.figures["baseline"] = {
        "tasks_per_s": wait_rate,
        "ideal_seconds": wait_ideal_seconds,
        "ideal_tasks_per_s": calls / wait_ideal_seconds,
        "before": before,
        "after": after,
    }
    seconds = (outcomes["last_finished_at"] or started) - started
    rate = model_calls / seconds if seconds > 0 else None
    ideal_seconds = CALLS_PER_RUN * latency * math.ceil(runs / slots)
    result.figures.update(
        runs=runs,
        latency_ms=opts.io_latency_ms,
        slots=slots,
        outcomes=outcomes,
        failed=outcomes["failed"],
        model_calls=model_calls,
        seconds=seconds,
        submit_seconds=submitted - started,
        model_calls_per_s=rate,
        ratio=ratio(rate, wait_rate),
        peak_rss_mb=rss.peak_mb,
        peak_rss_per_worker_mb=rss.peak_worker_mb,
        rss_samples=rss.samples,
        ideal={
            "formula": "3 L ceil(R / S) seconds; S = workers x concurrency",
            "seconds": ideal_seconds,
            "model_calls_per_s": model_calls / ideal_seconds if model_calls else None,
        },
        model_step_wall_ms=summary([r["w"] for r in performed if r["m"]]),
        model_call_ms=summary([r["x"] for r in performed if r["m"]]),
        overhead_ms=summary([r["w"] - r["x"] for r in performed]),
        connection_wait_ms=summary([r["c"] for r in performed]),
        peak_model_calls_in_flight=peak_overlap(
            [(r["xs"], r["xe"]) for r in performed if r["m"] and r.get("xs")]
        ),
        peak_model_calls_in_flight_per_process={
            str(pid): peak_overlap(
                [(r["xs"], r["xe"]) for r in performed if r["m"] and r["p"] == pid]
            )
            for pid in sorted({r["p"] for r in performed})
        },
        cpu=cpu_breakdown(used, model_calls, "model_call"),
        retried_tasks=sum(1 for r in records if r["st"] == "RETRY"),
        failed_tasks=sum(1 for r in records if r["st"] == "FAILURE"),
    )
    result.measured = (
        f"{fmt(rate)} calls/s, {fmt(seconds)} s, {fmt(rss.peak_worker_mb)} MB/worker, "
        f"{outcomes['failed']} failed"
    )
    result.baseline = f"{fmt(wait_rate)} wait tasks/s (ideal {fmt(calls / wait_ideal_seconds)})"
    if runs < slots:
        ceiling = (calls / ideal_seconds) / (calls / wait_ideal_seconds)
        result.notes.append(
            f"with fewer runs ({runs}) than slots ({slots}) the runs' 3 chained calls bound "
            f"them to {fmt(calls / ideal_seconds)} calls/s, the independent waiting tasks to "
            f"{fmt(calls / wait_ideal_seconds)}/s: the ratio cannot exceed {ceiling:.2f} here"
        )
    result.ratio = ratio(rate, wait_rate)
    result.checks = [
        Check("model calls/s vs waiting tasks/s", result.ratio, ">=", 0.7),
        Check("peak RSS of one worker", rss.peak_worker_mb, "<=", 400, "MB"),
        Check("failed runs", float(outcomes["failed"]), "<=", 0),
    ]
    if outcomes["failed"]:
        raise HarnessError(
            f"{outcomes['failed']} of {runs} io runs did not succeed: {outcomes['errors']}"
        )
