"""Metrics, structured logs and tracing, in process (tests/integration/test_observability.py
covers them across real web and worker processes)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime
from typing import Any

import kombu
import pytest
import redis
from django.contrib.auth.models import User
from django.db import transaction
from opentelemetry import trace
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families
from rest_framework.test import APIClient

from agents import metrics as agent_metrics
from agents.models import ModelPrice, Run
from agents.services import create_api_key, submit_run
from agentsite import breaker, logs, metrics, rediskeys, tracing
from agentsite.middleware import route_label
from agentsite.redaction import RedactingFilter
from approvals.models import Approval
from audittrail import writer as audit
from harness.processes import ROOT
from tests.support.processes import suite_database_url
from tools import metrics as tool_metrics

pytestmark = pytest.mark.django_db


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


@pytest.fixture(autouse=True)
def _metrics_open(settings: Any) -> None:
    """Tests run with DEBUG off, where /metrics wants a token unless told it is public."""
    settings.AGENTSITE_METRICS_PUBLIC = True


def scraped(client: Any, **headers: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    response = client.get("/metrics", **headers)
    assert response.status_code == 200, response.content
    found = {}
    for family in text_string_to_metric_families(response.content.decode()):
        for s in family.samples:
            found[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return found


# --- Counting the audit trail -----------------------------------------------------------------


def test_a_committed_audit_event_is_counted_once(
    make_agent, django_capture_on_commit_callbacks, known_routes
):
    known_routes("m:x")
    run = submit_run(agent=make_agent(slug="counted"), input="hi")
    before = sample("agentsite_model_tokens_total", agent="counted", model="m:x", direction="input")
    cost_before = sample("agentsite_model_cost_total", agent="counted", model="m:x")
    payload = {
        "kind": "model",
        "route": "m:x",
        "input_tokens": 120,
        "output_tokens": 30,
        "cost": "0.004500",
        "latency_ms": 250,
    }
    with django_capture_on_commit_callbacks(execute=True):
        audit.record("step.succeeded", run=run, step_index=0, payload=payload)

    assert sample(
        "agentsite_model_tokens_total", agent="counted", model="m:x", direction="input"
    ) == (before + 120)
    assert sample("agentsite_model_cost_total", agent="counted", model="m:x") == pytest.approx(
        cost_before + 0.0045
    )


@pytest.mark.django_db(transaction=True)
def test_an_event_rolled_back_with_its_change_is_not_counted(make_agent):
    run = submit_run(agent=make_agent(slug="rolled-back"), input="hi")
    before = sample("agentsite_runs_finished_total", agent="rolled-back", status="failed")
    with pytest.raises(RuntimeError), transaction.atomic():
        audit.record("run.failed", run=run, payload={})
        raise RuntimeError("the transition failed")
    assert sample("agentsite_runs_finished_total", agent="rolled-back", status="failed") == before

    audit.record("run.failed", run=run, payload={})  # autocommit: counted at once
    assert sample("agentsite_runs_finished_total", agent="rolled-back", status="failed") == (
        before + 1
    )


@pytest.mark.parametrize(
    ("action", "payload", "metric", "labels"),
    [
        (
            "step.retry_scheduled",
            {"route": "p:retry", "attempt": 1},
            "agentsite_step_retries_total",
            {"kind": "model", "model": "p:retry", "tool": ""},
        ),
        (
            "step.retry_scheduled",
            {"tool": "http_get", "attempt": 1},
            "agentsite_step_retries_total",
            {"kind": "tool", "model": "", "tool": "http_get"},
        ),
        (
            "step.rate_limited",
            {"route": "p:limited", "reason": "provider_429"},
            "agentsite_step_deferrals_total",
            {"model": "p:limited", "reason": "provider_429"},
        ),
        (
            "step.fallback",
            {"from": "p:down", "to": "p:up"},
            "agentsite_model_fallbacks_total",
            {"model": "p:down"},
        ),
        (
            "tool_call.failed",
            {"tool": "http_get", "error": "x", "error_type": "crash", "latency_ms": 3},
            "agentsite_tool_errors_total",
            {"tool": "http_get", "type": "crash"},
        ),
        (
            "tool_call.short_circuited",
            {"tool": "http_get", "reason": "open"},
            "agentsite_tool_errors_total",
            {"tool": "http_get", "type": "circuit_open"},
        ),
        (
            "tool_call.refused",
            {"tool": "http_get", "reason": "no grant"},
            "agentsite_tool_calls_total",
            {"tool": "http_get", "outcome": "refused"},
        ),
    ],
)
def test_each_kind_of_event_moves_its_metric(action, payload, metric, labels, known_routes):
    known_routes("p:retry", "p:limited", "p:down")
    before = sample(metric, **labels)
    metrics.observe(action, None, payload)
    metrics.observe(action, None, payload)
    assert sample(metric, **labels) == before + 2


@pytest.fixture
def known_routes(db: None) -> Any:
    """Routes an operator configured (priced here), read afresh by the metrics."""

    def configure(*routes: str) -> None:
        for route in routes:
            ModelPrice.objects.get_or_create(
                route=route, defaults={"input_per_million": 1, "output_per_million": 1}
            )
        agent_metrics._routes["at"] = -1e9  # forget what this process read before
        agent_metrics._unknown.clear()

    return configure


def test_names_from_outside_do_not_make_series_of_their_own(known_routes):
    """A client's route, a tool the model made up, a method nobody uses: all ``other``."""
    known_routes("p:configured")
    assert agent_metrics.model_label("p:configured") == "p:configured"
    assert agent_metrics.model_label("evil:junk-1") == "other"
    # A route configured a moment ago is known at its first event (looked for once)...
    ModelPrice.objects.create(route="p:new", input_per_million=1, output_per_million=1)
    assert agent_metrics.model_label("p:new") == "p:new"
    # ...and one looked for in vain is not looked for again in the interval.
    ModelPrice.objects.create(route="evil:junk-1", input_per_million=1, output_per_million=1)
    assert agent_metrics.model_label("evil:junk-1") == "other"
    assert tool_metrics.tool_label("dawdle") == "dawdle"
    assert tool_metrics.tool_label("made_up_tool_0") == "other"
    assert metrics.method_label("POST") == "POST" and metrics.method_label("BREW") == "other"
    before = sample("agentsite_tool_calls_total", tool="other", outcome="refused")
    metrics.observe("tool_call.refused", None, {"tool": "made_up_tool_1", "reason": "no"})
    assert sample("agentsite_tool_calls_total", tool="other", outcome="refused") == before + 1


