"""Approval round trip: from a reviewer's decision to the held tool step starting on a worker.

K runs of a scripted agent whose calculator grant is ``require_approval`` each stop in
``waiting_approval`` with a pending Approval. Then, one at a time with a short pause, a reviewer
(in the ``reviewers`` group, not the submitter) approves each with
``approvals.services.decide``.

Figures:

- ``decision_to_start_ms``: from just before ``decide`` to the held step's ``started_at`` (set by
  the worker that claims it), read by polling the database every 2 ms. p50/p95.
- ``decide_ms``: how long ``decide`` itself took (its transaction), inside the above.
- ``floor_ms`` (the floor, measured after each decision): a ``bench.noop`` sent to the same
  queue, from the send to the moment it starts in a worker (it pushes its start time to Redis).
  The round trip through Celery that no engine work can beat.
"""

from __future__ import annotations

import time
import uuid
from datetime import datetime
from typing import Any

from harness.polling import Deadline, HarnessError, poll

from ..datastores import KEY_PREFIX
from ..stats import ratio, summary
from .base import (
    Context,
    ScenarioResult,
    fmt,
    make_agent,
    progress,
    run_outcomes,
    submit_runs,
    wait_runs_final,
)

SCRIPT = [
    {"tool_calls": [{"name": "calculator", "arguments": {"expression": "6 * 7"}}]},
    {"text": "Approved and done: {last_tool_result}"},
]
PAUSE_S = 0.05  # between decisions, as a reviewer works: not a wait for work


def run(ctx: Context, result: ScenarioResult) -> None:
    from django.contrib.auth.models import Group, User

    from agents.models import Run, Step
    from approvals.models import Approval
    from approvals.services import can_decide, decide

    count = ctx.opts.approvals
    result.target = "none (a floor)"
    submitter = User.objects.create_user("bench-submitter")
    reviewer = User.objects.create_user("bench-reviewer", is_staff=True)
    reviewer.groups.add(Group.objects.get(name="reviewers"))
    reviewer = User.objects.get(pk=reviewer.pk)  # fresh permission cache
    if not can_decide(reviewer):
        raise HarnessError("the bench reviewer may not decide: is the 'reviewers' group migrated?")
    agent = make_agent(
        "bench-approval",
        route="scripted:bench",
        script=SCRIPT,
        grants={"calculator": "require_approval"},
    )

    progress(f"approval: {count} runs waiting for a reviewer")
    submit_runs(agent, count, owner=submitter)
    pending = Approval.objects.filter(run__agent=agent, status=Approval.Status.PENDING)
    poll(
        lambda: (
            pending.count() >= count
            and not Run.objects.filter(
                agent=agent, status__in=(Run.Status.QUEUED, Run.Status.RUNNING)
            ).exists()
        ),
        Deadline(60 + count * 0.5, "every run to wait for approval"),
        interval=0.1,
        alive=ctx.alive,
    )
    held = list(pending.order_by("created_at").values_list("pk", "run_id", "step_index"))

    progress(f"approval: deciding {count} approvals one by one")
    import redis

    replies = redis.Redis.from_url(ctx.opts.broker_url)
    round_trips: list[float] = []
    decide_ms: list[float] = []
    floor: list[float] = []
    for approval_id, run_id, step_index in held:
        time.sleep(PAUSE_S)
        step = Step.objects.filter(run_id=run_id, index=step_index)
        before = time.time()
        decide(approval_id, decision="approve", user=reviewer)
        decide_ms.append((time.time() - before) * 1000)
        started: datetime = poll(
            lambda step=step: step.values_list("started_at", flat=True).first(),  # type: ignore[misc]
            Deadline(30, f"the approved step of run {run_id} to start"),
            interval=0.002,
            alive=ctx.alive,
        )
        round_trips.append((started.timestamp() - before) * 1000)
        floor.append(_noop_round_trip(ctx, replies))

    wait_runs_final(ctx, agent, Deadline(60 + count * 0.5, "the approved runs to finish"))
    outcomes = run_outcomes(agent)
    trips = summary(round_trips)
    floors = summary(floor)
    result.figures.update(
        approvals=count,
        outcomes=outcomes,
        decision_to_start_ms=trips,
        decide_ms=summary(decide_ms),
        floor_ms=floors,
        pause_s=PAUSE_S,
    )
    result.measured = f"p50 {fmt(trips['p50'])} ms, p95 {fmt(trips['p95'])} ms"
    result.baseline = f"no-op trip p50 {fmt(floors['p50'])} ms"
    result.ratio = ratio(trips["p50"], floors["p50"])
    if outcomes["failed"]:
        raise HarnessError(
            f"{outcomes['failed']} of {count} approved runs did not succeed: {outcomes['errors']}"
        )


def _noop_round_trip(ctx: Context, replies: Any) -> float:
    """Milliseconds from sending ``bench.noop`` to its start in a worker."""
    key = f"{KEY_PREFIX}reply:{uuid.uuid4().hex}"
    sent = time.time()
    ctx.app.send_task("bench.noop", args=[key], queue="models")
    answer = replies.blpop([key], timeout=30)
    if answer is None:
        ctx.alive()
        raise HarnessError("a no-op task did not answer within 30 s")
    return (float(answer[1]) - sent) * 1000
