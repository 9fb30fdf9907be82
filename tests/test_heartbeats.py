"""Which queues live workers consume (agentsite/heartbeats.py), and where it is shown: /readyz,
the agentsite_queue_consumers gauge, the admin's run list and page, manage.py stats and
run_agent --wait. These tests use a Redis key prefix of their own, so the session's worker (whose
heartbeat lives under the suite's prefix) is not among the live workers they see."""

from __future__ import annotations

import io
import json
import re
import uuid
from datetime import timedelta
from typing import Any

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.utils import timezone

from agents.models import Run, Step
from agents.services import submit_run
from agentsite import heartbeats
from agentsite.heartbeats import celery_queues
from harness.polling import poll

ALL_QUEUES = ["default", "maintenance", "models", "tools"]


@pytest.fixture(params=["redis", "files"])
def store(request: pytest.FixtureRequest, settings: Any, tmp_path: Any) -> str:
    """Heartbeats in Redis (under a prefix of this test's) or, without Redis, in files."""
    if request.param == "redis":
        if not settings.REDIS_URL:
            pytest.skip("needs Redis: run with `make test`")
        settings.AGENTSITE_REDIS_KEY_PREFIX = f"hb-{uuid.uuid4().hex[:8]}:"
    else:
        settings.REDIS_URL = ""
        settings.DATA_DIR = tmp_path
    return str(request.param)


@pytest.fixture
def no_workers(settings: Any) -> None:
    """No live worker in this test's view (a key prefix no worker writes under)."""
    settings.AGENTSITE_REDIS_KEY_PREFIX = f"hb-{uuid.uuid4().hex[:8]}:"


def test_every_routed_queue_is_declared_so_a_worker_without_q_consumes_it(settings):
    routed = {route["queue"] for route in settings.CELERY_TASK_ROUTES.values()}
    declared = {queue.name: queue for queue in settings.CELERY_TASK_QUEUES}
    assert routed | {settings.CELERY_TASK_DEFAULT_QUEUE} == set(declared) == set(ALL_QUEUES)
    for name, queue in declared.items():
        # As Celery declares a queue it creates on demand: existing bindings keep working.
        assert (queue.exchange.name, queue.routing_key) == (name, name)
    assert celery_queues() == ALL_QUEUES


def test_live_workers_and_the_queues_they_consume(store, settings):
    heartbeats.beat("a@host", ["models", "tools"])
    heartbeats.beat("b@host", ["models"])

    assert heartbeats.live_workers() == [
        heartbeats.Worker("a@host", ("models", "tools")),
        heartbeats.Worker("b@host", ("models",)),
    ]
    assert heartbeats.consumers() == {"default": 0, "maintenance": 0, "models": 2, "tools": 1}
    assert heartbeats.queues_without_consumer() == ["default", "maintenance"]

    heartbeats.beat("a@host", ["models"])  # it stopped consuming tools
    assert heartbeats.consumers()["tools"] == 0
    heartbeats.withdraw("b@host")  # a warm shutdown says so at once
    assert [w.name for w in heartbeats.live_workers()] == ["a@host"]


def test_a_worker_that_stops_beating_is_gone_after_the_ttl(store, settings):
    settings.AGENTSITE_WORKER_HEARTBEAT_TTL = 0.5
    heartbeats.beat("killed@host", ALL_QUEUES)
    assert heartbeats.consumers()["models"] == 1

    poll(lambda: heartbeats.consumers()["models"] == 0, timeout=5, what="the entry to expire")
    assert heartbeats.live_workers() == []


def test_the_redis_keys_are_bounded(settings):
    if not settings.REDIS_URL:
        pytest.skip("needs Redis: run with `make test`")
    import redis

    from agentsite import rediskeys

    settings.AGENTSITE_REDIS_KEY_PREFIX = f"hb-{uuid.uuid4().hex[:8]}:"
    heartbeats.beat("w@host", ["models"])
    client = redis.Redis.from_url(settings.REDIS_URL)
    keys = sorted(k.decode() for k in client.scan_iter(rediskeys.key("*")))
    assert keys == [rediskeys.key("workers"), rediskeys.key("workers:queues")]
    for key in keys:
        assert 0 < client.pttl(key) <= settings.AGENTSITE_WORKER_HEARTBEAT_TTL * 1000


def test_readyz_lists_queues_without_a_consumer_and_stays_ready(client, db, settings):
    if not settings.REDIS_URL:
        pytest.skip("needs Redis: run with `make test`")
    settings.AGENTSITE_REDIS_KEY_PREFIX = f"hb-{uuid.uuid4().hex[:8]}:"
    heartbeats.beat("only-models@host", ["models"])

    response = client.get("/readyz")

    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "ok"
    assert body["queues_without_consumer"] == ["default", "maintenance", "tools"]


def test_the_gauge_counts_live_consumers_per_queue(client, db, settings):
    if not settings.REDIS_URL:
        pytest.skip("needs Redis: run with `make test`")
    settings.AGENTSITE_REDIS_KEY_PREFIX = f"hb-{uuid.uuid4().hex[:8]}:"
    heartbeats.beat("w1@host", ALL_QUEUES)
    heartbeats.beat("w2@host", ["models"])
    settings.AGENTSITE_METRICS_PUBLIC = True

    text = client.get("/metrics").content.decode()

    assert 'agentsite_queue_consumers{queue="models"} 2.0' in text
    assert 'agentsite_queue_consumers{queue="tools"} 1.0' in text