def test_a_message_is_timed_from_when_it_was_due():
    class Request(dict):
        eta = None

    class Task:
        name = "tools.execute_tool_call"
        request = Request()

    labels = {"task": "tools.execute_tool_call"}
    count = sample("agentsite_task_wait_seconds_count", **labels)
    total = sample("agentsite_task_wait_seconds_sum", **labels)
    Task.request[metrics.SENT_HEADER] = time.time() - 2.0  # sent 2 s ago
    metrics.task_started(Task)
    Task.request.eta = datetime.fromtimestamp(time.time() - 0.5, UTC).isoformat()  # a countdown
    metrics.task_started(Task)
    Task.request[metrics.SENT_HEADER] = "not a time"  # another program's message
    metrics.task_started(Task)

    assert sample("agentsite_task_wait_seconds_count", **labels) == count + 2
    waited = sample("agentsite_task_wait_seconds_sum", **labels) - total
    assert 2.5 <= waited < 3.0  # 2 s since sent + 0.5 s since the countdown ended


def test_events_that_measure_nothing_schedule_nothing(
    make_agent, django_capture_on_commit_callbacks
):
    run = submit_run(agent=make_agent(), input="hi")
    with django_capture_on_commit_callbacks() as callbacks:
        audit.record("run.nudged", run=run, payload={})
    assert callbacks == []
    assert metrics.counts("run.succeeded") and not metrics.counts("run.nudged")


