"""manage.py stats: runs by status, failed and escalated shares, step latency percentiles and
usage per agent over the last hour and day (or one --since window), as text tables or JSON."""

from __future__ import annotations

import json
import uuid
from datetime import datetime, timedelta
from decimal import Decimal
from io import StringIO
from typing import Any

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.utils import timezone

from agents.models import Agent, Run, Step
from agents.selectors import summarise_window
from approvals.models import Approval

pytestmark = pytest.mark.django_db

S = Run.Status
MINUTES = timedelta(minutes=1)
HOURS = timedelta(hours=1)
DAYS = timedelta(days=1)


def run_command(*args: str) -> str:
    out = StringIO()
    call_command("stats", *args, stdout=out, stderr=StringIO())
    return out.getvalue()


def stats_json(*args: str) -> dict[str, Any]:
    report: dict[str, Any] = json.loads(run_command("--json", *args))
    return report


def make_run(
    agent: Agent,
    *,
    status: str,
    ago: timedelta,
    tokens: tuple[int, int] = (0, 0),
    cost: str = "0",
    approvals: int = 0,
) -> Run:
    run = Run.objects.create(
        agent=agent,
        agent_version=agent.current_version,
        model_route="scripted:demo",
        input="x",
        status=status,
        input_tokens=tokens[0],
        output_tokens=tokens[1],
        cost=Decimal(cost),
    )
    # created_at is auto_now_add: only an update can put the run in the past.
    Run.objects.filter(pk=run.pk).update(created_at=timezone.now() - ago)
    for index in range(approvals):
        Approval.objects.create(
            run=run,
            step_index=index,
            reason=Approval.Reason.TOOL_REQUIRES_APPROVAL,
            proposed_digest="d" * 64,
        )
    return run


def make_step(
    run: Run, index: int, kind: str, latency_ms: int | None, finished_ago: timedelta | None
) -> None:
    Step.objects.create(
        run=run,
        index=index,
        kind=kind,
        status=Step.Status.SUCCEEDED if finished_ago is not None else Step.Status.RUNNING,
        latency_ms=latency_ms,
        finished_at=timezone.now() - finished_ago if finished_ago is not None else None,
    )


def percentile_cont(values: list[int], fraction: float) -> float:
    """Postgres's percentile_cont: linear interpolation at position fraction * (n - 1)."""
    ordered = sorted(values)
    position = fraction * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return round(ordered[low] + (ordered[high] - ordered[low]) * (position - low), 1)


@pytest.fixture
def scene(make_agent: Any) -> dict[str, Agent]:
    """Two agents' runs: four in the last hour, one 2 hours ago, one 3 days ago; with steps."""
    alpha = make_agent(slug="alpha", script=[{"text": "hi"}])
    beta = make_agent(slug="beta", script=[{"text": "hi"}])
    make_agent(slug="quiet", script=[{"text": "hi"}])  # no runs: listed nowhere

    r1 = make_run(alpha, status=S.SUCCEEDED, ago=10 * MINUTES, tokens=(100, 50), cost="0.3")
    r2 = make_run(
        alpha, status=S.FAILED, ago=20 * MINUTES, tokens=(10, 5), cost="0.01", approvals=2
    )
    r3 = make_run(
        beta,
        status=S.WAITING_APPROVAL,
        ago=30 * MINUTES,
        tokens=(200, 100),
        cost="0.5",
        approvals=1,
    )
    make_run(beta, status=S.QUEUED, ago=40 * MINUTES)
    r5 = make_run(
        alpha, status=S.SUCCEEDED, ago=2 * HOURS, tokens=(1000, 500), cost="1", approvals=1
    )
    r6 = make_run(beta, status=S.FAILED, ago=3 * DAYS, tokens=(7, 7), cost="9", approvals=1)

    model, tool = Step.Kind.MODEL, Step.Kind.TOOL
    make_step(r1, 0, model, 100, 5 * MINUTES)
    make_step(r1, 1, tool, 10, 5 * MINUTES)
    make_step(r1, 2, model, 200, 5 * MINUTES)
    make_step(r2, 0, model, 300, 5 * MINUTES)
    make_step(r2, 1, tool, 20, 5 * MINUTES)
    make_step(r3, 0, model, 400, 5 * MINUTES)
    make_step(r3, 1, model, 1000, 5 * MINUTES)
    make_step(r3, 2, model, None, None)  # still running: no latency, not finished
    make_step(r5, 0, model, 5000, 2 * HOURS)
    make_step(r6, 0, model, 99_999, 3 * DAYS)
    # A step of an old run that finished recently counts: latency is by when steps finished.
    make_step(r6, 1, tool, 30, 5 * MINUTES)
    return {"alpha": alpha, "beta": beta}


