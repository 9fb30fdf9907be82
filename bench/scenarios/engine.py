"""Engine overhead: runs of a scripted agent (3 model turns, 2 calculator calls, a model that
answers at once) against plain Celery no-op tasks through the same broker and workers.

Figures:

- ``steps_per_s``: succeeded steps (model + tool) of the measured runs, divided by the time from
  the first submit to the last run's ``finished_at``. Every step is one Celery task, so this is
  the engine's throughput in tasks that do work.
- ``baseline.tasks_per_s``: M = 5 x runs ``bench.noop`` tasks, sent at once to the ``models``
  queue (``acks_late`` like the engine's tasks), divided by the time from the first send to the
  last one's end in a worker; measured right before the runs and again right after, pooled.
- ``overhead_ms``: per task that performed a step, its wall time in the worker (task_prerun to
  task_postrun) minus the time spent inside the model call or the tool function: what the engine
  itself costs per step (database statements, locks, audit, publishing the next task). p50/p95,
  and split by model and tool steps. ``queries_per_step``: database statements per step task;
  ``connection_wait_ms``: its time getting a connection from the process's pool (inside the
  overhead: with more tasks in flight than ``AGENTSITE_DB_POOL_MAX``, tasks queue here).
- ``non_step_tasks``: engine tasks that performed no step (a nudge that found nothing to do).
- ``cpu``: CPU used during each phase by the workers, Postgres, Redis and this harness, and
  per step / per no-op task: with every core busy, CPU per step is what bounds steps/s.
- ``unloaded``: the same overhead measured on a few runs submitted one after another (one task
  in flight at a time). Under load the wall time of a step also holds its wait for the CPU and
  for a pooled database connection (hundreds of greenlets share a core and
  ``AGENTSITE_DB_POOL_MAX`` connections); unloaded, it is the engine's own cost.

Targets: steps/s >= 50% of no-op tasks/s; p95 overhead <= 15 ms.
"""

from __future__ import annotations

import contextlib
from typing import Any

from harness.polling import Deadline, HarnessError

from ..profiling import WorkerProfiler
from ..stats import ratio, summary
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
    send_tasks,
    step_records,
    submit_runs,
    task_baseline,
    wait_runs_final,
)

SCRIPT = [
    {"tool_calls": [{"name": "calculator", "arguments": {"expression": "6 * 7"}}]},
    {"tool_calls": [{"name": "calculator", "arguments": {"expression": "(6 * 7) + 1"}}]},
    {"text": "The answer is {last_tool_result}"},
]
STEPS_PER_RUN = 5  # 3 model turns + 2 tool calls
ENGINE_TASKS = ("agents.advance_run", "tools.execute_tool_call")
UNLOADED_RUNS = 10


