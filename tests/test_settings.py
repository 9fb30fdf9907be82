"""Settings that are easy to get silently wrong."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from celery.app.defaults import DEFAULTS
from django.conf import settings

from agentsite.celery import app


def test_every_celery_setting_is_a_real_celery_setting():
    # A misspelt CELERY_* name is silently ignored by Celery.
    ours = {name for name in dir(settings) if name.startswith("CELERY_")}
    unknown = sorted(n for n in ours if n.removeprefix("CELERY_").lower() not in DEFAULTS)
    assert ours and unknown == []


def test_the_celery_app_is_configured_for_reliability():
    conf = app.conf
    assert conf.task_acks_late is True
    assert conf.task_reject_on_worker_lost is True
    # A broker connection lost (Redis restarted) must not cancel running steps: their result is
    # recorded in Postgres and a later redelivery is a no-op (make chaos saw runs fail without).
    assert conf.worker_cancel_long_running_tasks_on_connection_loss is False
    # One reserved message per slot unless the pool asks for more (agentsite.celery).
    assert conf.worker_prefetch_multiplier == 1
    assert conf.accept_content == ["json"] and conf.task_serializer == "json"
    assert conf.task_soft_time_limit < conf.task_time_limit
    if conf.broker_url.startswith("redis"):
        assert conf.broker_transport_options["visibility_timeout"] > conf.task_time_limit


def _import_settings(**env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if k not in {"DEBUG", "SECRET_KEY"}}
    return subprocess.run(
        [sys.executable, "-c", "import agentsite.settings"],
        env={**clean, **env},
        capture_output=True,
        text=True,
        check=False,
    )


def test_production_refuses_to_start_without_a_secret_key():
    result = _import_settings(DEBUG="0")
    assert result.returncode != 0
    assert "SECRET_KEY must be set when DEBUG is off" in result.stderr


def test_a_visibility_timeout_shorter_than_the_hard_time_limit_is_refused():
    result = _import_settings(
        DEBUG="1", AGENTSITE_BROKER_VISIBILITY_TIMEOUT="60", AGENTSITE_STEP_HARD_TIME_LIMIT="120"
    )
    assert result.returncode != 0 and "AGENTSITE_BROKER_VISIBILITY_TIMEOUT" in result.stderr


@pytest.mark.parametrize("depth", ["0", "201", "deep"])
def test_a_json_depth_limit_out_of_range_is_refused(depth):
    # Past ~500 levels, rendering a stored value (the admin's indented JSON) would overflow
    # Python's recursion limit: the limit itself must not be the next 500.
    result = _import_settings(DEBUG="1", AGENTSITE_MAX_JSON_DEPTH=depth)
    assert result.returncode != 0 and "AGENTSITE_MAX_JSON_DEPTH" in result.stderr


def test_a_provider_without_a_base_url_is_refused():
    result = _import_settings(DEBUG="1", AGENTSITE_PROVIDER_BROKEN_API_KEY="sk-x")
    assert result.returncode != 0
    assert "AGENTSITE_PROVIDER_BROKEN_BASE_URL is missing" in result.stderr
    assert "sk-x" not in result.stderr


def test_providers_are_read_from_the_environment():
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            "import agentsite.settings as s; print(sorted(s.AGENTSITE_PROVIDERS['local'].items()))",
        ],
        env={
            **os.environ,
            "DEBUG": "1",
            "AGENTSITE_PROVIDER_LOCAL_BASE_URL": "http://127.0.0.1:8080/v1",
            "AGENTSITE_PROVIDER_LOCAL_API_KEY": "k",
            "AGENTSITE_PROVIDER_LOCAL_TIMEOUT": "7",
        },
        capture_output=True,
        text=True,
        check=True,
    )
    assert result.stdout.strip() == (
        "[('api_key', 'k'), ('base_url', 'http://127.0.0.1:8080/v1'), ('timeout', '7')]"
    )


@pytest.mark.parametrize(
    ("pool", "engine", "broker", "expected"),
    [
        ("celery.concurrency.gevent", "django.db.backends.sqlite3", "redis://x", "needs Postgres"),
        ("gevent", "django.db.backends.postgresql", "filesystem://", "needs a Redis broker"),
        ("gevent", "django.db.backends.postgresql", "redis://x", ""),
        ("prefork", "django.db.backends.sqlite3", "filesystem://", ""),
    ],
)
def test_a_gevent_worker_refuses_sqlite_and_the_filesystem_broker(pool, engine, broker, expected):
    from agentsite.celery import pool_problem

    problem = pool_problem(pool, engine, broker)
    assert (expected in problem) if expected else problem == ""


@pytest.mark.parametrize(
    ("policy", "refused"),
    [("noeviction", False), (None, False), ("allkeys-lru", True), ("volatile-ttl", True)],
)
def test_a_worker_refuses_a_redis_that_evicts(policy, refused):
    from agentsite.celery import eviction_problem

    problem = eviction_problem(policy)
    assert bool(problem) is refused
    if refused:
        assert policy in problem and "noeviction" in problem


def test_the_eviction_policy_is_read_from_the_real_redis():
    from agentsite.celery import redis_eviction_policy

    if not settings.CELERY_BROKER_URL.startswith("redis"):
        pytest.skip("needs the Redis broker: run with `make test`")
    assert redis_eviction_policy(settings.CELERY_BROKER_URL) == "noeviction"
    assert redis_eviction_policy("redis://127.0.0.1:1/0") is None  # nothing listens there
