"""The run timeline on the run's admin page: geometry computed in Python (agents.timeline), drawn
as plain HTML, with approvals between the steps, no script, and everything user-written escaped."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from agents import timeline
from agents.models import Run, Step
from agents.timeline import ApprovalRow, Bar, StepRow, Tick, build_timeline, run_timeline
from approvals.models import Approval

T0 = datetime(2025, 3, 4, 10, 0, 0, tzinfo=UTC)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def overlap(a: Bar | None, b: Bar | None) -> float:
    """How much of the axis (in percent) two bars share."""
    assert a is not None and b is not None
    return min(a.left + a.width, b.left + b.width) - max(a.left, b.left)


# --- unsaved instances for the pure function -------------------------------------------------


def make_run(status: str = Run.Status.SUCCEEDED, *, finished: float | None = 10) -> Run:
    return Run(
        status=status,
        model_route="scripted:demo",
        created_at=T0,
        finished_at=None if finished is None else at(finished),
    )


def make_step(
    index: int,
    kind: str = Step.Kind.TOOL,
    status: str = Step.Status.SUCCEEDED,
    *,
    created: float,
    started: float | None = None,
    finished: float | None = None,
    **fields: Any,
) -> Step:
    return Step(
        index=index,
        kind=kind,
        status=status,
        created_at=at(created),
        started_at=None if started is None else at(started),
        finished_at=None if finished is None else at(finished),
        **fields,
    )


def make_approval(
    step_index: int,
    status: str = Approval.Status.APPROVED,
    *,
    created: float,
    decided: float | None = None,
    **fields: Any,
) -> Approval:
    return Approval(
        step_index=step_index,
        reason=Approval.Reason.TOOL_REQUIRES_APPROVAL,
        status=status,
        proposed_digest="d" * 64,
        created_at=at(created),
        decided_at=None if decided is None else at(decided),
        **fields,
    )


# The run every geometry test draws: 10 s long; a model turn asks for two tool calls that run
# side by side (send_email held for a reviewer for 1 s first), then a last model turn.
SCENARIO: list[dict[str, Any]] = [
    dict(
        index=0,
        kind=Step.Kind.MODEL,
        model_route="scripted:demo",
        created=0,
        started=0.5,
        finished=2,
        latency_ms=1400,
        attempts=1,
        input_tokens=120,
        output_tokens=45,
        cost=Decimal("0.001234"),
    ),
    dict(index=1, tool_name="calculator", parent_index=0, created=2, started=2.5, finished=6),
    dict(index=2, tool_name="send_email", parent_index=0, created=2, started=3, finished=5),
    dict(
        index=3,
        kind=Step.Kind.MODEL,
        model_route="scripted:demo",
        created=6,
        started=6,
        finished=9.5,
        attempts=2,
        input_tokens=300,
        output_tokens=80,
        cost=Decimal("0.002000"),
    ),
]


def step_rows(tl: timeline.Timeline) -> dict[int, StepRow]:
    return {r.index: r for r in tl.rows if isinstance(r, StepRow)}


def test_geometry_of_a_finished_run_with_parallel_tool_calls_and_an_approval():
    steps = [make_step(**fields) for fields in SCENARIO]
    approval = make_approval(2, created=2, decided=3, tool_name="send_email")

    tl = build_timeline(make_run(), steps, [approval], now=at(500))

    assert (tl.active, tl.duration_ms, tl.duration_label) == (False, 10_000, "10.00 s")
    rows = step_rows(tl)
    # (queued bar, executing bar, queued ms, executing ms)
    assert [(r.queued, r.executing, r.queued_ms, r.executing_ms) for r in rows.values()] == [
        (Bar(0, 5), Bar(5, 15), 500, 1400),  # executing: the model call's latency, not 1500
        (Bar(20, 5), Bar(25, 35), 500, 3500),
        (Bar(20, 10), Bar(30, 20), 1000, 2000),
        (Bar(60, 0), Bar(60, 35), 0, 3500),
    ]
    # The two tool calls of turn 0 execute at the same time: 20% of the axis (2 s) is shared.
    assert overlap(rows[1].executing, rows[2].executing) == pytest.approx(20)
    assert (rows[1].parallel, rows[2].parallel, rows[0].parallel) == (2, 2, 0)
    assert (rows[1].what, rows[0].what) == ("calculator", "scripted:demo")
    assert not any(r.open for r in rows.values())

    # The approval comes right after the step it held, and spans its review (2 s -> 3 s).
    assert [r.index if isinstance(r, StepRow) else "approval" for r in tl.rows] == [
        0,
        1,
        2,
        "approval",
        3,
    ]
    review = tl.rows[3]
    assert isinstance(review, ApprovalRow)
    assert (review.bar, review.requested_ms, review.wait_ms, review.pending) == (
        Bar(20, 10),
        2000,
        1000,
        False,
    )
    assert review.url == f"/admin/approvals/approval/{approval.pk}/change/"

    assert tl.ticks == [Tick(f"{s} s", s * 10) for s in (0, 2, 4, 6, 8, 10)]
    assert [t.align for t in tl.ticks] == ["start", "middle", "middle", "middle", "middle", "end"]
    assert tl.grid_step == pytest.approx(20)
    assert (tl.shown_steps, tl.hidden_steps, tl.hidden_approvals) == (4, 0, 0)


def test_an_active_run_ends_its_axis_now():
    run = make_run(Run.Status.WAITING_APPROVAL, finished=None)
    steps = [
        make_step(0, Step.Kind.MODEL, created=0, started=0, finished=1, model_route="scripted:x"),
        make_step(1, status=Step.Status.RUNNING, created=1, started=2, parent_index=0),
        make_step(2, status=Step.Status.AWAITING_APPROVAL, created=1, parent_index=0),
    ]
    held = make_approval(2, Approval.Status.PENDING, created=1)

    tl = build_timeline(run, steps, [held], now=at(8))

    assert (tl.active, tl.duration_ms) == (True, 8000)
    rows = step_rows(tl)
    running = rows[1]
    assert (running.queued, running.executing) == (Bar(12.5, 12.5), Bar(25, 75))
    assert (running.queued_ms, running.executing_ms, running.open) == (1000, 6000, True)
    assert "executing 6000 ms so far" in running.title
    # The step held for review has not started: a marker where it was queued, its wait so far.
    waiting = rows[2]
    assert (waiting.queued, waiting.executing, waiting.marker) == (None, None, Bar(12.5, 0))
    assert (waiting.queued_ms, waiting.executing_ms, waiting.open) == (7000, None, True)
    review = tl.rows[-1]
    assert isinstance(review, ApprovalRow)
    assert (review.bar, review.wait_ms, review.pending, review.reviewer) == (
        Bar(12.5, 87.5),
        7000,
        True,
        "",
    )
    assert [t.label for t in tl.ticks] == ["0 s", "2 s", "4 s", "6 s", "8 s"]
    assert [t.left for t in tl.ticks] == [0, 25, 50, 75, 100]


@pytest.mark.parametrize(
    ("seconds", "label"),
    [(179.6, "3 min 0 s"), (130.2, "2 min 10 s"), (7199.7, "2 h 0 min"), (9000, "2 h 30 min")],
)
def test_long_durations_read_in_minutes_and_hours(seconds, label):
    tl = build_timeline(make_run(finished=seconds), [], [], now=at(seconds + 5))
    assert tl.duration_label == label


def test_a_run_of_zero_duration_draws_points_not_a_division_by_zero():
    run = make_run(finished=0)
    steps = [make_step(0, Step.Kind.MODEL, created=0, started=0, finished=0, latency_ms=0)]

    tl = build_timeline(run, steps, [], now=at(60))

    assert tl.duration_ms == 0 and tl.duration_label == "0 ms"
    row = step_rows(tl)[0]
    assert (row.queued, row.executing, row.queued_ms, row.executing_ms) == (
        Bar(0, 0),
        Bar(0, 0),
        0,
        0,
    )
    assert tl.ticks == [Tick("0 s", 0)]
    assert (tl.grid_step, tl.grid_css) == (0, "none")


def test_a_pending_step_without_started_at_is_a_marker_with_its_wait_so_far():
    run = make_run(Run.Status.QUEUED, finished=None)
    step = make_step(0, Step.Kind.MODEL, Step.Status.PENDING, created=1, model_route="scripted:x")

    tl = build_timeline(run, [step], [], now=at(3))

    row = step_rows(tl)[0]
    assert (row.queued, row.executing, row.marker) == (None, None, Bar(33.33, 0))
    assert (row.queued_ms, row.executing_ms, row.open) == (2000, None, True)
    assert row.title == "#0 model scripted:x: pending; queued 2000 ms so far"


def test_a_step_that_ended_without_running_is_all_queue_and_spans_are_clipped_to_the_axis():
    run = make_run(finished=4)
    steps = [
        make_step(0, Step.Kind.MODEL, created=0, started=1, finished=2),
        make_step(1, Step.Status.REFUSED, created=2, finished=2.5, parent_index=0, error="no"),
        # Recorded after the run's end (a late write): clipped at 100%, its time still told.
        make_step(2, Step.Status.CANCELLED, created=3, started=3.5, finished=6, parent_index=0),
    ]

    rows = step_rows(build_timeline(run, steps, [], now=at(100)))

    assert (rows[1].queued, rows[1].executing, rows[1].queued_ms) == (Bar(50, 12.5), None, 500)
    assert rows[1].executing_ms is None and rows[1].error == "no"
    assert (rows[2].executing, rows[2].executing_ms) == (Bar(87.5, 12.5), 2500)


def test_a_final_run_without_finished_at_ends_at_its_last_recorded_moment():
    run = make_run(Run.Status.FAILED, finished=None)
    steps = [make_step(0, Step.Kind.MODEL, Step.Status.FAILED, created=0, started=1, finished=5)]

    tl = build_timeline(run, steps, [], now=at(1000))

    assert tl.duration_ms == 5000 and not tl.active
    assert step_rows(tl)[0].executing == Bar(20, 80)


def test_long_runs_draw_the_first_steps_and_count_the_rest():
    steps = [
        make_step(i, created=i, started=i, finished=i + 1, parent_index=None) for i in range(5)
    ]
    approvals = [make_approval(1, created=1, decided=2), make_approval(4, created=4, decided=5)]

    tl = build_timeline(make_run(), steps, approvals, now=at(10), limit=2)

    assert [r.index if isinstance(r, StepRow) else "approval" for r in tl.rows] == [
        0,
        1,
        "approval",
    ]
    assert (tl.shown_steps, tl.hidden_steps, tl.hidden_approvals) == (2, 3, 1)


@pytest.mark.parametrize(
    ("seconds", "labels", "lefts"),
    [
        (0.8, ["0 s", "0.2 s", "0.4 s", "0.6 s", "0.8 s"], [0, 25, 50, 75, 100]),
        (3600, ["0 s", "15 min", "30 min", "45 min", "60 min"], [0, 25, 50, 75, 100]),
        (7, ["0 s", "2 s", "4 s", "6 s"], [0, 28.57, 57.14, 85.71]),
    ],
)
def test_ticks_fall_on_round_numbers(seconds, labels, lefts):
    tl = build_timeline(make_run(finished=seconds), [], [], now=at(seconds))
    assert [(t.label, t.left) for t in tl.ticks] == list(zip(labels, lefts, strict=True))


# --- the admin page, on rows in the database -------------------------------------------------


def create_run(agent: Any, *, finished: float | None = 10, **fields: Any) -> Run:
    fields.setdefault("status", Run.Status.SUCCEEDED)
    run = Run.objects.create(
        agent=agent,
        agent_version=agent.current_version,
        model_route="scripted:demo",
        input="6*7",
        **fields,
    )
    Run.objects.filter(pk=run.pk).update(
        created_at=T0, started_at=T0, finished_at=None if finished is None else at(finished)
    )
    run.refresh_from_db()
    return run


def create_step(run: Run, *, created: float, started=None, finished=None, **fields: Any) -> Step:
    fields.setdefault("status", Step.Status.SUCCEEDED)
    fields.setdefault("kind", Step.Kind.TOOL)
    step = Step.objects.create(run=run, **fields)
    Step.objects.filter(pk=step.pk).update(
        created_at=at(created),
        started_at=None if started is None else at(started),
        finished_at=None if finished is None else at(finished),
    )
    return step


def create_approval(run: Run, step_index: int, *, created: float, decided=None, **fields) -> Any:
    fields.setdefault("status", Approval.Status.APPROVED)
    approval = Approval.objects.create(
        run=run,
        step_index=step_index,
        reason=Approval.Reason.TOOL_REQUIRES_APPROVAL,
        proposed_digest="d" * 64,
        decided_at=None if decided is None else at(decided),
        **fields,
    )
    Approval.objects.filter(pk=approval.pk).update(created_at=at(created))
    return approval


def timeline_html(response: Any) -> str:
    """The timeline section of a run's admin page (the page around it has the admin's scripts)."""
    assert response.status_code == 200
    html = response.content.decode()
    start = html.index('<section class="module run-timeline"')
    return html[start : html.index("</section>", start) + len("</section>")]


@pytest.mark.django_db
def test_run_page_draws_parallel_tool_calls_and_the_approval_between_them(
    admin_client, admin_user, make_agent
):
    run = create_run(make_agent(), input_tokens=420, output_tokens=125, cost=Decimal("0.003234"))
    for fields in SCENARIO:
        create_step(run, **fields)
    approval = create_approval(
        run, 2, created=2, decided=3, tool_name="send_email", decided_by=admin_user
    )

    with CaptureQueriesContext(connection) as queries:
        tl = run_timeline(run, now=at(500))
    assert len(queries.captured_queries) == 2  # steps, approvals (with their reviewer)
    rows = step_rows(tl)
    assert (rows[1].executing, rows[2].executing) == (Bar(25, 35), Bar(30, 20))
    assert overlap(rows[1].executing, rows[2].executing) == pytest.approx(20)

    section = timeline_html(admin_client.get(f"/admin/agents/run/{run.pk}/change/"))

    assert "<script" not in section.lower()
    # Both tool calls, each with its queue and its execution, overlapping on the axis.
    calculator = section.index("<code>calculator</code>")
    send_email = section.index("<code>send_email</code>")
    review = section.index(f'href="/admin/approvals/approval/{approval.pk}/change/"')
    last_turn = section.index("<td>3</td>")
    assert calculator < send_email < review < last_turn
    assert section.count("from #0, parallel ×2") == 2
    row_1, row_2 = section[calculator:send_email], section[send_email:review]
    assert 'style="left:20.00%;width:5.00%"' in row_1  # queued 2 s -> 2.5 s
    assert 'style="left:25.00%;width:35.00%"' in row_1  # executing 2.5 s -> 6 s
    assert 'style="left:20.00%;width:10.00%"' in row_2  # queued 2 s -> 3 s (under review)
    assert 'style="left:30.00%;width:20.00%"' in row_2  # executing 3 s -> 5 s
    assert 'class="tl-bar tl-s-succeeded"' in row_2
    assert row_1.count('<td class="tl-num">–</td>') == 2  # a tool call has no tokens or cost
    # The approval row: its bar (2 s -> 3 s), status and reviewer.
    approval_row = section[review : section.index("</tr>", review)]
    assert 'style="left:20.00%;width:10.00%"' in approval_row
    assert "approval of #2</a>" in approval_row
    assert "<td>approved</td>" in approval_row
    assert "decided after 1000 ms" in approval_row and "reviewer: admin" in approval_row
    # Tokens, cost, queued and executing ms of the first model turn (latency, not elapsed).
    first_turn = section[section.index("<td>0</td>") : calculator]
    assert '<td class="tl-num">120 / 45</td>' in first_turn
    assert '<td class="tl-num">0.001234</td>' in first_turn
    assert '<td class="tl-num">500</td>' in first_turn
    assert '<td class="tl-num">1400</td>' in first_turn
    # The axis and the legend.
    for seconds in (0, 2, 4, 6, 8, 10):
        assert f'style="left:{seconds * 10}.00%">{seconds} s</span>' in section
    assert "Took 10.00 s" in section and "waiting (queued for a worker;" in section
    assert "not drawn" not in section


@pytest.mark.django_db
def test_run_page_says_how_many_steps_are_not_drawn(admin_client, make_agent, monkeypatch):
    monkeypatch.setattr(timeline, "MAX_STEPS", 3)
    run = create_run(make_agent())
    for i in range(6):
        create_step(run, index=i, created=i, started=i, finished=i + 1, tool_name=f"tool_{i}")
    create_approval(run, 1, created=1, decided=2)
    create_approval(run, 5, created=5, decided=6)

    with CaptureQueriesContext(connection) as queries:
        tl = run_timeline(run, now=at(100))
    assert len(queries.captured_queries) == 2
    assert (tl.shown_steps, tl.hidden_steps, tl.hidden_approvals) == (3, 3, 1)

    section = timeline_html(admin_client.get(f"/admin/agents/run/{run.pk}/change/"))
    assert "<code>tool_2</code>" in section and "<code>tool_3</code>" not in section
    assert section.count('class="tl-row-approval"') == 1
    note = " ".join(section[section.index('id="run-timeline-hidden"') :].split())
    assert note.startswith(
        'id="run-timeline-hidden"> Showing the first 3 steps: 3 later steps and 1 approval are '
        "not drawn"
    )


@pytest.mark.django_db
def test_an_active_run_page_shows_the_wait_so_far(admin_client, make_agent):
    run = create_run(make_agent(), status=Run.Status.RUNNING, finished=None)
    create_step(run, index=0, kind=Step.Kind.MODEL, status=Step.Status.PENDING, created=0)

    section = timeline_html(admin_client.get(f"/admin/agents/run/{run.pk}/change/"))

    assert "Running for" in section and "the axis ends now" in section
    assert '<span class="tl-marker" style="left:0.00%;width:0.00%"' in section
    assert " so far</td>" in section


@pytest.mark.django_db
def test_html_in_a_tool_error_and_names_is_escaped(admin_client, make_agent):
    run = create_run(make_agent(), status=Run.Status.FAILED)
    attack = '<script>alert("pwned")</script><img src=x onerror=alert(1)>'
    create_step(
        run,
        index=0,
        status=Step.Status.FAILED,
        tool_name="<b>evil_tool</b>",
        error=attack + " " + "x" * 300 + "TAIL",
        created=0,
        started=1,
        finished=2,
    )
    create_approval(run, 0, created=1, decided=2, tool_name="<i>held</i>")

    section = timeline_html(admin_client.get(f"/admin/agents/run/{run.pk}/change/"))

    assert "<script" not in section.lower() and "<img" not in section
    assert "<b>evil_tool</b>" not in section and "<i>held</i>" not in section
    assert "&lt;script&gt;alert(&quot;pwned&quot;)&lt;/script&gt;&lt;img src=x" in section
    assert "<code>&lt;b&gt;evil_tool&lt;/b&gt;</code>" in section
    assert "&lt;i&gt;held&lt;/i&gt;" in section
    # The row shows the error's start; the tail is cut.
    error_cell = section[section.index('<td class="tl-error">') :]
    error_cell = error_cell[: error_cell.index("</td>")]
    assert "…" in error_cell and "TAIL" not in error_cell


@pytest.mark.django_db
def test_approvals_link_to_their_page_only_for_users_who_may_see_it(
    client, django_user_model, make_agent
):
    from django.contrib.auth.models import Permission

    run = create_run(make_agent())
    create_step(run, index=0, created=0, started=1, finished=2, tool_name="send_email")
    approval = create_approval(run, 0, created=0, decided=1)
    viewer = django_user_model.objects.create_user("viewer", password="x", is_staff=True)
    viewer.user_permissions.add(*Permission.objects.filter(codename__in=["view_run", "view_step"]))
    client.force_login(viewer)

    section = timeline_html(client.get(f"/admin/agents/run/{run.pk}/change/"))

    assert "<td>approval of #0</td>" in section
    assert f"/admin/approvals/approval/{approval.pk}/" not in section