def run(ctx: Context, result: ScenarioResult) -> None:
    from agents.models import Step

    opts = ctx.opts
    runs = opts.engine_runs
    tasks = runs * STEPS_PER_RUN
    result.target = ">= 0.5, p95 <= 15 ms"
    warmup = make_agent(
        "bench-engine-warmup", route="scripted:bench", script=SCRIPT, grants={"calculator": "allow"}
    )
    agent = make_agent(
        "bench-engine", route="scripted:bench", script=SCRIPT, grants={"calculator": "allow"}
    )

    progress("engine: warm-up (imports and connections in every worker)")
    submit_runs(warmup, max(4, 2 * opts.workers))
    wait_runs_final(ctx, warmup, Deadline(60, "the engine warm-up runs"))
    ctx.probe.clear()
    send_tasks(ctx.app, "bench.noop", min(tasks, 200))
    ctx.probe.wait_for(min(tasks, 200), Deadline(60, "the warm-up no-op tasks"), alive=ctx.alive)

    progress(f"engine: baseline, {tasks} no-op tasks")
    before = task_baseline(ctx, "bench.noop", tasks, timeout=60 + tasks * 0.05)

    progress(f"engine: {runs} runs x {STEPS_PER_RUN} steps")
    ctx.probe.clear()
    profiler = WorkerProfiler.maybe(ctx, "engine")
    xacts_before = _transactions(ctx)
    meter = ctx.cpu_meter()
    try:
        started, submitted = submit_runs(agent, runs)
        wait_runs_final(ctx, agent, Deadline(60 + runs * 1.0, "the engine runs to finish"))
    except BaseException:
        if profiler is not None:
            with contextlib.suppress(Exception):  # not left sampling in later scenarios
                profiler.stop()
        raise
    used = meter.stop()
    xacts = _transactions(ctx) - xacts_before
    outcomes = result.figures["outcomes"] = run_outcomes(agent)
    if outcomes["failed"]:
        raise HarnessError(
            f"{outcomes['failed']} of {runs} runs did not succeed: {outcomes['errors']}"
        )
    steps = Step.objects.filter(run__agent=agent, status=Step.Status.SUCCEEDED).count()
    # The last task's record is pushed after its transaction (and the run's finished_at).
    records = ctx.probe.wait_for(
        steps, Deadline(30, "the probe records of every step"), alive=ctx.alive, where=_is_step
    )
    if profiler is not None:
        result.figures["profiles"] = profiler.stop()
    seconds = outcomes["last_finished_at"] - started
    steps_rate = steps / seconds

    performed = step_records(records)
    overhead = [r["w"] - r["x"] for r in performed]
    idle = [r for r in records if r["n"] in ENGINE_TASKS and not (r["m"] or r["k"])]
    p95 = summary(overhead)["p95"]
    progress(f"engine: baseline again, {tasks} no-op tasks")
    after = task_baseline(ctx, "bench.noop", tasks, timeout=60 + tasks * 0.05)
    noop_rate = pooled_rate(before, after)
    result.figures["baseline"] = {"tasks_per_s": noop_rate, "before": before, "after": after}
    unloaded = _unloaded(ctx, runs)
    result.figures.update(
        runs=runs,
        steps=steps,
        expected_steps=runs * STEPS_PER_RUN,
        seconds=seconds,
        submit_seconds=submitted - started,
        steps_per_s=steps_rate,
        ratio=ratio(steps_rate, noop_rate),
        overhead_ms=summary(overhead),
        overhead_model_ms=summary([r["w"] - r["x"] for r in performed if r["m"]]),
        overhead_tool_ms=summary([r["w"] - r["x"] for r in performed if r["k"]]),
        wall_ms=summary([r["w"] for r in performed]),
        external_ms=summary([r["x"] for r in performed]),
        queries_per_step=summary([float(r["q"]) for r in performed]),
        connection_wait_ms=summary([r["c"] for r in performed]),
        queries_model_step=summary([float(r["q"]) for r in performed if r["m"]]),
        queries_tool_step=summary([float(r["q"]) for r in performed if r["k"]]),
        non_step_tasks={
            "count": len(idle),
            "wall_ms": summary([r["w"] for r in idle]),
            "by_task": {n: sum(1 for r in idle if r["n"] == n) for n in ENGINE_TASKS},
        },
        postgres_transactions_per_step=xacts / steps if steps else None,
        task_states=_states(records),
        cpu=cpu_breakdown(used, steps, "step"),
        unloaded=unloaded,
    )
    unloaded_p95 = unloaded["overhead_ms"]["p95"]
    result.measured = (
        f"{fmt(steps_rate)} steps/s, p95 overhead {fmt(unloaded_p95)} ms ({fmt(p95)} saturated)"
    )
    result.baseline = f"{fmt(noop_rate)} no-op tasks/s"
    result.ratio = ratio(steps_rate, noop_rate)
    result.checks = [
        Check("steps/s vs no-op tasks/s", result.ratio, ">=", 0.5),
        # The engine's own cost per step, on runs submitted one at a time: with hundreds of
        # steps at once, a step's wall time is mostly waiting for the CPU and a connection
        # (reported above as "saturated", and in latest.json).
        Check("p95 overhead per step (unloaded)", unloaded_p95, "<=", 15, "ms"),
    ]
    if steps != runs * STEPS_PER_RUN:
        raise HarnessError(f"the runs made {steps} steps, not {runs * STEPS_PER_RUN}")


def _unloaded(ctx: Context, runs: int) -> dict[str, Any]:
    """Per-step overhead with one task in flight: runs submitted one after another."""
    agent = make_agent(
        "bench-engine-unloaded",
        route="scripted:bench",
        script=SCRIPT,
        grants={"calculator": "allow"},
    )
    count = min(UNLOADED_RUNS, runs)
    progress(f"engine: {count} runs one at a time (overhead without load)")
    ctx.probe.clear()
    for _ in range(count):
        submit_runs(agent, 1)
        wait_runs_final(ctx, agent, Deadline(30, "an unloaded engine run"))
    records = ctx.probe.wait_for(
        count * STEPS_PER_RUN,
        Deadline(30, "the unloaded probe records"),
        alive=ctx.alive,
        where=_is_step,
    )
    performed = step_records(records)
    return {
        "runs": count,
        "overhead_ms": summary([r["w"] - r["x"] for r in performed]),
        "overhead_model_ms": summary([r["w"] - r["x"] for r in performed if r["m"]]),
        "overhead_tool_ms": summary([r["w"] - r["x"] for r in performed if r["k"]]),
    }


def _is_step(record: dict[str, Any]) -> bool:
    return bool(record["m"] or record["k"])


def _states(records: list[dict[str, Any]]) -> dict[str, int]:
    states: dict[str, int] = {}
    for r in records:
        key = f"{r['n']}:{r['st']}"
        states[key] = states.get(key, 0) + 1
    return states


def _transactions(ctx: Context) -> int:
    from ..datastores import transactions

    return transactions(ctx.database)
