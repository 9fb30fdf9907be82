"""Faults around the worker process itself, on a real worker, Redis and Postgres: a warm
shutdown (SIGTERM) in the middle of a model call, and messages the worker cannot run (an
unknown task, a body that is not JSON or not a task body, arguments the task cannot take).
Work in flight must be finished, not dropped; a message the worker cannot run must be logged
and dropped (acked or rejected: neither left in Redis nor redelivered in a loop); and the
worker must go on with normal runs.

Two malformed bodies used to stop the worker or stay unacked inside Celery; the project's
request class (``agentsite.celery.CheckedRequest``) now refuses them as invalid messages."""

from __future__ import annotations

import json
import os
import signal
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import Any

import pytest
import redis
from django.conf import settings

from agents.models import Run, Step
from agents.services import submit_run
from agentsite import rediskeys
from agentsite.celery import app
from harness.polling import poll
from tests.support.processes import WorkerProcess

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]

# kombu's Redis transport: a delivered message waits in this hash until it is acked.
UNACKED = b"unacked"
TASK_OF = {Step.Kind.MODEL: "agents.advance_run", Step.Kind.TOOL: "tools.execute_tool_call"}


def unique_model(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def wait_final(run_id: Any, timeout: float = 60.0) -> Run:
    def final() -> Run | None:
        run = Run.objects.get(pk=run_id)
        return run if run.is_final else None

    run = poll(final, timeout=timeout, what=f"run {run_id} to finish")
    assert run is not None
    return run


def broker() -> Any:
    """A client of the broker's Redis database (typed Any: redis-py's stubs mix in async)."""
    return redis.Redis.from_url(settings.CELERY_BROKER_URL)


def worker_log(worker: WorkerProcess) -> str:
    return worker.log.read_text(errors="replace")


@dataclass(frozen=True)
class BrokerMessage:
    key: str  # the Redis list (a queue), or "unacked"
    task: str
    id: str
    argsrepr: str


def _message(envelope: Any, key: str) -> BrokerMessage:
    headers = envelope.get("headers") or {}
    return BrokerMessage(
        key=key,
        task=str(headers.get("task")),
        id=str(headers.get("id")),
        argsrepr=str(headers.get("argsrepr")),
    )


def broker_messages() -> list[BrokerMessage]:
    """Every task message Redis holds under the suite's key prefix (kombu's global_keyprefix):
    waiting in a queue (its name without the prefix), or delivered and not yet acked."""
    client = broker()
    prefix = rediskeys.broker_key("").encode()
    found = []
    for key in client.scan_iter(match=prefix + b"*", count=1000):
        name = key[len(prefix) :]
        kind = client.type(key)
        if kind == b"list":
            for raw in client.lrange(key, 0, -1):
                try:
                    envelope = json.loads(raw)
                except ValueError:
                    continue
                if isinstance(envelope, dict):
                    found.append(_message(envelope, name.decode()))
        elif kind == b"hash" and name == UNACKED:
            for raw in client.hvals(key):
                envelope, _exchange, _routing_key = json.loads(raw)
                found.append(_message(envelope, UNACKED.decode()))
    return found


def held_by_broker(task_id: str) -> list[BrokerMessage]:
    return [m for m in broker_messages() if m.id == task_id]


def publish_raw(body: bytes, *, task: str = "agents.advance_run", task_id: str) -> None:
    """Publish to the ``models`` queue a task message with genuine Celery headers (protocol 2)
    and the given body, exactly as bytes, bypassing Celery's serializer."""
    queue = app.amqp.queues["models"]  # created from task_routes: exchange and key "models"
    message = app.amqp.create_task_message(task_id, task, (), {})
    with app.connection_for_write() as conn:
        conn.Producer().publish(
            body,
            exchange=queue.exchange,
            routing_key=queue.routing_key,
            declare=[queue],
            content_type="application/json",
            content_encoding="utf-8",
            headers=message.headers,
            correlation_id=task_id,
            retry=True,
        )


def assert_worker_still_runs_agents(worker: WorkerProcess, make_agent: Any) -> None:
    agent = make_agent(script=[{"text": "still working: {input}"}])
    run = wait_final(submit_run(agent=agent, input="after the fault").pk)
    assert run.status == Run.Status.SUCCEEDED, (run.error, worker.log_tail())
    assert run.result == "still working: after the fault"


def test_sigterm_finishes_the_model_call_in_flight_and_acks_nothing_undone(
    celery_worker, fake_openai, make_agent
):
    model = unique_model("sigterm")
    fake_openai.configure(
        model=model,
        latency_ms=3000,
        tool_calls=[[{"name": "calculator", "arguments": {"expression": "6*7"}}]],
        final="done: {tool_results}",
    )
    agent = make_agent(model_route=f"fake:{model}", tools=["calculator"])
    run_id = submit_run(agent=agent, input="multiply").pk
    process = celery_worker.process
    try:
        step = poll(
            lambda: Step.objects.filter(
                run_id=run_id, kind=Step.Kind.MODEL, status=Step.Status.RUNNING
            ).first(),
            what="the model step to start",
        )
        # The request is at the fake server, which answers it 3 s later: the call is in flight.
        poll(lambda: fake_openai.count(model) == 1, what="the model call to reach the server")

        process.send_signal(signal.SIGTERM)

        poll(
            lambda: process.poll() is not None,
            timeout=30,
            interval=0.1,
            what="the worker to exit after SIGTERM",
        )
        assert process.returncode == 0, celery_worker.log_tail()
        # The worker is gone: whatever is recorded now, it recorded while shutting down. The
        # call in flight was finished and recorded, not dropped, and made once.
        step.refresh_from_db()
        assert (step.status, step.attempts, step.error) == (Step.Status.SUCCEEDED, 1, ""), (
            celery_worker.log_tail()
        )
        steps = list(Step.objects.filter(run_id=run_id).order_by("index"))
        model_attempts = sum(s.attempts for s in steps if s.kind == Step.Kind.MODEL)
        assert fake_openai.count(model) == model_attempts
        # Nothing acked that was not done, nothing done left to redeliver: a step the
        # shutting-down worker did not finish still has its message in a queue, and nothing
        # is left delivered-but-unacked.
        held = [m for m in broker_messages() if str(run_id) in m.argsrepr]
        assert not [m for m in held if m.key == UNACKED.decode()], held
        undone = [s for s in steps if s.status != Step.Status.SUCCEEDED]
        expected = sorted(
            ("models" if s.kind == Step.Kind.MODEL else "tools", TASK_OF[s.kind]) for s in undone
        )
        run = Run.objects.get(pk=run_id)
        if not undone and not run.is_final:  # the run's next step is not created yet
            expected = [("models", "agents.advance_run")]
        assert sorted((m.key, m.task) for m in held) == expected, (held, steps)
    finally:
        fake_openai.configure(model=model, latency_ms=0)  # the next turn need not be slow
        if celery_worker.process is process:
            celery_worker.restart()

    run = wait_final(run_id)

    assert run.status == Run.Status.SUCCEEDED, (run.error, celery_worker.log_tail())
    assert run.result == 'done: {"expression": "6*7", "result": 42}'
    steps = list(run.steps.order_by("index").values_list("kind", "status", "attempts"))
    assert steps == [
        ("model", "succeeded", 1),
        ("tool", "succeeded", 1),
        ("model", "succeeded", 1),
    ]
    model_turns = sum(1 for kind, _, _ in steps if kind == Step.Kind.MODEL)
    assert fake_openai.count(model) == model_turns  # no model call was made twice


@contextmanager
def guarded(worker: WorkerProcess, task_id: str) -> Iterator[None]:
    """Whatever the test finds, leave no trace of the message for later tests: a worker that
    holds it unacked is killed (a warm shutdown would hand it back to the queue), the message
    is removed from Redis, and a worker that died is started again."""
    process = worker.process
    try:
        yield
    finally:
        if process.poll() is None and held_by_broker(task_id):
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        purge(task_id)
        if worker.process is process and process.poll() is not None:
            worker.restart()


def purge(task_id: str) -> None:
    """Remove a message from the broker's queues and its unacked hash."""
    client = broker()
    prefix = rediskeys.broker_key("").encode()
    for key in client.scan_iter(match=prefix + b"*", count=1000):
        if client.type(key) == b"list":
            for raw in client.lrange(key, 0, -1):
                if task_id.encode() in raw:
                    client.lrem(key, 0, raw)
    unacked = prefix + UNACKED
    for tag, raw in client.hgetall(unacked).items():
        if task_id.encode() in raw:
            client.hdel(unacked, tag)
            client.zrem(unacked + b"_index", tag)


def wait_dropped(worker: WorkerProcess, task_id: str, *, marker: str = "") -> None:
    """Wait for the worker to take the message (it logs its id, or ``marker`` from its body)
    and to ack or reject it (it leaves Redis); then check that it did, and did not die on it.

    Between Redis's BRPOP and kombu's bookkeeping a message taken is briefly in neither a
    queue nor the unacked hash, so "not in Redis" means dropped only once the worker has
    said something about it."""
    process = worker.process

    def seen() -> bool:
        text = worker_log(worker)
        return task_id in text or bool(marker and marker in text)

    with suppress(AssertionError):  # a timeout is reported below, with what is missing
        poll(lambda: process.poll() is not None or seen(), what=f"the worker to take {task_id}")
        poll(
            lambda: process.poll() is not None or not held_by_broker(task_id),
            timeout=5,
            what=f"message {task_id} to leave Redis",
        )
    assert process.poll() is None, (
        f"the worker died (exit code {process.returncode}) on message {task_id}:\n"
        f"{worker.log_tail()}"
    )
    assert seen(), f"the worker said nothing about message {task_id}:\n{worker.log_tail()}"
    held = held_by_broker(task_id)
    assert held == [], f"the worker neither acked nor rejected message {task_id}: {held}"


def lines_with(text: str, *needles: str) -> int:
    return sum(1 for line in text.splitlines() if all(needle in line for needle in needles))


def test_an_unknown_task_is_logged_dropped_and_the_worker_goes_on(celery_worker, make_agent):
    name = f"agents.no_such_task_{uuid.uuid4().hex[:8]}"
    task_id = str(uuid.uuid4())
    logged = f"Received unregistered task of type '{name}'"
    with guarded(celery_worker, task_id):
        app.send_task(name, args=[str(uuid.uuid4())], queue="models", task_id=task_id)

        wait_dropped(celery_worker, task_id)
        poll(lambda: logged in worker_log(celery_worker), what="the worker to log the task")

        assert_worker_still_runs_agents(celery_worker, make_agent)
        # Dropped for good: received once, not redelivered, nothing left in Redis.
        assert lines_with(worker_log(celery_worker), logged) == 1
        assert held_by_broker(task_id) == []


@dataclass(frozen=True)
class Malformed:
    #: A raw body, published as is (not serialized by Celery) under genuine headers for
    #: agents.advance_run; or None to publish ``args`` with send_task.
    body: bytes | None
    args: tuple[str, ...] = ()
    #: What the worker logs about it ({id}: the task id, {marker}: a unique string in args),
    #: or "" where nothing in particular is expected, only that the message is dropped.
    logged: str = ""


# Celery's consumer builds the request (Request.__init__ unpacks the body into args, kwargs
# and embed) outside the try that turns InvalidTaskError and DecodeError into "logged and
# rejected": any other exception escapes the consumer and stops the worker ("Unrecoverable
# error", exit code 1), and the message, handed back to the queue as the worker stops
# ("Restoring 1 unacknowledged message(s)"), stops the next worker that takes it, and so on.
MALFORMED = [
    pytest.param(
        Malformed(body=b"{not json", logged="Can't decode message body"), id="body_not_json"
    ),
    pytest.param(
        Malformed(body=b"\xff\xfe[not utf-8]", logged="Can't decode message body"),
        id="body_not_utf8",
    ),
    pytest.param(
        Malformed(
            body=None,
            args=("not-a-uuid-{marker}",),
            logged="advance_run: rejected malformed run id 'not-a-uuid-{marker}'",
        ),
        id="run_id_not_a_uuid",
    ),
    # Arguments that do not fit are refused before the task runs (a run whose id they carry
    # must not be failed as a poison message).
    pytest.param(
        Malformed(
            body=None,
            logged="Received invalid task message: malformed task message {id} "
            "(agents.advance_run): its arguments do not fit agents.advance_run",
        ),
        id="no_arguments",
    ),
    pytest.param(
        Malformed(
            body=None,
            args=("{marker}", "extra"),
            logged="Received invalid task message: malformed task message {id} "
            "(agents.advance_run): its arguments do not fit agents.advance_run",
        ),
        id="too_many_arguments",
    ),
    # JSON that is not a list at all: Celery's strategy tested it with `in` and stopped.
    pytest.param(
        Malformed(
            body=b"5",
            logged="Received invalid task message: malformed task message {id} "
            "(agents.advance_run): the body is a int",
        ),
        id="body_a_number",
    ),
    pytest.param(
        Malformed(
            body=b"null",
            logged="Received invalid task message: malformed task message {id} "
            "(agents.advance_run): the body is a NoneType",
        ),
        id="body_null",
    ),
    # Celery unpacks these outside its handling of invalid messages: the first stopped the
    # worker (and every worker the message went back to), the second killed the gevent
    # greenlet with the message never acked. agentsite.celery.CheckedRequest refuses them.
    pytest.param(
        Malformed(
            body=b'{"run_id": "{marker}"}',
            logged="Received invalid task message: malformed task message {id} "
            "(agents.advance_run): "
            "the body is a dict",
        ),
        id="body_json_but_not_args_kwargs_embed",
    ),
    pytest.param(
        Malformed(
            body=b'[["{marker}"], {}, 5]',
            logged="Received invalid task message: malformed task message {id} "
            "(agents.advance_run): "
            "embed is a int",
        ),
        id="body_embed_not_a_mapping",
    ),
]


@pytest.mark.parametrize("malformed", MALFORMED)
def test_a_malformed_message_is_logged_dropped_and_the_worker_goes_on(
    malformed, celery_worker, make_agent
):
    task_id = str(uuid.uuid4())
    marker = str(uuid.uuid4())
    logged = malformed.logged.format(id=task_id, marker=marker)
    with guarded(celery_worker, task_id):
        if malformed.body is None:
            args = [arg.format(marker=marker) for arg in malformed.args]
            app.send_task("agents.advance_run", args=args, task_id=task_id)
        else:
            body = malformed.body.replace(b"{marker}", marker.encode())
            publish_raw(body, task_id=task_id)

        wait_dropped(celery_worker, task_id, marker=marker)
        if logged:
            poll(
                lambda: logged in worker_log(celery_worker),
                what=f"the worker to log {logged!r}",
            )

        assert_worker_still_runs_agents(celery_worker, make_agent)
        # Dropped for good: received once, not redelivered, nothing left in Redis.
        assert held_by_broker(task_id) == []
        log = worker_log(celery_worker)
        if malformed.body is None and "invalid task" not in logged:
            assert lines_with(log, f"Task agents.advance_run[{task_id}] received") == 1
        elif malformed.body is None:
            assert lines_with(log, logged, task_id) == 1
            assert lines_with(log, f"Task agents.advance_run[{task_id}] received") == 0
        elif logged:
            assert lines_with(log, logged, task_id) == 1
