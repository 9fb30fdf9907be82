"""Global rate limits on real workers: several worker processes (gevent, many model calls in
flight each) share one provider's requests-per-minute limit, an agent's own limit, and a
provider's 429 Retry-After, all counted in Redis (``agents.providers.quotas``). What reached the
"provider" is read from the fake model server's arrival times.

The rate window is compressed to 3 s (``AGENTSITE_RATE_WINDOW_SECONDS``) in three worker
processes of this module's own, which are the only ones that run model steps while it runs: the
session's worker stops consuming the ``models`` queue meanwhile. Every process that acquires a
quota must use the same window, not merely a longer one: the buckets of a quota's Redis hash are
numbered by the window, so a 3 s process drops a 60 s process's buckets as stale (and admits over
the limit) while a 60 s process reads a 3 s process's buckets as lying far in its future (and puts
its step off for centuries).

Arrival times at the server lag admission by a variable delay (a task's scheduling, the HTTP
request), so a window is checked with a little slack: at most ``limit`` arrivals in any
``WINDOW - SLACK`` seconds.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest

from agents import services
from agents.models import Agent, ModelProvider, Run, Step
from agents.services import submit_run
from audittrail.models import AuditEvent
from harness.fake_server import FakeOpenAIServer, max_in_window
from harness.polling import poll
from tests.support.processes import WorkerProcess

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]

WINDOW = 3.0  # seconds: the rate window of the workers that run model steps here
SLACK = 0.3  # seconds of arrival jitter allowed when checking a window
N_WORKERS = 3


@pytest.fixture(scope="module")
def rate_workers(
    celery_worker: WorkerProcess, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[list[WorkerProcess]]:
    """Three more worker processes on the ``models`` queue with a 3 s rate window; the session's
    worker (60 s window) stops taking model steps until the module is done."""

    celery_worker.hold("models")
    env = {**celery_worker.env, "AGENTSITE_RATE_WINDOW_SECONDS": f"{WINDOW:g}"}
    logs = tmp_path_factory.mktemp("rate-workers")
    concurrency = "20" if celery_worker.pool == "gevent" else "2"
    workers: list[WorkerProcess] = []
    try:
        for i in range(N_WORKERS):
            name = f"rate{i}-{os.getpid()}@{socket.gethostname()}"
            log = logs / f"worker{i}.log"
            log.write_bytes(b"")
            command = [
                sys.executable, "-m", "celery", "-A", "agentsite", "worker",
                "-P", celery_worker.pool, "-Q", f"models,{_own_queue(name)}",
                "--concurrency", concurrency,
                "--prefetch-multiplier", "2", "--loglevel", "INFO", "-n", name,
                "--without-gossip", "--without-mingle",
            ]  # fmt: skip
            workers.append(WorkerProcess(command, env, name, log, celery_worker.pool))
        for worker in workers:  # they start at the same time; each is waited for in turn
            worker.wait_ready()
        yield workers
    finally:
        _stop_all(workers)
        celery_worker.release("models")


def _own_queue(worker_name: str) -> str:
    """A queue only this worker consumes (to warm it up)."""
    return worker_name.partition("@")[0]


_warmed: set[str] = set()


@pytest.fixture
def warm_workers(
    rate_workers: list[WorkerProcess],
    fake_openai: FakeOpenAIServer,
    make_agent: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> list[WorkerProcess]:
    """The workers, each of which has made a model call to the fake server already.

    A process's first model call builds its HTTP clients (eight SSL contexts...): that held the
    first requests of a test back by up to 0.4 s after their admission (seen in Redis), so the
    next window's requests, which were admitted 3 s later, arrived less than 2.7 s later. Every
    provider row of this module has the same base URL, key (none) and timeout, hence the same
    clients. Each worker is sent its warm-up run on a queue of its own."""
    from agentsite.celery import app

    cold = [worker for worker in rate_workers if worker.name not in _warmed]
    if not cold:
        return rate_workers
    provider = _provider(fake_openai, "warm")
    agent = make_agent(model_route=f"{provider}:warm-{uuid.uuid4().hex[:8]}")
    with monkeypatch.context() as patch:  # recorded, not nudged: no other worker may take it
        patch.setattr(services, "advance_run_on_commit", lambda run_id, **_: None)
        runs = {worker.name: submit_run(agent=agent, input="warm up").pk for worker in cold}
    for worker in cold:
        run_id = str(runs[worker.name])
        app.send_task("agents.advance_run", args=[run_id], queue=_own_queue(worker.name))
    _wait_all_final(list(runs.values()), rate_workers, timeout=30)
    _assert_all_succeeded(list(runs.values()))
    for worker in cold:  # each made its call itself
        assert worker.task_totals().get("agents.advance_run", 0) >= 1, worker.name
    _warmed.update(runs)
    return rate_workers


def _stop_all(workers: list[WorkerProcess]) -> None:
    """SIGTERM every worker (a warm shutdown), then kill each process group still there."""
    for worker in workers:
        if worker.process.poll() is None:
            worker.process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 20
    for worker in workers:
        with contextlib.suppress(subprocess.TimeoutExpired):
            worker.process.wait(timeout=max(0.1, deadline - time.monotonic()))
        with contextlib.suppress(ProcessLookupError):
            os.killpg(worker.process.pid, signal.SIGKILL)
        worker.process.wait()


def _provider(fake: FakeOpenAIServer, prefix: str, **fields: Any) -> str:
    """A provider row of its own (so no other test's quota is shared) on the fake server."""
    name = f"{prefix}-{uuid.uuid4().hex[:6]}"
    ModelProvider.objects.create(name=name, base_url=fake.base_url, timeout_seconds=10, **fields)
    return name


def _wait_all_final(run_ids: list[Any], workers: list[WorkerProcess], timeout: float) -> None:
    def all_final() -> bool:
        return (
            not Run.objects.filter(pk__in=run_ids).exclude(status__in=Run.FINAL_STATUSES).exists()
        )

    try:
        poll(all_final, timeout=timeout, interval=0.1, what=f"{len(run_ids)} runs to finish")
    except AssertionError:
        tails = "\n\n".join(f"{w.name}:\n{w.log_tail(20)}" for w in workers)
        counts = Counter(Run.objects.filter(pk__in=run_ids).values_list("status", flat=True))
        raise AssertionError(f"runs not final in {timeout}s {counts}\n{tails}") from None


def _assert_all_succeeded(run_ids: list[Any]) -> None:
    runs = list(Run.objects.filter(pk__in=run_ids).values_list("status", "error"))
    assert len(runs) == len(run_ids)
    failed = [r for r in runs if r[0] != Run.Status.SUCCEEDED]
    assert not failed, failed


def _model_steps(run_ids: list[Any]) -> list[Step]:
    return list(Step.objects.filter(run_id__in=run_ids, kind=Step.Kind.MODEL))


def _put_offs(run_ids: list[Any], reason: str | None = None) -> list[AuditEvent]:
    events = AuditEvent.objects.filter(run_id__in=run_ids, action="step.rate_limited")
    if reason is not None:
        events = events.filter(payload__reason=reason)
    return list(events)


def _span(times: list[float]) -> float:
    return times[-1] - times[0] if times else 0.0


def test_workers_in_several_processes_never_exceed_the_providers_request_limit(
    warm_workers, fake_openai, make_agent
):
    limit, runs = 4, 24
    model = f"rpm-{uuid.uuid4().hex[:8]}"
    fake_openai.configure(model=model, latency_ms=50)
    provider = _provider(fake_openai, "limited", requests_per_minute=limit)
    agent = make_agent(model_route=f"{provider}:{model}")
    before = {w.name: w.task_totals().get("agents.advance_run", 0) for w in warm_workers}
    started = time.monotonic()
    run_ids = [submit_run(agent=agent, input=f"question {i}").pk for i in range(runs)]

    _wait_all_final(run_ids, warm_workers, timeout=40)
    elapsed = time.monotonic() - started

    _assert_all_succeeded(run_ids)
    times = fake_openai.request_times(model)
    busiest = max_in_window(times, WINDOW - SLACK)
    span = _span(times)
    put_offs = _put_offs(run_ids)
    steps = _model_steps(run_ids)
    print(
        f"\nprovider rpm={limit}/{WINDOW:g}s, {runs} runs on {N_WORKERS} workers: "
        f"{len(times)} requests, busiest {WINDOW - SLACK:g}s window {busiest}, "
        f"busiest {WINDOW:g}s window {max_in_window(times, WINDOW)}, span {span:.2f}s, "
        f"{len(put_offs)} put-offs, done in {elapsed:.1f}s"
    )
    # One request per run (the fake server answers text at once): nothing was retried.
    assert len(times) == runs
    assert busiest <= limit, f"{busiest} requests in {WINDOW - SLACK:g} s (limit {limit})"
    # The limit bound: 24 requests at 4 per window need 5 windows after the first.
    assert span >= (runs / limit - 1) * WINDOW - 2 * SLACK, f"the requests took only {span:.2f} s"
    # The steps that could not go were put off (our own limit said so), not failed or retried.
    assert len(put_offs) >= runs - limit
    assert {e.payload["reason"] for e in put_offs} == {"rate_limited"}
    assert not AuditEvent.objects.filter(
        run_id__in=run_ids, action__in=("step.retry_scheduled", "step.failed", "step.fallback")
    ).exists()
    # One model step per run, and a put-off gave its attempt back.
    assert len(steps) == runs
    assert {(s.status, s.attempts) for s in steps} == {(Step.Status.SUCCEEDED, 1)}
    # The work was spread over the processes, not run by one of them.
    busy = [
        w.name
        for w in warm_workers
        if w.task_totals().get("agents.advance_run", 0) > before[w.name]
    ]
    assert len(busy) >= 2, busy


def test_a_providers_429_holds_every_worker_back_for_its_retry_after(
    warm_workers, fake_openai, make_agent
):
    retry_after, failing, later = 2, 3, 6
    model = f"429-{uuid.uuid4().hex[:8]}"
    fake_openai.configure(
        model=model, latency_ms=50, fail_first=failing, error_status=429, retry_after=retry_after
    )
    provider = _provider(fake_openai, "throttling")  # no limit of our own
    agent = make_agent(model_route=f"{provider}:{model}")
    first = [submit_run(agent=agent, input=f"first {i}").pk for i in range(failing)]
    # Every first-wave step was answered 429 and put off: the provider's pause is set (the
    # engine pauses the quota before it records the put-off).
    poll(
        lambda: len(_put_offs(first, "provider_429")) >= failing,
        timeout=20,
        what="the first wave's 429s",
    )
    # A second wave, submitted while the provider is paused, must not reach it before the
    # pause ends, whichever worker takes it.
    second = [submit_run(agent=agent, input=f"second {i}").pk for i in range(later)]
    run_ids = first + second

    _wait_all_final(run_ids, warm_workers, timeout=30)

    _assert_all_succeeded(run_ids)
    times = fake_openai.request_times(model)
    gap = times[failing] - times[failing - 1] if len(times) > failing else 0.0
    held = _put_offs(second, "rate_limited")
    steps = _model_steps(run_ids)
    print(
        f"\n429 Retry-After {retry_after}s on the first {failing} requests: {len(times)} "
        f"requests, gap after the 429s {gap:.2f}s, second-wave put-offs {len(held)} "
        f"(runs {len({e.run_id for e in held})}/{later}), "
        f"429 put-offs {len(_put_offs(run_ids, 'provider_429'))}"
    )
    # The 429s, then one successful request per run: nobody asked again during the pause.
    assert len(times) == failing + len(run_ids)
    # The first wave's requests were in flight together (one burst), or, on a loaded machine
    # where a worker took its run later, came after the pause a 429 before them had set.
    for before, after in zip(times[: failing - 1], times[1:failing], strict=True):
        assert after - before < 1.0 or after - before >= retry_after - 0.2, (
            f"a 429'd request reached the provider {after - before:.2f} s after another 429"
        )
    assert gap >= retry_after - 0.2, f"a request reached the provider {gap:.2f} s after a 429"
    # The second wave was held back by the shared pause (not by a 429 of its own).
    assert {e.run_id for e in held} == set(second)
    assert not _put_offs(second, "provider_429")
    assert len(_put_offs(first, "provider_429")) == failing
    # A 429 spends no attempt and is no failure.
    assert len(steps) == len(run_ids)
    assert {(s.status, s.attempts) for s in steps} == {(Step.Status.SUCCEEDED, 1)}
    assert (
        sorted((s.request or {}).get("throttled", 0) for s in steps) == [0] * later + [1] * failing
    )
    assert not AuditEvent.objects.filter(
        run_id__in=run_ids, action__in=("step.retry_scheduled", "step.failed", "step.fallback")
    ).exists()


def test_an_agents_own_request_limit_holds_on_an_unlimited_provider(
    warm_workers, fake_openai, make_agent
):
    limit, runs = 2, 6
    slow_model, free_model = f"agent-rpm-{uuid.uuid4().hex[:8]}", f"free-{uuid.uuid4().hex[:8]}"
    for model in (slow_model, free_model):
        fake_openai.configure(model=model, latency_ms=50)
    provider = _provider(fake_openai, "open")  # no limit of its own
    limited: Agent = make_agent(model_route=f"{provider}:{slow_model}", requests_per_minute=limit)
    free: Agent = make_agent(model_route=f"{provider}:{free_model}")
    limited_ids = [submit_run(agent=limited, input=f"slow {i}").pk for i in range(runs)]
    free_ids = [submit_run(agent=free, input=f"free {i}").pk for i in range(runs)]

    _wait_all_final(limited_ids + free_ids, warm_workers, timeout=30)

    _assert_all_succeeded(limited_ids + free_ids)
    times, free_times = fake_openai.request_times(slow_model), fake_openai.request_times(free_model)
    busiest, span = max_in_window(times, WINDOW - SLACK), _span(times)
    put_offs = _put_offs(limited_ids)
    print(
        f"\nagent rpm={limit}/{WINDOW:g}s, {runs} runs: busiest {WINDOW - SLACK:g}s window "
        f"{busiest}, span {span:.2f}s, {len(put_offs)} put-offs; the other agent's {runs} "
        f"requests spanned {_span(free_times):.2f}s"
    )
    assert len(times) == runs
    assert busiest <= limit, f"{busiest} requests in {WINDOW - SLACK:g} s (limit {limit})"
    assert span >= (runs / limit - 1) * WINDOW - 2 * SLACK, f"the requests took only {span:.2f} s"
    assert len(put_offs) >= runs - limit
    assert {e.payload["reason"] for e in put_offs} == {"rate_limited"}
    assert {(s.status, s.attempts) for s in _model_steps(limited_ids)} == {
        (Step.Status.SUCCEEDED, 1)
    }
    # The limit is the agent's, not the provider's: another agent on it was not held back.
    assert len(free_times) == runs
    assert not _put_offs(free_ids)
    assert _span(free_times) < WINDOW - SLACK
