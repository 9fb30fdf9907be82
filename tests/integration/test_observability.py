"""Observability end to end: a worker process and an API server that export spans over OTLP to
a stand-in collector, write JSON logs, and serve Prometheus metrics; runs submitted over HTTP.

The session's worker stops consuming ``models`` and ``tools`` while this module runs, so every
step is performed by the observed worker.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import uuid
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
from django.conf import settings
from django.contrib.auth.models import User
from prometheus_client.parser import text_string_to_metric_families

from agents.models import ModelPrice, Run, Step
from agents.services import create_api_key
from agentsite import breaker
from approvals.models import Approval
from approvals.services import decide
from harness.polling import poll
from harness.processes import free_port, start_api, stop_process
from tests.otlp_collector import OtlpCollector
from tests.support.processes import ApiServer, WorkerProcess, start_api_server, suite_database_url

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(url: str, **headers: str) -> Samples:
    """Every sample of a /metrics page, keyed by (name, sorted labels)."""
    response = httpx.get(url, headers=headers, timeout=10)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    found: Samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum of ``name`` over the series whose labels include ``labels``."""
    wanted = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and wanted <= set(ls))


@pytest.fixture(scope="module")
def collector() -> Iterator[OtlpCollector]:
    found = OtlpCollector()
    yield found
    found.close()


def _otel_env(collector: OtlpCollector) -> dict[str, str]:
    return {
        "OTEL_EXPORTER_OTLP_ENDPOINT": collector.endpoint,
        "OTEL_BSP_SCHEDULE_DELAY": "100",  # ms: spans reach the collector promptly
        "AGENTSITE_LOG_FORMAT": "json",
    }


@pytest.fixture(scope="module")
def observed_worker(
    celery_worker: WorkerProcess,
    collector: OtlpCollector,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[WorkerProcess, str]]:
    """A worker exporting spans, logging JSON and serving metrics; (worker, metrics URL)."""

    celery_worker.hold("models", "tools")
    port = free_port()
    env = {
        **celery_worker.env,
        **_otel_env(collector),
        "AGENTSITE_WORKER_METRICS_PORT": str(port),
    }
    if celery_worker.pool == "prefork":  # the children do the work (README, Observability)
        env["PROMETHEUS_MULTIPROC_DIR"] = str(tmp_path_factory.mktemp("worker-metrics"))
    name = f"observed-{os.getpid()}@{socket.gethostname()}"
    log = tmp_path_factory.mktemp("observed-worker") / "worker.log"
    log.write_bytes(b"")
    command = [
        sys.executable, "-m", "celery", "-A", "agentsite", "worker",
        "-P", celery_worker.pool, "-Q", "models,tools",
        "--concurrency", "20" if celery_worker.pool == "gevent" else "4",
        "--loglevel", "INFO", "-n", name, "--without-gossip", "--without-mingle",
    ]  # fmt: skip
    worker = WorkerProcess(command, env, name, log, celery_worker.pool)
    try:
        worker.wait_ready()
        url = f"http://127.0.0.1:{port}/metrics"
        poll(lambda: _answers(url), timeout=15, what="the worker's metrics endpoint")
        yield worker, url
    finally:
        stop_process(worker.process, grace=30)
        celery_worker.release("models", "tools")


@pytest.fixture(autouse=True)
def closed_circuit() -> None:
    """The timeouts of one test open dawdle's circuit (3 failures): the next starts closed."""
    breaker.reset("dawdle")


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.fixture(scope="module")
def observed_api(
    django_db_setup: None, collector: OtlpCollector, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ApiServer]:
    """The API exporting spans and writing JSON logs at INFO, with a metrics token."""
    server = start_api_server(
        tmp_path_factory.mktemp("observed-api") / "uvicorn.log",
        log_level="info",
        AGENTSITE_METRICS_TOKEN="scrape-token",
        **_otel_env(collector),
    )
    try:
        yield server
    finally:
        stop_process(server.process, grace=15)


def web_lines(server: ApiServer) -> list[dict[str, Any]]:
    return _json_lines(server.log)


def _json_lines(path: Path) -> list[dict[str, Any]]:
    found = []
    for line in path.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            found.append(json.loads(line))  # a line that is not JSON fails the test here
    return found


def client(web: ApiServer) -> httpx.Client:
    user = User.objects.create_user(username=f"obs-{uuid.uuid4().hex[:8]}")
    _, plain = create_api_key(user=user, name="observability tests")
    return httpx.Client(
        base_url=web.base_url, headers={"Authorization": f"Bearer {plain}"}, timeout=10
    )