def test_json_figures_for_the_last_hour_and_day(scene):
    report = stats_json()
    assert report["agent"] is None
    hour, day = report["windows"]
    assert (hour["window"], day["window"]) == ("1h", "1d")

    assert hour["runs"] == {
        "total": 4,
        "by_status": {
            "queued": 1,
            "running": 0,
            "waiting_approval": 1,
            "succeeded": 1,
            "failed": 1,
            "cancelled": 0,
        },
    }
    assert hour["failed"] == {"runs": 1, "rate": 0.25}
    # r2 has two approvals and counts once; r6 (3 days old) is outside both windows.
    assert hour["escalated"] == {"runs": 2, "rate": 0.5}
    assert hour["step_latency_ms"] == {
        "model": {"steps": 5, "p50": 300.0, "p95": 880.0},
        "tool": {"steps": 3, "p50": 20.0, "p95": 29.0},
    }
    assert hour["agents"] == [
        {"agent": "beta", "runs": 2, "input_tokens": 200, "output_tokens": 100, "cost": "0.500000"},
        {"agent": "alpha", "runs": 2, "input_tokens": 110, "output_tokens": 55, "cost": "0.310000"},
    ]
    assert hour["other_agents"] is None
    assert hour["totals"] == {
        "agents": 2,
        "runs": 4,
        "input_tokens": 310,
        "output_tokens": 155,
        "cost": "0.810000",
    }

    # The day also holds the run from 2 hours ago (and its step), which reorders the agents.
    assert day["runs"]["total"] == 5
    assert day["runs"]["by_status"]["succeeded"] == 2
    assert day["failed"] == {"runs": 1, "rate": 0.2}
    assert day["escalated"] == {"runs": 3, "rate": 0.6}
    assert day["step_latency_ms"] == {
        "model": {"steps": 6, "p50": 350.0, "p95": 4000.0},
        "tool": {"steps": 3, "p50": 20.0, "p95": 29.0},
    }
    assert [(a["agent"], a["runs"], a["cost"]) for a in day["agents"]] == [
        ("alpha", 3, "1.310000"),
        ("beta", 2, "0.500000"),
    ]
    assert day["agents"][0]["input_tokens"] == 1110 and day["agents"][0]["output_tokens"] == 555
    assert day["totals"]["cost"] == "1.810000"


def test_percentiles_are_postgres_percentile_cont(scene):
    # The expected figures above, by the definition: linear between the nearest two values.
    hour_model = [100, 200, 300, 400, 1000]
    assert (percentile_cont(hour_model, 0.5), percentile_cont(hour_model, 0.95)) == (300, 880)
    day_model = [*hour_model, 5000]
    assert (percentile_cont(day_model, 0.5), percentile_cont(day_model, 0.95)) == (350, 4000)
    latency = stats_json("--since", "1d")["windows"][0]["step_latency_ms"]["model"]
    assert (latency["p50"], latency["p95"]) == (
        percentile_cont(day_model, 0.5),
        percentile_cont(day_model, 0.95),
    )


def test_json_keys_are_stable_and_numbers_are_numbers(scene):
    (window,) = stats_json("--since", "15m")["windows"]
    assert set(window) == {
        "window",
        "since",
        "until",
        "agent",
        "runs",
        "failed",
        "escalated",
        "step_latency_ms",
        "agents",
        "other_agents",
        "totals",
    }
    assert window["window"] == "15m"
    # 15 minutes: only the run created 10 minutes ago.
    assert window["runs"]["total"] == 1 and window["runs"]["by_status"]["succeeded"] == 1
    assert isinstance(window["runs"]["total"], int)
    assert isinstance(window["failed"]["rate"], float)
    assert isinstance(window["step_latency_ms"]["model"]["p50"], float)
    assert isinstance(window["agents"][0]["input_tokens"], int)
    assert isinstance(window["agents"][0]["cost"], str)  # a Decimal, exact as text
    since = datetime.fromisoformat(window["since"])
    until = datetime.fromisoformat(window["until"])
    assert until - since == timedelta(minutes=15)


