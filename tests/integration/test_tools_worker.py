"""Tool execution on a real Celery worker: parallel calls, retries, the circuit breaker and a
worker killed in the middle of a side effect."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

from agents.models import Run, Step
from agents.reconciler import reconcile_stalled_runs
from agents.services import submit_run
from agentsite import breaker
from audittrail.models import AuditEvent
from harness.polling import poll
from tools.models import OutboxMessage

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]

LOCAL = {"url": {"hosts": ["127.0.0.1:*"]}}  # the worker allows loopback (tests/conftest.py)


class Upstream(BaseHTTPRequestHandler):
    """/slow?ms=N answers after N ms; /flaky?key=K fails twice per key, then answers;
    /down always fails; /ok answers at once."""

    hits: Counter[str] = Counter()
    lock = threading.Lock()

    def do_GET(self) -> None:  # noqa: N802
        parts = urlsplit(self.path)
        query = {k: v[0] for k, v in parse_qs(parts.query).items()}
        status = 200
        if parts.path == "/slow":
            time.sleep(int(query.get("ms", "0")) / 1000)
        elif parts.path == "/flaky":
            with self.lock:
                self.hits[query["key"]] += 1
                status = 503 if self.hits[query["key"]] <= 2 else 200
        elif parts.path == "/down":
            status = 503
        body = f"{parts.path} says {status}".encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def upstream() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Upstream)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.fixture(autouse=True)
def closed_circuits() -> None:
    for name in ("http_get", "slow_notify"):
        breaker.reset(name)


def wait_final(run_id: object, timeout: float = 60.0) -> Run:
    return poll(
        lambda: (run := Run.objects.get(pk=run_id)).is_final and run,
        timeout=timeout,
        what=f"run {run_id} to finish",
    )


def get_calls(*urls: str) -> list[dict]:
    return [
        {"tool_calls": [{"name": "http_get", "arguments": {"url": url}} for url in urls]},
        {"text": "{tool_results}"},
    ]


def test_independent_calls_of_one_turn_run_concurrently(celery_worker, make_agent, upstream):
    agent = make_agent(
        grants={"http_get": {"constraints": LOCAL}},
        script=get_calls(f"{upstream}/slow?ms=1500&n=1", f"{upstream}/slow?ms=1500&n=2"),
    )

    run = wait_final(submit_run(agent=agent, input="fetch both").pk)

    assert run.status == Run.Status.SUCCEEDED, run.error
    first, second = Step.objects.filter(run=run, kind=Step.Kind.TOOL).order_by("index")
    assert first.status == second.status == Step.Status.SUCCEEDED
    assert min(first.latency_ms, second.latency_ms) >= 1500
    # Both were in flight at once, and the turn took about one call, not two.
    assert first.started_at < second.finished_at and second.started_at < first.finished_at
    span = max(first.finished_at, second.finished_at) - min(first.started_at, second.started_at)
    one_call = max(first.latency_ms, second.latency_ms) / 1000
    assert span.total_seconds() < 1.5 * one_call, (span, one_call)


def test_a_tool_that_fails_twice_then_succeeds_is_retried(celery_worker, make_agent, upstream):
    agent = make_agent(
        grants={"http_get": {"constraints": LOCAL}},
        script=get_calls(f"{upstream}/flaky?key={os.getpid()}-{time.monotonic_ns()}"),
    )

    run = wait_final(submit_run(agent=agent, input="try").pk)

    assert run.status == Run.Status.SUCCEEDED, run.error
    step = Step.objects.get(run=run, kind=Step.Kind.TOOL)
    assert step.status == Step.Status.SUCCEEDED and step.attempts == 3
    assert step.response["status"] == 200 and "/flaky says 200" in step.response["text"]
    retries = AuditEvent.objects.filter(run=run, action="step.retry_scheduled")
    assert retries.count() == 2
    assert all("503" in event.payload["error"] for event in retries)


def test_the_breaker_opens_after_repeated_failures_and_closes_after_a_probe(
    celery_worker, make_agent, upstream
):
    # The worker runs with AGENTSITE_BREAKER_FAILURES=3 and AGENTSITE_BREAKER_COOLDOWN=2.
    # http_get has 2 retries: one call to /down fails 3 times, which opens the circuit, and
    # the model's next call to the tool is short-circuited without reaching the upstream.
    agent = make_agent(
        grants={"http_get": {"constraints": LOCAL}},
        script=[
            {"tool_calls": [{"name": "http_get", "arguments": {"url": f"{upstream}/down"}}]},
            {"tool_calls": [{"name": "http_get", "arguments": {"url": f"{upstream}/ok"}}]},
            {"text": "{tool_results}"},
        ],
    )
    run = wait_final(submit_run(agent=agent, input="go").pk)

    down, blocked = Step.objects.filter(run=run, kind=Step.Kind.TOOL).order_by("index")
    assert down.status == Step.Status.FAILED and down.attempts == 3
    assert blocked.status == Step.Status.FAILED and blocked.attempts == 0
    assert "temporarily unavailable after repeated failures" in blocked.error
    assert AuditEvent.objects.filter(run=run, action="tool_call.short_circuited").exists()
    assert breaker.status("http_get").state in ("open", "half_open")

    # After the cool-down one probe goes through; it succeeds, so the circuit closes.
    poll(
        lambda: breaker.status("http_get").state == "half_open",
        timeout=10,
        what="the cool-down to end",
    )
    agent_ok = make_agent(
        grants={"http_get": {"constraints": LOCAL}}, script=get_calls(f"{upstream}/ok")
    )
    probe = wait_final(submit_run(agent=agent_ok, input="probe").pk)
    step = Step.objects.get(run=probe, kind=Step.Kind.TOOL)
    assert step.status == Step.Status.SUCCEEDED, step.error
    assert breaker.status("http_get").state == "closed"


def test_a_worker_killed_mid_side_effect_leaves_exactly_one_outbox_row(
    celery_worker, make_agent, tmp_path, settings
):
    marker = tmp_path / "pid"
    agent = make_agent(
        grants={"slow_notify": "allow"},
        script=[
            {
                "tool_calls": [
                    {"name": "slow_notify", "arguments": {"message": "hi", "marker": str(marker)}}
                ]
            },
            {"text": "{last_tool_result}"},
        ],
    )
    run = submit_run(agent=agent, input="notify")

    # The tool has recorded its side effect and is still running: kill its process.
    poll(marker.exists, timeout=30, what="the tool to record its side effect")
    pid = int(Path(marker).read_text())
    assert OutboxMessage.objects.filter(run_id=run.pk).count() == 1
    os.kill(pid, signal.SIGKILL)
    if pid == celery_worker.process.pid:
        # A gevent worker runs its tasks in its own process: the whole worker died (prefork
        # loses only a child). Its unacknowledged message waits in Redis for the visibility
        # timeout; the reconciler must not.
        celery_worker.process.wait()
        celery_worker.restart()

    # The lost call is taken over once its lease expires (the reconciler, as beat would run
    # it, re-dispatches it with the same idempotency key).
    settings.AGENTSITE_STALLED_AFTER = 0

    def finished() -> Run | None:
        reconcile_stalled_runs()
        run.refresh_from_db()
        return run if run.is_final else None

    done = poll(finished, timeout=60, interval=0.5, what="the run to finish after the kill")

    assert done.status == Run.Status.SUCCEEDED, done.error
    step = Step.objects.get(run=run, kind=Step.Kind.TOOL)
    assert step.status == Step.Status.SUCCEEDED and step.attempts == 2
    assert step.response["duplicate"] is True and step.response["attempt"] == 2
    rows = OutboxMessage.objects.filter(run_id=run.pk)
    assert rows.count() == 1
    assert rows.get().idempotency_key == step.idempotency_key