def wait_final(run_id: Any, timeout: float = 60.0) -> Run:
    return poll(
        lambda: (run := Run.objects.get(pk=run_id)).is_final and run,
        timeout=timeout,
        what=f"run {run_id} to finish",
    )


def test_counters_move_by_what_the_runs_did(observed_worker, observed_api, make_agent):
    _, worker_metrics = observed_worker
    route = f"scripted:obs-{uuid.uuid4().hex[:8]}"
    ModelPrice.objects.create(
        route=route, input_per_million=Decimal("2.5"), output_per_million=Decimal("10")
    )
    slug = f"obs-{uuid.uuid4().hex[:8]}"
    make_agent(
        slug=slug,
        model_route=route,
        grants=["dawdle"],
        script=[
            # Two calls in parallel and one that overruns its 1 s limit (a timeout, no retry).
            {
                "tool_calls": [
                    {"name": "dawdle", "arguments": {"seconds": 0.05}},
                    {"name": "dawdle", "arguments": {"seconds": 0.1}},
                    {"name": "dawdle", "arguments": {"seconds": 5}},
                ]
            },
            {"text": "done: {tool_results}"},
        ],
    )
    token = {"Authorization": "Bearer scrape-token"}
    web_metrics = f"{observed_api.base_url}/metrics"
    assert httpx.get(web_metrics, timeout=5).status_code == 401  # a token is set
    worker_before, web_before = scrape(worker_metrics), scrape(web_metrics, **token)

    runs = 3
    with client(observed_api) as http:
        ids = []
        for i in range(runs):
            response = http.post("/api/v1/runs/", json={"agent": slug, "input": f"go {i}"})
            assert response.status_code == 202, response.text
            ids.append(response.json()["id"])
    finished = [wait_final(run_id) for run_id in ids]
    assert all(run.status == Run.Status.SUCCEEDED for run in finished), [r.error for r in finished]

    # Counted once the audit events commit: read until the last run's events are in.
    def moved() -> Samples | None:
        now = scrape(worker_metrics)
        done = value(now, "agentsite_runs_finished_total", agent=slug, status="succeeded")
        return now if done >= runs else None

    after = poll(moved, timeout=10, what="the worker's counters to include every run")
    web_after = scrape(web_metrics, **token)

    def delta(name: str, **labels: str) -> float:
        return total(after, name, **labels) - total(worker_before, name, **labels)

    steps = Step.objects.filter(run_id__in=ids)
    model_steps = steps.filter(kind=Step.Kind.MODEL)
    assert model_steps.count() == 2 * runs
    assert delta("agentsite_runs_finished_total", agent=slug, status="succeeded") == runs
    assert delta("agentsite_model_tokens_total", agent=slug, direction="input") == sum(
        s.input_tokens for s in model_steps
    )
    assert delta("agentsite_model_tokens_total", agent=slug, direction="output") == sum(
        s.output_tokens for s in model_steps
    )
    cost = sum(run.cost for run in finished)
    assert cost > 0
    assert delta("agentsite_model_cost_total", agent=slug, model=route) == pytest.approx(
        float(cost), rel=1e-6
    )
    model_label = {"kind": "model", "model": route, "tool": ""}
    assert delta("agentsite_step_duration_seconds_count", **model_label) == 2 * runs
    assert delta("agentsite_tool_calls_total", tool="dawdle", outcome="succeeded") == 2 * runs
    assert delta("agentsite_tool_calls_total", tool="dawdle", outcome="failed") == runs
    assert delta("agentsite_tool_errors_total", tool="dawdle", type="timeout") == runs
    assert delta("agentsite_step_duration_seconds_count", kind="tool", tool="dawdle") == 3 * runs
    # Each tool call was one message, timed from its publication to its start.
    assert delta("agentsite_task_wait_seconds_count", task="tools.execute_tool_call") == 3 * runs
    assert delta("agentsite_task_wait_seconds_count", task="agents.advance_run") >= 2 * runs
    # The timed-out calls took about their 1 s limit: the histogram's sum says so.
    tool_seconds = delta("agentsite_step_duration_seconds_sum", kind="tool", tool="dawdle")
    assert 1.0 * runs <= tool_seconds < 1.0 * runs + 2.0

    # The web process counted the submissions and the requests, not the steps.
    def web_delta(name: str, **labels: str) -> float:
        return total(web_after, name, **labels) - total(web_before, name, **labels)

    assert web_delta("agentsite_runs_submitted_total", agent=slug) == runs
    assert (
        web_delta(
            "agentsite_http_requests_total",
            method="POST",
            route="/api/v1/runs/",
            status="202",
        )
        == runs
    )
    assert web_delta("agentsite_runs_finished_total", agent=slug) == 0
    # State gauges are served by the web process only.
    assert ("agentsite_celery_queue_length", (("queue", "models"),)) in web_after
    assert not any(name == "agentsite_celery_queue_length" for name, _ in after)