def test_agent_filter(scene):
    report = stats_json("--since", "1h", "--agent", "alpha")
    assert report["agent"] == "alpha"
    (hour,) = report["windows"]
    assert hour["agent"] == "alpha"
    assert hour["runs"]["total"] == 2
    assert hour["runs"]["by_status"]["succeeded"] == 1 and hour["runs"]["by_status"]["failed"] == 1
    assert hour["failed"] == {"runs": 1, "rate": 0.5}
    assert hour["escalated"] == {"runs": 1, "rate": 0.5}
    assert hour["step_latency_ms"] == {
        "model": {"steps": 3, "p50": 200.0, "p95": 290.0},
        "tool": {"steps": 2, "p50": 15.0, "p95": 19.5},
    }
    assert [a["agent"] for a in hour["agents"]] == ["alpha"]
    assert hour["totals"]["cost"] == "0.310000"


def test_window_boundaries_include_the_start_and_exclude_the_end(make_agent):
    agent = make_agent(slug="edge", script=[{"text": "hi"}])
    now = timezone.now()
    at_start = make_run(agent, status=S.SUCCEEDED, ago=timedelta(0))
    just_before = make_run(agent, status=S.FAILED, ago=timedelta(0))
    at_end = make_run(agent, status=S.CANCELLED, ago=timedelta(0))
    Run.objects.filter(pk=at_start.pk).update(created_at=now - HOURS)
    Run.objects.filter(pk=just_before.pk).update(created_at=now - HOURS - timedelta(microseconds=1))
    Run.objects.filter(pk=at_end.pk).update(created_at=now)
    make_step(at_start, 0, Step.Kind.TOOL, 7, None)
    Step.objects.filter(run=at_start).update(finished_at=now - HOURS)
    make_step(at_end, 0, Step.Kind.TOOL, 9, None)
    Step.objects.filter(run=at_end).update(finished_at=now)

    figures = summarise_window(HOURS, now=now)
    assert figures["since"] == now - HOURS and figures["until"] == now
    assert figures["runs"]["total"] == 1
    assert figures["runs"]["by_status"]["succeeded"] == 1
    assert figures["step_latency_ms"]["tool"] == {"steps": 1, "p50": 7.0, "p95": 7.0}


def test_text_tables(scene):
    out = run_command()
    hour, day = out.split("\n\nLast 1d: ")
    assert hour.startswith("Last 1h: ") and hour.splitlines()[0].endswith(" UTC")
    lines = hour.splitlines()
    rows = [line.split() for line in lines]
    for status, count in [
        ("queued", "1"),
        ("running", "0"),
        ("waiting_approval", "1"),
        ("succeeded", "1"),
        ("failed", "1"),
        ("cancelled", "0"),
        ("total", "4"),
    ]:
        assert [status, count] in rows, status
    assert ["failed", "1", "25.0%"] in rows
    assert ["escalated", "2", "50.0%"] in rows
    assert ["model", "5", "300.0", "880.0"] in rows
    assert ["tool", "3", "20.0", "29.0"] in rows
    assert ["beta", "2", "200", "100", "0.500000"] in rows
    assert ["alpha", "2", "110", "55", "0.310000"] in rows
    assert ["total", "4", "310", "155", "0.810000"] in rows
    assert rows.index(["beta", "2", "200", "100", "0.500000"]) < rows.index(
        ["alpha", "2", "110", "55", "0.310000"]
    )
    # Aligned: each table's numbers end in one column.
    status_table = lines[lines.index("Runs created in the window") + 1 :][:8]
    assert len({len(line) for line in status_table}) == 1, status_table
    usage_start = next(i for i, line in enumerate(lines) if line.startswith("Usage by agent"))
    usage_table = lines[usage_start + 1 : usage_start + 5]
    assert len({len(line) for line in usage_table}) == 1, usage_table

    day_rows = [line.split() for line in day.splitlines()]
    assert ["total", "5"] in day_rows
    assert ["escalated", "3", "60.0%"] in day_rows
    assert ["model", "6", "350.0", "4000.0"] in day_rows
    assert ["alpha", "3", "1110", "555", "1.310000"] in day_rows


