"""The fault-injection suite: real processes, real faults, then checks of what the system promised.

``python -m chaos`` (``make chaos``) starts, on this machine, a Postgres and a Redis of its own
(see ``chaos/services.py``), the fake model server, Celery workers (gevent, as deployed), beat
and the API (gunicorn + uvicorn). It submits runs through the API while it kills workers,
restarts Redis and Postgres and makes the model misbehave (``chaos/scenario.py``); a reviewer
decides approvals over the API meanwhile, and the client cancels some runs. It then waits for
quiescence and checks (``chaos/checks.py``) that every accepted run ended, none failed that
should not have, every side effect is in the outbox once, and nothing ran after a cancel.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from bench.datastores import migrate
from harness.polling import Deadline, HarnessError
from harness.processes import (
    QUEUES,
    FakeServer,
    ManagedProcess,
    spawn,
    start_api,
    start_beat,
    start_fake_server,
    stop_all,
    wait_workers_ready,
    worker_argv,
)

from . import scenario
from .scenario import Fault
from .services import ExistingPostgres, PrivatePostgres, PrivateRedis

ROOT = Path(__file__).resolve().parent.parent
SECRET_KEY = "chaos-only-secret-key-5d1c0b7e9f2a4c38b6e1d0a9f8e7c6b5"
FAKE_API_KEY = "sk-chaos-fake-key"


def log(message: str, *, started: float = time.monotonic()) -> None:
    print(f"[{time.monotonic() - started:7.1f}s] {message}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Options:
    runs: int = 300
    submit_seconds: float = 45.0
    workers: int = 2
    concurrency: int = 50
    quiesce_timeout: float = 300.0
    seed: int = 7
    short: bool = False  # make test's version: one worker kill, one broker flush
    # A database on a server the suite does not manage (no Postgres restart then); by default
    # it runs a Postgres of its own.
    database_url: str = ""
    results_dir: Path = ROOT / "chaos" / "results"

    @property
    def schedule(self) -> list[Fault]:
        if self.short:
            return scenario.short_schedule(self.submit_seconds)
        return scenario.full_schedule(self.submit_seconds)


@dataclass
class Submitted:
    index: int
    kind: str
    run_id: str
    cancel_status: int | None = None  # the API's answer to our cancel, if we sent one
    cancel_retried: bool = False  # a 409 after a retry may answer our own earlier cancel


@dataclass
class Ledger:
    """What the client side saw: accepted runs, our cancels and decisions, faults injected."""

    submitted: dict[str, Submitted] = field(default_factory=dict)
    refused: list[str] = field(default_factory=list)  # 4xx answers to a submission
    decided_runs: dict[str, str] = field(default_factory=dict)  # run id -> approve/reject
    faults: list[tuple[float, Fault]] = field(default_factory=list)
    client_retries: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


class Api:
    """An API client that retries what a careful client retries: connection errors, 5xx and
    429, with the same Idempotency-Key, until a deadline."""

    def __init__(self, base_url: str, key: str, ledger: Ledger, stop: threading.Event) -> None:
        self.client = httpx.Client(
            base_url=base_url, headers={"Authorization": f"Bearer {key}"}, timeout=10
        )
        self.ledger = ledger
        self.stop = stop
        self.retried = False  # whether the last call was sent more than once

    def call(
        self, method: str, path: str, *, json: Any = None, headers: Any = None, within: float = 180
    ) -> httpx.Response:
        deadline = time.monotonic() + within
        delay = 0.2
        self.retried = False
        while True:
            if self.stop.is_set():
                raise HarnessError(f"{method} {path}: the suite is stopping")
            try:
                response = self.client.request(method, path, json=json, headers=headers)
                if response.status_code < 500 and response.status_code != 429:
                    return response
                problem = f"HTTP {response.status_code}"
            except httpx.TransportError as exc:
                problem = f"{type(exc).__name__}"
            if time.monotonic() > deadline:
                raise HarnessError(f"{method} {path} kept failing for {within:g} s: {problem}")
            with self.ledger.lock:
                self.ledger.client_retries += 1
            self.retried = True
            time.sleep(delay)  # a client's backoff between retries
            delay = min(2.0, delay * 2)

    def close(self) -> None:
        self.client.close()


class Suite:
    def __init__(self, opts: Options) -> None:
        self.opts = opts
        self.rng = random.Random(opts.seed)
        self.logs = opts.results_dir / "logs"
        self.scratch = opts.results_dir / "scratch"
        self.ledger = Ledger()
        self.workers: list[ManagedProcess | None] = [None] * opts.workers
        self.stop_background = threading.Event()  # the reviewer's end
        self.stop_all = threading.Event()  # the suite is stopping: clients give up at once
        self.env: dict[str, str] = {}
        self.postgres: PrivatePostgres | ExistingPostgres | None = None
        self.redis: PrivateRedis | None = None
        self.fake: FakeServer | None = None
        self.api_url = ""
        self.client_key = ""
        self.reviewer_key = ""
        self.first_submit = 0.0
        self.first_submit_wall = 0.0
        self.last_fault_end = 0.0
        self.quiesced_after: float | None = None

    # --- setting up -----------------------------------------------------------------------

    def environment(self, fake_base_url: str) -> dict[str, str]:
        assert self.postgres is not None and self.redis is not None
        env = dict(os.environ)
        for name in list(env):
            if name.startswith(("AGENTSITE_", "CELERY_")) or name in ("DATABASE_URL", "REDIS_URL"):
                del env[name]  # nothing from the caller's configuration leaks in
        env.update(
            DATABASE_URL=self.postgres.url,
            CELERY_BROKER_URL=self.redis.url,
            REDIS_URL=self.redis.url,
            DJANGO_SETTINGS_MODULE="agentsite.settings",
            SECRET_KEY=SECRET_KEY,
            DEBUG="0",
            ALLOWED_HOSTS="127.0.0.1,localhost",
            LOG_LEVEL="WARNING",
            PYTHONUNBUFFERED="1",
            AGENTSITE_DATA_DIR=str(self.scratch),
            STATIC_ROOT=str(self.scratch / "static"),
            AGENTSITE_PROVIDER_FAKE_BASE_URL=fake_base_url,
            AGENTSITE_PROVIDER_FAKE_API_KEY=FAKE_API_KEY,
            AGENTSITE_PROVIDER_FAKE_TIMEOUT=str(scenario.PROVIDER_TIMEOUT),
            # Short clocks, so a lost message or a dead worker shows within seconds (the
            # defaults are minutes; the mechanisms are the same).
            AGENTSITE_RECONCILE_INTERVAL="2",
            AGENTSITE_STALLED_AFTER="5",
            AGENTSITE_STEP_SOFT_TIME_LIMIT="10",
            AGENTSITE_STEP_HARD_TIME_LIMIT="15",
            AGENTSITE_STEP_LEASE_SECONDS="20",
            AGENTSITE_TOOL_HARD_LIMIT_GRACE="1",
            AGENTSITE_TOOL_LEASE_MARGIN="2",
            AGENTSITE_DB_POOL_MAX="10",
            AGENTSITE_MAX_ACTIVE_RUNS_PER_KEY="100000",
            AGENTSITE_API_RATE_LIMIT="1000000/minute",
            EMAIL_BACKEND="django.core.mail.backends.filebased.EmailBackend",
            EMAIL_FILE_PATH=str(self.scratch / "mail"),
        )
        return env

    def start(self) -> None:
        # Only what an earlier run of the suite wrote there (--results may name any directory).
        for old in (self.logs, self.scratch):
            shutil.rmtree(old, ignore_errors=True)
        for name in ("summary.txt", "summary.json"):
            (self.opts.results_dir / name).unlink(missing_ok=True)
        self.logs.mkdir(parents=True)
        (self.scratch / "static").mkdir(parents=True)
        (self.scratch / "mail").mkdir(parents=True)
        log("starting a Postgres and a Redis of the suite's own")
        self.postgres = (
            ExistingPostgres(self.opts.database_url)
            if self.opts.database_url
            else PrivatePostgres(self.logs)
        )
        self.postgres.start()
        self.postgres.create_database()
        self.redis = PrivateRedis(self.logs, env=dict(os.environ))
        self.redis.start()
        base_env = self.environment("")
        self.fake = start_fake_server(env=base_env, logs=self.logs)
        self.env = self.environment(self.fake.base_url)
        self.redis.env = self.env
        log("migrating")
        migrate(self.env, self.logs / "migrate.log")
        self.setup_django()
        self.seed()
        log(f"starting {self.opts.workers} workers, beat and the API")
        for index in range(self.opts.workers):
            self.start_worker(index)
        self.wait_workers()
        start_beat(env=self.env, logs=self.logs, schedule=self.scratch / "beat-schedule")
        self.start_api()

    def setup_django(self) -> None:
        for name in list(os.environ):
            if name not in self.env:
                del os.environ[name]  # this process reads the settings the workers read
        os.environ.update(self.env)
        import django

        django.setup()

    def seed(self) -> None:
        from django.contrib.auth import get_user_model
        from django.core.management import call_command

        from agents.models import Agent
        from agents.services import create_api_key, save_agent

        assert self.fake is not None
        for kind, (model, script, grants) in scenario.AGENTS.items():
            self.fake.configure(model, tool_calls=script, final=scenario.FINAL)
            agent = Agent(
                slug=f"chaos-{kind}", name=kind, model_route=f"fake:{model}", max_steps=10
            )
            save_agent(agent=agent, grants=grants)
        user = get_user_model().objects.create(username="chaos-client")
        self.client_key = create_api_key(user=user, name="chaos")[1]
        call_command("create_reviewer", "chaos-reviewer", "--email", "reviewer@example.com")
        reviewer = get_user_model().objects.get(username="chaos-reviewer")
        self.reviewer_key = create_api_key(user=reviewer, name="chaos reviewer")[1]

    def start_worker(self, index: int) -> None:
        argv = worker_argv(
            f"chaos-{index + 1}@%h", concurrency=self.opts.concurrency, queues=QUEUES
        )
        name = f"worker-{index + 1}-{int(time.monotonic() * 1000)}"
        self.workers[index] = spawn(name, argv, env=self.env, logs=self.logs)

    def wait_workers(self) -> None:
        from agentsite.celery import app

        host = socket.gethostname()
        wait_workers_ready(
            app,
            [f"chaos-{i + 1}@{host}" for i in range(self.opts.workers)],
            Deadline(90, "the workers to answer a ping"),
            interval=0.2,
            alive=self.alive,
        )

    def start_api(self) -> None:
        server = start_api(workers=2, env=self.env, logs=self.logs, interval=0.2)
        self.api_url = server.base_url

    def alive(self) -> None:
        for worker in self.workers:
            if worker is not None:
                worker.check()

    # --- the client side ------------------------------------------------------------------

    def submit_all(self) -> None:
        api = Api(self.api_url, self.client_key, self.ledger, self.stop_all)
        cancels: list[tuple[float, Submitted]] = []
        try:
            spacing = self.opts.submit_seconds / max(1, self.opts.runs)
            for index in range(self.opts.runs):
                due = self.first_submit + index * spacing
                time.sleep(max(0.0, due - time.monotonic()))  # pacing the load, not waiting
                kind = scenario.kind_of(index)
                response = api.call(
                    "POST",
                    "/api/v1/runs/",
                    json={"agent": f"chaos-{kind}", "input": f"chaos run {index}"},
                    headers={"Idempotency-Key": f"chaos-{index}"},
                )
                if response.status_code != 202:
                    with self.ledger.lock:
                        self.ledger.refused.append(
                            f"run {index}: HTTP {response.status_code} {response.text[:200]}"
                        )
                    continue
                entry = Submitted(index, kind, response.json()["id"])
                with self.ledger.lock:
                    self.ledger.submitted[entry.run_id] = entry
                if scenario.cancels(index):
                    cancels.append((time.monotonic() + self.rng.uniform(0.2, 3.0), entry))
                for when, pending in [c for c in cancels if c[0] <= time.monotonic()]:
                    self.cancel(api, pending)
                    cancels.remove((when, pending))
            for when, pending in sorted(cancels, key=lambda c: c[0]):
                time.sleep(max(0.0, when - time.monotonic()))
                self.cancel(api, pending)
        finally:
            api.close()

    def cancel(self, api: Api, entry: Submitted) -> None:
        response = api.call("POST", f"/api/v1/runs/{entry.run_id}/cancel/")
        entry.cancel_status = response.status_code
        entry.cancel_retried = api.retried

    def review(self) -> None:
        """The reviewer: approve even-numbered runs' calls, reject odd ones', until stopped."""
        api = Api(self.api_url, self.reviewer_key, self.ledger, self.stop_all)
        try:
            while not self.stop_background.is_set():
                try:
                    page = api.call("GET", "/api/v1/approvals/?status=pending&limit=100", within=60)
                except HarnessError as exc:
                    log(f"reviewer: {exc}")
                    continue
                for approval in page.json().get("results", []):
                    try:
                        self.decide(api, approval)
                    except HarnessError as exc:
                        log(f"reviewer: {exc}")  # the next pass tries again
                self.stop_background.wait(0.3)
        finally:
            api.close()

    def decide(self, api: Api, approval: dict[str, Any]) -> None:
        run_id = approval["run"]["id"]
        with self.ledger.lock:
            entry = self.ledger.submitted.get(run_id)
        if entry is None:
            return  # its POST's answer is still on its way
        decision = "approve" if scenario.approves(entry.index) else "reject"
        body: dict[str, Any] = {"decision": decision}
        if decision == "reject":
            body["comment"] = "chaos: rejected by script"
        response = api.call("POST", f"/api/v1/approvals/{approval['id']}/decision/", json=body)
        if response.status_code in (200, 409):
            with self.ledger.lock:
                self.ledger.decided_runs[run_id] = decision

    # --- faults ---------------------------------------------------------------------------

    def inject(self, fault: Fault) -> None:
        assert self.fake is not None and self.redis is not None and self.postgres is not None
        log(f"fault: {fault.describe()}")
        if fault.kind == "worker_kill":
            worker = self.workers[fault.target]
            assert worker is not None
            worker.stop(grace=0, sig=signal.SIGKILL)
            time.sleep(1.0)  # the supervisor's restart delay
            self.start_worker(fault.target)
        elif fault.kind == "redis_restart":
            self.redis.restart(down_for=1.0)
        elif fault.kind == "postgres_restart":
            self.postgres.restart(down_for=3.0)
        elif fault.kind in ("model_500", "model_429"):
            status = 500 if fault.kind == "model_500" else 429
            for model in scenario.FAULTY_MODELS:
                self.fake.configure(
                    model,
                    error_rate=1.0,
                    error_status=status,
                    retry_after=1 if status == 429 else None,
                )
            time.sleep(scenario.ERROR_WINDOW)  # how long every call fails
            for model in scenario.FAULTY_MODELS:
                self.fake.configure(model, error_rate=0.0, retry_after=None)
        elif fault.kind == "model_timeouts":
            for model in scenario.FAULTY_MODELS:
                self.fake.configure(model, latency_ms=(scenario.PROVIDER_TIMEOUT + 2) * 1000)
            time.sleep(2.5)  # how long the model is slow
            for model in scenario.FAULTY_MODELS:
                self.fake.configure(model, latency_ms=0)
        elif fault.kind == "model_malformed":
            self.fake.configure("chaos-nonsense", nonsense="not_json")
            time.sleep(2.0)  # how long it answers nonsense
            self.fake.configure("chaos-nonsense", nonsense=None)
        else:
            raise HarnessError(f"unknown fault {fault.kind!r}")
        self.ledger.faults.append((time.monotonic() - self.first_submit, fault))
        self.last_fault_end = time.monotonic()

    def run_faults(self) -> None:
        for fault in self.opts.schedule:
            time.sleep(max(0.0, self.first_submit + fault.at - time.monotonic()))
            self.inject(fault)

    # --- waiting for the end --------------------------------------------------------------

    def active(self) -> int | None:
        """Accepted runs not final yet plus outbox rows not delivered (None if Postgres is
        unreachable just now)."""
        from django.db import OperationalError, close_old_connections, connection

        from agents.models import Run
        from tools.models import OutboxMessage

        try:
            ids = list(self.ledger.submitted)
            active = Run.objects.filter(pk__in=ids, status__in=Run.ACTIVE_STATUSES).count()
            pending = OutboxMessage.objects.filter(status=OutboxMessage.Status.PENDING).count()
            return active + pending
        except OperationalError:
            connection.close()
            close_old_connections()
            return None

    def wait_quiescent(self) -> None:
        deadline = Deadline(self.opts.quiesce_timeout, "every accepted run to end")
        started = time.monotonic()
        reported = started
        while True:
            left = self.active()
            if time.monotonic() - reported >= 10:
                log(f"{left if left is not None else '?'} runs and outbox rows still active")
                reported = time.monotonic()
            if left == 0:
                self.quiesced_after = time.monotonic() - max(started, self.last_fault_end)
                return
            self.alive()
            if deadline.remaining() <= 0:
                log(f"not quiescent after {self.opts.quiesce_timeout:g} s: {left} still active")
                return
            time.sleep(0.5)

    # --- the whole thing ------------------------------------------------------------------

    def run(self) -> Any:
        from .checks import check

        self.start()
        log(
            f"submitting {self.opts.runs} runs over {self.opts.submit_seconds:g} s; "
            f"{len(self.opts.schedule)} faults"
        )
        self.first_submit = time.monotonic()
        self.first_submit_wall = time.time()
        self.last_fault_end = self.first_submit
        reviewer = threading.Thread(target=self.review, name="reviewer", daemon=True)
        failures: list[BaseException] = []

        def guarded() -> None:
            try:
                self.submit_all()
            except BaseException as exc:  # noqa: BLE001 - reported below
                failures.append(exc)

        submitter = threading.Thread(target=guarded, name="submitter", daemon=True)
        submitter.start()
        reviewer.start()
        try:
            self.run_faults()
            submitter.join()
            if failures:
                raise failures[0]
            log(f"{len(self.ledger.submitted)} runs accepted; waiting for quiescence")
            self.wait_quiescent()
        finally:
            self.stop_background.set()
            reviewer.join(timeout=15)
        return check(self)

    def close(self) -> None:
        """Stop every process and remove the suite's Postgres (safe to call twice)."""
        self.stop_all.set()
        self.stop_background.set()
        stop_all(grace=10)
        if self.postgres is not None:
            self.postgres.remove()
            self.postgres = None