def test_approvals_pending_and_decided_are_measured(observed_worker, observed_api, make_agent):
    _, worker_metrics = observed_worker
    slug = f"obs-review-{uuid.uuid4().hex[:8]}"
    make_agent(
        slug=slug,
        grants={"dawdle": "require_approval"},
        script=[
            {"tool_calls": [{"name": "dawdle", "arguments": {"seconds": 0}}]},
            {"text": "ok"},
        ],
    )
    token = {"Authorization": "Bearer scrape-token"}
    web_metrics = f"{observed_api.base_url}/metrics"
    with client(observed_api) as http:
        response = http.post("/api/v1/runs/", json={"agent": slug, "input": "go"})
        assert response.status_code == 202, response.text
        run_id = response.json()["id"]
    run = poll(
        lambda: (
            (run := Run.objects.get(pk=run_id)).status != Run.Status.QUEUED
            and run.status != Run.Status.RUNNING
            and run
        ),
        what="the run to wait for a reviewer",
    )
    assert run.status == Run.Status.WAITING_APPROVAL, (
        run.status,
        run.error,
        list(run.steps.values_list("kind", "status", "tool_name", "error")),
        list(run.audit_events.values_list("action", "payload")),
    )
    pending = scrape(web_metrics, **token)
    assert value(pending, "agentsite_approvals_pending", agent=slug) == 1
    age = value(pending, "agentsite_approvals_oldest_pending_age_seconds", agent=slug)
    approval = Approval.objects.get(run_id=run_id)
    assert 0 <= age < 60
    assert value(pending, "agentsite_runs_active", status="waiting_approval") >= 1

    decide(approval.pk, decision="approve", user=None, system="observability-test")
    assert wait_final(run_id).status == Run.Status.SUCCEEDED
    after = scrape(web_metrics, **token)
    assert value(after, "agentsite_approvals_pending", agent=slug) == 0
    worker = scrape(worker_metrics)
    requested = {"agent": slug, "reason": "tool_requires_approval"}
    assert value(worker, "agentsite_approvals_requested_total", **requested) == 1
    # Decided in this process (a reviewer's request would count it in the web process).
    assert value(worker, "agentsite_approvals_decided_total", agent=slug, outcome="approved") == 0


