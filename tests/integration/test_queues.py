"""A worker started the way Celery documents it (``celery -A agentsite worker``, no ``-Q``)
consumes every queue the project routes to, says so in its heartbeat while it lives, and
withdraws it when it stops; a queue a worker stops consuming shows in /readyz."""

from __future__ import annotations

import os
import socket
import sys

import pytest

from agents.models import Run
from agents.services import submit_run
from agentsite import heartbeats
from harness.polling import poll
from harness.processes import stop_process
from tests.support.processes import WorkerProcess

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]

ALL_QUEUES = ("default", "maintenance", "models", "tools")


def _queues_of(name: str) -> tuple[str, ...] | None:
    for worker in heartbeats.live_workers():
        if worker.name == name:
            return worker.queues
    return None


def test_a_worker_without_q_serves_every_queue(celery_worker, make_agent, tmp_path):
    celery_worker.hold(*ALL_QUEUES)  # only the new worker may run this test's steps
    name = f"plain-{os.getpid()}@{socket.gethostname()}"
    log = tmp_path / "worker.log"
    command = [
        sys.executable, "-m", "celery", "-A", "agentsite", "worker",
        "-P", "solo", "-n", name, "--without-gossip", "--without-mingle", "--loglevel", "INFO",
    ]  # fmt: skip
    assert "-Q" not in command
    worker = WorkerProcess(command, celery_worker.env, name, log, "solo")
    try:
        worker.wait_ready()
        poll(lambda: _queues_of(name) == ALL_QUEUES, timeout=15, what="the worker's heartbeat")
        agent = make_agent(
            model_route="scripted:plain",
            script=[
                {"tool_calls": [{"name": "calculator", "arguments": {"expression": "6 * 7"}}]},
                {"text": "{last_tool_result}"},
            ],
            tools=["calculator"],
        )
        run = submit_run(agent=agent, input="what is six times seven?")
        finished = poll(
            lambda: (r := Run.objects.get(pk=run.pk)).is_final and r, timeout=30, what="the run"
        )
        assert finished.status == Run.Status.SUCCEEDED, (finished.error_code, finished.error)
        assert "42" in str(finished.result)
    finally:
        stop_process(worker.process, grace=30)
        celery_worker.release(*ALL_QUEUES)
    # A warm shutdown withdraws the heartbeat at once, not a TTL later.
    assert _queues_of(name) is None


def test_readyz_names_a_queue_no_live_worker_consumes(celery_worker, client):
    poll(lambda: _queues_of(celery_worker.name) == ALL_QUEUES, timeout=15, what="a heartbeat")
    assert client.get("/readyz").json()["queues_without_consumer"] == []

    celery_worker.hold("tools")
    try:
        poll(
            lambda: client.get("/readyz").json()["queues_without_consumer"] == ["tools"],
            timeout=15,
            what="readyz to name the tools queue",
        )
        response = client.get("/readyz")
        assert response.status_code == 200 and response.json()["status"] == "ok"
    finally:
        celery_worker.release("tools")
    poll(
        lambda: client.get("/readyz").json()["queues_without_consumer"] == [],
        timeout=15,
        what="the tools queue to be consumed again",
    )