def _queued_run(make_agent: Any, *, age: float) -> Run:
    agent = make_agent(model_route="scripted:x", script=[{"text": "hi"}])
    run = submit_run(agent=agent, input="anyone there?")
    Run.objects.filter(pk=run.pk).update(created_at=timezone.now() - timedelta(seconds=age))
    return Run.objects.get(pk=run.pk)


def test_the_admin_says_when_runs_wait_on_a_queue_no_worker_consumes(
    admin_client, make_agent, no_workers, settings
):
    settings.AGENTSITE_QUEUE_NO_CONSUMER_AFTER = 30
    old = _queued_run(make_agent, age=95)
    _queued_run(make_agent, age=5)  # too young to say anything about

    listing = admin_client.get("/admin/agents/run/").content.decode()
    page = admin_client.get(f"/admin/agents/run/{old.pk}/change/").content.decode()

    assert re.search(r"1 run has waited up to 9\d s on the queue &#x27;models&#x27;", listing)
    assert "no live worker consumes" in listing
    assert re.search(r"This run has waited 9\d s on the queue &#x27;models&#x27;", page)

    heartbeats.beat("w@host", ALL_QUEUES)  # a worker comes: nothing to say
    assert "no live worker" not in admin_client.get("/admin/agents/run/").content.decode()
    page = admin_client.get(f"/admin/agents/run/{old.pk}/change/").content.decode()
    assert "no live worker" not in page


def test_a_pending_tool_call_waits_on_the_tools_queue(admin_client, make_agent, no_workers):
    heartbeats.beat("models-only@host", ["models"])
    run = _queued_run(make_agent, age=120)
    Run.objects.filter(pk=run.pk).update(status=Run.Status.RUNNING)
    Step.objects.create(run=run, index=0, kind=Step.Kind.TOOL, status=Step.Status.PENDING)
    Step.objects.filter(run=run).update(created_at=timezone.now() - timedelta(seconds=60))

    page = admin_client.get(f"/admin/agents/run/{run.pk}/change/").content.decode()

    assert re.search(r"This run has waited 6\d s on the queue &#x27;tools&#x27;", page)


def test_stats_shows_the_workers_per_queue_and_the_runs_waiting(make_agent, no_workers, settings):
    settings.AGENTSITE_QUEUE_NO_CONSUMER_AFTER = 30
    heartbeats.beat("w@host", ["tools", "maintenance", "default"])
    _queued_run(make_agent, age=300)

    out = io.StringIO()
    call_command("stats", stdout=out)
    text = out.getvalue()
    assert "Queues now" in text
    assert "no live worker consumes models: 1 runs have waited on it more than 30 s" in text

    out = io.StringIO()
    call_command("stats", "--json", stdout=out)
    queues = json.loads(out.getvalue())["queues"]
    assert queues["models"]["consumers"] == 0 and queues["models"]["runs_waiting"] == 1
    assert queues["tools"] == {"consumers": 1, "runs_waiting": 0, "oldest_waiting_since": None}


def test_run_agent_wait_says_within_seconds_that_no_worker_consumes_the_queue(
    make_agent, no_workers
):
    agent = make_agent(model_route="scripted:x", script=[{"text": "hi"}])
    out, err = io.StringIO(), io.StringIO()

    with pytest.raises(CommandError, match="still queued after 5s"):
        call_command("run_agent", agent.slug, "hello", wait=True, timeout=5, stdout=out, stderr=err)

    assert "on the queue 'models', which no live worker consumes" in err.getvalue()
    assert "Still waiting." in err.getvalue()


def test_a_running_run_whose_next_model_turn_is_due_waits_on_models(
    admin_client, make_agent, no_workers, settings
):
    settings.AGENTSITE_QUEUE_NO_CONSUMER_AFTER = 30
    heartbeats.beat("tools-only@host", ["tools"])
    run = _queued_run(make_agent, age=300)
    long_ago = timezone.now() - timedelta(seconds=90)
    Run.objects.filter(pk=run.pk).update(status=Run.Status.RUNNING, started_at=long_ago)
    Step.objects.create(
        run=run, index=0, kind=Step.Kind.TOOL, status=Step.Status.SUCCEEDED, finished_at=long_ago
    )
    # A run whose model turn is executing is in hand, not waiting.
    busy = _queued_run(make_agent, age=300)
    Run.objects.filter(pk=busy.pk).update(status=Run.Status.RUNNING, started_at=long_ago)
    Step.objects.create(run=busy, index=0, kind=Step.Kind.MODEL, status=Step.Status.RUNNING)

    page = admin_client.get(f"/admin/agents/run/{run.pk}/change/").content.decode()
    listing = admin_client.get("/admin/agents/run/").content.decode()
    busy_page = admin_client.get(f"/admin/agents/run/{busy.pk}/change/").content.decode()

    assert re.search(r"This run has waited 9\d s on the queue &#x27;models&#x27;", page)
    assert re.search(r"1 run has waited up to 9\d s on the queue &#x27;models&#x27;", listing)
    assert "no live worker" not in busy_page


def test_readyz_says_null_when_the_heartbeats_cannot_be_read(client, db, settings):
    # The broker answers, the store of heartbeats does not: unknown is not "every queue served".
    settings.REDIS_URL = "redis://127.0.0.1:1/0"

    response = client.get("/readyz")

    assert response.status_code == 200
    assert response.json()["queues_without_consumer"] is None