def test_label_values_are_bounded(settings):
    settings.AGENTSITE_METRICS_MAX_LABEL_VALUES = 3
    label = f"test-{uuid.uuid4().hex}"
    kept = [metrics.bounded(label, f"client-route-{i}") for i in range(5)]
    assert kept == ["client-route-0", "client-route-1", "client-route-2", "other", "other"]
    assert metrics.bounded(label, "client-route-1") == "client-route-1"  # seen: still itself
    assert len(metrics.bounded(label + "-long", "x" * 500)) == 120


@pytest.mark.parametrize(
    ("pattern", "label"),
    [
        ("api/v1/runs/$", "/api/v1/runs/"),
        ("api/v1/runs/(?P<pk>[0-9a-fA-F-]{32,36})/$", "/api/v1/runs/{pk}/"),
        ("^api/v1/runs/(?P<pk>[0-9a-f-]{32,36})/events/$", "/api/v1/runs/{pk}/events/"),
        ("admin/agents/run/<path:object_id>/change/", "/admin/agents/run/{object_id}/change/"),
        ("metrics", "/metrics"),
    ],
)
def test_requests_are_labelled_by_url_pattern_not_path(pattern, label):
    assert route_label(pattern) == label


# --- /metrics ---------------------------------------------------------------------------------


def test_the_web_process_serves_the_state_gauges(make_agent, settings):
    client = APIClient()
    agent = make_agent(slug="gauged")
    run = submit_run(agent=agent, input="hi")
    Run.objects.filter(pk=run.pk).update(status=Run.Status.WAITING_APPROVAL)
    for index in (1, 2):
        Approval.objects.create(run=run, step_index=index, reason="tool_requires_approval")
    oldest = Approval.objects.filter(run=run).order_by("created_at").first()
    Approval.objects.filter(pk=oldest.pk).update(created_at=oldest.created_at.replace(year=2020))
    # A queue of its own (a worker may be consuming the real ones), with three messages.
    queue = f"metrics-test-{uuid.uuid4().hex[:8]}"
    settings.CELERY_TASK_QUEUES = [*settings.CELERY_TASK_QUEUES, kombu.Queue(queue)]
    broker = redis.Redis.from_url(settings.CELERY_BROKER_URL)
    # Under the deployment's key prefix (kombu's global_keyprefix), as kombu keeps it.
    listed = rediskeys.broker_key(queue)
    broker.rpush(listed, b"1", b"2")
    broker.rpush(f"{listed}\x06\x169", b"3")  # kombu's list for priority 9
    settings.AGENTSITE_BREAKER_FAILURES = 1
    breaker.record_failure("dawdle")
    try:
        found = scraped(client)
    finally:
        broker.delete(listed, f"{listed}\x06\x169")
        breaker.reset("dawdle")

    assert found[("agentsite_approvals_pending", (("agent", "gauged"),))] == 2
    age = found[("agentsite_approvals_oldest_pending_age_seconds", (("agent", "gauged"),))]
    assert age > 365 * 86400  # the one from 2020
    assert found[("agentsite_runs_active", (("status", "waiting_approval"),))] >= 1
    assert found[("agentsite_celery_queue_length", (("queue", queue),))] == 3
    state = "agentsite_circuit_breaker_state"
    assert found[(state, (("agentsite_circuit_breaker_state", "open"), ("breaker", "dawdle")))] == 1
    assert (
        found[(state, (("agentsite_circuit_breaker_state", "closed"), ("breaker", "dawdle")))] == 0
    )