def test_an_empty_window_shows_zeros_and_dashes(make_agent):
    make_agent(slug="idle", script=[{"text": "hi"}])
    (window,) = stats_json("--since", "6h")["windows"]
    assert window["runs"]["total"] == 0
    assert set(window["runs"]["by_status"].values()) == {0}
    assert len(window["runs"]["by_status"]) == len(Run.Status.values)
    assert window["failed"] == {"runs": 0, "rate": None}
    assert window["escalated"] == {"runs": 0, "rate": None}
    assert window["step_latency_ms"] == {
        "model": {"steps": 0, "p50": None, "p95": None},
        "tool": {"steps": 0, "p50": None, "p95": None},
    }
    assert window["agents"] == [] and window["other_agents"] is None
    assert window["totals"] == {
        "agents": 0,
        "runs": 0,
        "input_tokens": 0,
        "output_tokens": 0,
        "cost": "0.000000",
    }

    rows = [line.split() for line in run_command("--since", "6h").splitlines()]
    assert ["total", "0"] in rows
    assert ["failed", "0", "-"] in rows and ["escalated", "0", "-"] in rows
    assert ["model", "0", "-", "-"] in rows and ["tool", "0", "-", "-"] in rows
    assert ["no", "runs", "0", "-", "-", "-"] in rows


def test_the_top_20_agents_by_cost_and_the_rest_as_other(make_agent):
    for number in range(1, 23):
        agent = make_agent(slug=f"agent-{number:02d}", script=[{"text": "hi"}])
        make_run(agent, status=S.SUCCEEDED, ago=MINUTES, tokens=(number, 1), cost=str(number))
    (window,) = stats_json("--since", "1h")["windows"]
    assert [a["agent"] for a in window["agents"]] == [f"agent-{n:02d}" for n in range(22, 2, -1)]
    assert window["other_agents"] == {
        "agents": 2,
        "runs": 2,
        "input_tokens": 3,
        "output_tokens": 2,
        "cost": "3.000000",
    }
    assert window["totals"]["agents"] == 22 and window["totals"]["cost"] == "253.000000"

    rows = [line.split() for line in run_command("--since", "1h").splitlines()]
    assert ["(2", "other", "agents)", "2", "3", "2", "3.000000"] in rows
    assert ["total", "22", "253", "22", "253.000000"] in rows


def test_agents_with_equal_costs_are_ordered_by_slug(make_agent):
    for slug in ("zed", "amy"):
        agent = make_agent(slug=slug, script=[{"text": "hi"}])
        make_run(agent, status=S.SUCCEEDED, ago=MINUTES, cost="1")
    (window,) = stats_json("--since", "1h")["windows"]
    assert [a["agent"] for a in window["agents"]] == ["amy", "zed"]


def test_a_handful_of_queries_however_many_rows(scene, django_assert_num_queries, settings):
    # No live worker in this test's view (a Redis key prefix of its own), so the queues section
    # counts the runs waiting on models and on tools: one aggregate each.
    settings.AGENTSITE_REDIS_KEY_PREFIX = f"stats-{uuid.uuid4().hex[:8]}:"
    # Per window: run counts, usage per agent, step latency. Plus the agent's lookup.
    with django_assert_num_queries(6 + 2):
        run_command()
    with django_assert_num_queries(7 + 2):
        run_command("--agent", "beta")


@pytest.mark.parametrize("bad", ["2h", "1 h", "", "1H", "-1h"])
def test_a_bad_since_names_the_value_and_the_choices(bad):
    with pytest.raises(CommandError) as excinfo:
        run_command(f"--since={bad}")
    message = str(excinfo.value)
    assert f"--since {bad!r}" in message
    assert "15m, 1h, 6h, 1d, 7d" in message


def test_an_unknown_agent_is_named_with_the_known_ones(make_agent):
    make_agent(slug="alpha", script=[{"text": "hi"}])
    with pytest.raises(CommandError) as excinfo:
        run_command("--agent", "nope")
    message = str(excinfo.value)
    assert "--agent" in message and "'nope'" in message and "alpha" in message


def test_without_percentile_cont_the_figures_are_the_same(scene, settings, monkeypatch):
    # The embedded SQLite of make demo has no percentile_cont: the latencies are read and
    # interpolated in Python, and must give what Postgres gives.
    from django.db import connection

    from agents import selectors as stats

    window = timedelta(days=30)
    in_sql = stats.summarise_window(window)["step_latency_ms"]
    monkeypatch.setattr(connection, "vendor", "sqlite")
    in_python = stats.summarise_window(window)["step_latency_ms"]

    assert in_python == in_sql
    assert any(row["steps"] > 1 for row in in_sql.values())


@pytest.mark.parametrize(
    ("values", "fraction", "expected"),
    [
        ([], 0.5, None),
        ([7.0], 0.95, 7.0),
        ([1.0, 2.0, 3.0, 4.0], 0.5, 2.5),
        ([0.0, 100.0], 0.95, 95.0),
    ],
)
def test_percentile_cont_interpolates_as_postgres_does(values, fraction, expected):
    from agents.selectors import percentile_cont

    assert percentile_cont(values, fraction) == expected