def test_one_trace_from_the_request_to_every_step(
    observed_worker, observed_api, collector, make_agent
):
    worker, _ = observed_worker
    slug = f"obs-trace-{uuid.uuid4().hex[:8]}"
    make_agent(
        slug=slug,
        grants=["dawdle"],
        script=[
            {
                "tool_calls": [
                    {"name": "dawdle", "arguments": {"seconds": 0.05}},
                    {"name": "dawdle", "arguments": {"seconds": 0.05}},
                ]
            },
            {"text": "done"},
        ],
    )
    trace_id = uuid.uuid4().hex
    parent = uuid.uuid4().hex[:16]
    with client(observed_api) as http:
        response = http.post(
            "/api/v1/runs/",
            json={"agent": slug, "input": "trace me"},
            headers={"traceparent": f"00-{trace_id}-{parent}-01"},
        )
    assert response.status_code == 202, response.text
    assert response.headers["X-Trace-Id"] == trace_id
    run = wait_final(response.json()["id"])
    assert run.status == Run.Status.SUCCEEDED, run.error
    assert run.trace_id == trace_id and response.json()["trace_id"] == trace_id

    # Spans: the request in the web process (the client's span its parent), then the tasks,
    # steps, the model calls and the tool calls in the worker, all in the client's trace.
    def all_spans() -> list[Any] | None:
        spans = collector.of_trace(trace_id)
        names = [s.name for s in spans]
        enough = names.count("tool.call") == 2 and names.count("model.call") == 2
        return spans if enough and names.count("agent.step") == 4 else None

    spans = poll(all_spans, timeout=20, what="the run's spans at the collector")
    request = [s for s in spans if s.service == "agentsite-web"]
    assert [s.name for s in request] == ["POST /api/v1/runs/"]
    assert request[0].parent_span_id == parent
    assert run.trace_span_id == request[0].span_id
    in_worker = {s.name for s in spans if s.service == "agentsite-worker"}
    assert {
        "celery.task agents.advance_run",
        "celery.task tools.execute_tool_call",
        "agent.step",
        "model.call",
        "tool.call",
    } <= in_worker
    by_id = {s.span_id: s for s in spans}
    for call in (s for s in spans if s.name in ("model.call", "tool.call")):
        step = by_id[call.parent_span_id]  # a call's parent is its step, in the same trace
        assert step.name == "agent.step"
        assert step.attributes["agentsite.run_id"] == str(run.pk)
    # The first task's span continues the request's (the message's traceparent header).
    first_task = [s for s in spans if s.name == "celery.task agents.advance_run"]
    assert any(s.parent_span_id == request[0].span_id for s in first_task)

    # Logs: the web process's line about the submission and the worker's lines about the
    # steps all carry the run's id and its trace id.
    def worker_lines() -> list[dict[str, Any]] | None:
        found = [line for line in _json_lines(worker.log) if line.get("run_id") == str(run.pk)]
        steps = {line.get("step") for line in found if "latency_ms" in line}
        return found if {0, 1, 2, 3} <= steps else None

    lines = poll(worker_lines, timeout=10, what="the worker's log lines about the run's steps")
    assert all(line["trace_id"] == trace_id for line in lines), lines
    assert all(line["service"] == "worker" and line["agent"] == slug for line in lines)
    about_run = [line for line in web_lines(observed_api) if line.get("run_id") == str(run.pk)]
    assert about_run, observed_api.log.read_text()[-2000:]
    assert all(line["trace_id"] == trace_id and line["service"] == "web" for line in about_run)
    # The request's own line (the access log), with its trace, pattern, status and time.
    access = [
        line
        for line in web_lines(observed_api)
        if line.get("logger") == "agentsite.request" and line.get("trace_id") == trace_id
    ]
    assert len(access) == 1, access
    # uvicorn's own access log (no trace id) is off: one line per request, not two.
    assert not [line for line in web_lines(observed_api) if line.get("logger") == "uvicorn.access"]
    assert access[0]["route"] == "/api/v1/runs/" and access[0]["status"] == 202
    assert access[0]["duration_ms"] > 0


def test_every_gunicorn_worker_answers_for_all_of_them(django_db_setup, tmp_path):
    """The web service as deployed (gunicorn, two uvicorn workers, gunicorn.conf.py): whichever
    worker a scrape reaches, it reports the requests that both served."""
    import tempfile
    from concurrent.futures import ThreadPoolExecutor

    env = {
        **{k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"},
        "DATABASE_URL": suite_database_url(),
        "CELERY_BROKER_URL": settings.CELERY_BROKER_URL,
    }
    server = start_api(workers=2, env=env, logs=tmp_path)  # as deployed: gunicorn.conf.py
    process = server.process.popen
    base = server.base_url
    # gunicorn.conf.py gives this gunicorn a directory of its own (named by the master's pid).
    metrics_dir = Path(tempfile.gettempdir()) / f"agentsite-metrics-web-{process.pid}"
    try:
        before = value(scrape(f"{base}/metrics"), *HEALTHZ[0], **HEALTHZ[1])

        def hit(_: int) -> int:
            with httpx.Client(base_url=base, timeout=10) as http:
                return http.get("/healthz").status_code

        # The kernel decides which worker accepts a connection, and one that is still booting or
        # busy may get none of a batch: send batches until both have served some (each writes its
        # own file), within a deadline.
        sent = 0

        def both_served() -> bool:
            nonlocal sent
            with ThreadPoolExecutor(max_workers=8) as pool:
                assert set(pool.map(hit, range(40))) == {200}
            sent += 40
            writers = {p.stem.rpartition("_")[2] for p in metrics_dir.glob("counter_*.db")}
            return len(writers) == 2

        poll(both_served, timeout=60, what="both gunicorn workers serving requests")
        # ...and every scrape, whichever worker answers it, counts all that were sent.
        for _ in range(6):
            counted = value(scrape(f"{base}/metrics"), *HEALTHZ[0], **HEALTHZ[1])
            assert counted - before == sent
    finally:
        stop_process(process, grace=15)
    assert not metrics_dir.exists()  # removed when gunicorn exits


HEALTHZ = (
    ("agentsite_http_requests_total",),
    {"method": "GET", "route": "/healthz", "status": "200"},
)