def test_outbox_deliveries_are_counted_and_what_waits_is_measured(
    settings, mailoutbox, django_capture_on_commit_callbacks
):
    from tests.tools.test_email_outbox import BACKEND, outbox_row
    from tools import relay

    settings.EMAIL_BACKEND = BACKEND
    settings.AGENTSITE_OUTBOX_MAX_ATTEMPTS = 2
    outbox_row("obs-bad", to="fail@example.com")
    outbox_row("obs-good")
    found = scraped(APIClient())
    assert found[("agentsite_outbox_pending", (("kind", "email"),))] >= 2
    before = {o: sample("agentsite_outbox_deliveries_total", kind="email", outcome=o) for o in
              ("delivered", "retry", "failed")}  # fmt: skip

    for _ in range(2):
        with django_capture_on_commit_callbacks(execute=True):
            relay.deliver_pending()

    moved = {
        o: sample("agentsite_outbox_deliveries_total", kind="email", outcome=o) - before[o]
        for o in before
    }
    assert moved == {"delivered": 1, "retry": 1, "failed": 1}
    assert ("agentsite_outbox_pending", (("kind", "email"),)) not in scraped(APIClient())


def test_open_event_streams_are_counted_until_the_client_goes():
    import asyncio

    from agents.api.events import _stream
    from agents.streamslots import Slot

    async def open_then_leave() -> tuple[float, float]:
        stream = _stream(uuid.uuid4(), None, Slot(caller="metrics-test", counted=False))
        assert await stream.__anext__() == "retry: 1000\n\n"
        during = sample("agentsite_event_streams_open")
        await stream.aclose()  # what the server does when the client disconnects
        return during, sample("agentsite_event_streams_open")

    before = sample("agentsite_event_streams_open")
    during, after = asyncio.run(open_then_leave())
    assert (during, after) == (before + 1, before)


def test_webhooks_that_ended_are_counted():
    before = sample("agentsite_webhook_deliveries_total", outcome="failed")
    metrics.observe("webhook.failed", None, {"attempts": 8, "error": "HTTP 500"})
    assert sample("agentsite_webhook_deliveries_total", outcome="failed") == before + 1


def test_metrics_need_the_token_when_one_is_set(settings):
    settings.AGENTSITE_METRICS_TOKEN = "s3cret-scrape"
    client = APIClient()
    assert client.get("/metrics").status_code == 401
    assert client.get("/metrics", HTTP_AUTHORIZATION="Bearer wrong").status_code == 401
    assert client.get("/metrics", HTTP_AUTHORIZATION="Bearer wrông").status_code == 401
    found = scraped(client, HTTP_AUTHORIZATION="Bearer s3cret-scrape")
    assert any(name == "agentsite_runs_active" for name, _ in found)


def test_production_serves_metrics_only_with_a_token_or_when_told_they_are_public(settings):
    settings.DEBUG = False
    settings.AGENTSITE_METRICS_PUBLIC = False
    client = APIClient()
    response = client.get("/metrics")
    assert response.status_code == 403
    assert "AGENTSITE_METRICS_TOKEN" in response.json()["error"]["message"]
    settings.AGENTSITE_METRICS_PUBLIC = True
    assert client.get("/metrics").status_code == 200


def test_a_source_that_cannot_be_read_is_left_out_of_the_scrape(settings):
    settings.CELERY_BROKER_URL = "redis://127.0.0.1:1/0"  # nothing listens there
    found = scraped(APIClient())
    assert not any(name == "agentsite_celery_queue_length" for name, _ in found)
    assert any(name == "agentsite_runs_active" for name, _ in found)


def test_requests_are_counted_by_pattern_and_status(make_agent):
    user = User.objects.create_user(username="metered")
    _, key = create_api_key(user=user)
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {key}")
    labels = {"method": "GET", "route": "/api/v1/runs/{pk}/", "status": "404"}
    before = sample("agentsite_http_requests_total", **labels)
    for _ in range(2):
        assert client.get(f"/api/v1/runs/{uuid.uuid4()}/").status_code == 404
    assert sample("agentsite_http_requests_total", **labels) == before + 2


@pytest.mark.django_db(transaction=True)  # the processes read the configured routes
def test_processes_sharing_a_multiprocess_dir_are_added_up(tmp_path, known_routes):
    known_routes("p:m")
    env = {
        **os.environ,
        "PROMETHEUS_MULTIPROC_DIR": str(tmp_path),
        "DJANGO_SETTINGS_MODULE": "agentsite.settings",
        "DATABASE_URL": suite_database_url(),
        "DEBUG": "1",
    }
    count = (
        "import django; django.setup(); from agentsite import metrics; "
        "[metrics.observe('step.rate_limited', None, {'route': 'p:m', 'reason': 'rate_limited'})"
        " for _ in range({n})]"
    )
    for n in (2, 3):  # two worker processes
        subprocess.run(
            [sys.executable, "-c", count.replace("{n}", str(n))], env=env, cwd=ROOT, check=True
        )
    show = (
        "import django; django.setup(); from agentsite import metrics; "
        "print(metrics.exposition(state=False)[0].decode())"
    )
    out = subprocess.run(
        [sys.executable, "-c", show], env=env, cwd=ROOT, check=True, capture_output=True, text=True
    ).stdout
    values = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(out)
        for s in f.samples
    }
    key = ("agentsite_step_deferrals_total", (("model", "p:m"), ("reason", "rate_limited")))
    assert values[key] == 5


# --- Logs -------------------------------------------------------------------------------------


def _record(message: str, *args: Any, **extra: Any) -> logging.LogRecord:
    record = logging.LogRecord("agents.engine", logging.INFO, __file__, 1, message, args, None)
    for key, value in extra.items():
        setattr(record, key, value)
    for log_filter in (logs.ContextFilter(), RedactingFilter()):
        log_filter.filter(record)
    return record


def test_a_json_line_carries_the_context_and_is_redacted():
    trace_id, span_id = uuid.uuid4().hex, uuid.uuid4().hex[:16]
    parent = tracing.remote_parent(trace_id, span_id)
    with tracing.span("work", parent=parent), logs.bound(run_id="r-1", agent="support", step=2):
        record = _record(
            "mailed %s", "ann@example.com", data={"to": "bob@example.com", "latency_ms": 12}
        )
    line = logs.JsonFormatter().format(record)
    assert "\n" not in line
    doc = json.loads(line)
    assert doc["run_id"] == "r-1" and doc["agent"] == "support" and doc["step"] == 2
    assert doc["trace_id"] == trace_id  # no SDK here: the no-op span keeps its parent's ids
    assert doc["level"] == "INFO" and doc["logger"] == "agents.engine"
    assert "ann@example.com" not in line and "bob@example.com" not in line
    assert doc["latency_ms"] == 12


def test_a_line_outside_any_run_has_no_run_fields():
    doc = json.loads(logs.JsonFormatter().format(_record("hello")))
    assert "run_id" not in doc and "trace_id" not in doc and doc["message"] == "hello"


def test_text_lines_show_the_context_for_people():
    with logs.bound(run_id="r-9", step=0):
        line = logs.TextFormatter().format(_record("step done"))
    assert line.endswith("step done [run_id=r-9 step=0]")


def test_a_traceback_another_handler_formatted_first_is_redacted_all_the_same():
    try:
        raise ValueError("boom for ann@example.com")
    except ValueError:
        record = logging.LogRecord(
            "django.request", logging.ERROR, __file__, 1, "failed", (), sys.exc_info()
        )
    logging.Formatter().format(record)  # Django's own console handler, in development
    assert "ann@example.com" in (record.exc_text or "")
    for formatter in (logs.TextFormatter(), logs.JsonFormatter()):
        line = formatter.format(record)
        assert "ann@example.com" not in line and "[email]" in line


def test_a_metrics_token_that_no_header_could_carry_is_refused():
    clean = {k: v for k, v in os.environ.items() if k != "AGENTSITE_METRICS_TOKEN"}
    for token in ("tökén", " padded "):
        result = subprocess.run(
            [sys.executable, "-c", "import agentsite.settings"],
            env={**clean, "DEBUG": "1", "AGENTSITE_METRICS_TOKEN": token},
            capture_output=True,
            text=True,
            check=False,
        )
        assert result.returncode != 0 and "AGENTSITE_METRICS_TOKEN must be ASCII" in result.stderr


def test_a_multiprocess_dir_that_does_not_exist_yet_is_made(tmp_path):
    missing = tmp_path / "not" / "yet"
    env = {
        **os.environ,
        "PROMETHEUS_MULTIPROC_DIR": str(missing),
        "DJANGO_SETTINGS_MODULE": "agentsite.settings",
        "DEBUG": "1",
    }
    script = "import django; django.setup(); import agentsite.metrics"
    result = subprocess.run(
        [sys.executable, "-c", script], env=env, cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert missing.is_dir()


@pytest.mark.parametrize(
    ("port", "message"),
    [("99999", "is not a port (0 to 65535)"), ("metrics", "is not an integer")],
)
def test_a_worker_metrics_port_that_is_not_one_is_refused(port, message):
    result = subprocess.run(
        [sys.executable, "-c", "import agentsite.settings"],
        env={**os.environ, "DEBUG": "1", "AGENTSITE_WORKER_METRICS_PORT": port},
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode != 0
    assert f"AGENTSITE_WORKER_METRICS_PORT={port!r} {message}" in result.stderr


def test_an_unknown_log_format_is_refused():
    clean = {k: v for k, v in os.environ.items() if k != "AGENTSITE_LOG_FORMAT"}
    result = subprocess.run(
        [sys.executable, "-c", "import agentsite.settings"],
        env={**clean, "DEBUG": "1", "AGENTSITE_LOG_FORMAT": "xml"},
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode != 0 and "AGENTSITE_LOG_FORMAT='xml'" in result.stderr


# --- Tracing ----------------------------------------------------------------------------------


def test_a_valid_traceparent_is_continued_and_a_missing_one_started():
    trace_id = uuid.uuid4().hex
    ctx = tracing.incoming({"Traceparent": f"00-{trace_id}-{'ab' * 8}-01"})
    assert format(trace.get_current_span(ctx).get_span_context().trace_id, "032x") == trace_id
    for headers in ({}, {"traceparent": "00-not-a-trace-01"}):
        made_up = trace.get_current_span(tracing.incoming(headers)).get_span_context()
        assert made_up.is_valid and format(made_up.trace_id, "032x") != trace_id


def test_a_step_span_joins_its_runs_trace_whatever_published_its_message(make_agent):
    run = submit_run(agent=make_agent(), input="hi")
    other = tracing.remote_parent(uuid.uuid4().hex)  # e.g. the reconciler's nudge
    with tracing.span("task", parent=other), tracing.run_span(run, "agent.step", step=0):
        assert tracing.current_ids()[0] == run.trace_id
        carrier: dict[str, Any] = {}
        tracing.inject(carrier)
        assert carrier["traceparent"].split("-")[1] == run.trace_id


def test_a_run_takes_the_trace_of_the_request_that_submitted_it(make_agent):
    make_agent(slug="traced")
    _, key = create_api_key(user=User.objects.create_user(username="tracer"))
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {key}")
    trace_id = uuid.uuid4().hex
    response = client.post(
        "/api/v1/runs/",
        {"agent": "traced", "input": "hi"},
        format="json",
        HTTP_TRACEPARENT=f"00-{trace_id}-{'cd' * 8}-01",
    )
    assert response.status_code == 202, response.content
    assert response["X-Trace-Id"] == trace_id
    assert Run.objects.get(pk=response.json()["id"]).trace_id == trace_id

    response = client.post("/api/v1/runs/", {"agent": "traced", "input": "hi"}, format="json")
    run = Run.objects.get(pk=response.json()["id"])
    assert response["X-Trace-Id"] == run.trace_id != trace_id and len(run.trace_id) == 32
