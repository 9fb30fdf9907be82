"""The Celery application, configured from Django settings (``CELERY_*``)."""

import os
from typing import Any

from celery import Celery, Task
from celery.exceptions import InvalidTaskError
from celery.signals import worker_init
from celery.worker.request import Request

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "agentsite.settings")


def body_problem(payload: Any) -> str:
    """What is wrong with a task message's decoded body, or "" if it has the shape Celery's
    protocol 2 gives it: ``[args (list), kwargs (dict), embed (dict or null)]``."""
    if not isinstance(payload, list | tuple) or len(payload) != 3:
        return f"the body is a {type(payload).__name__}, not [args, kwargs, embed]"
    args, kwargs, embed = payload
    if not isinstance(args, list | tuple):
        return f"args is a {type(args).__name__}, not a list"
    if not isinstance(kwargs, dict):
        return f"kwargs is a {type(kwargs).__name__}, not an object"
    if embed is not None and not isinstance(embed, dict):
        return f"embed is a {type(embed).__name__}, not an object"
    return ""


class CheckedRequest(Request):  # type: ignore[misc]
    """A task request that refuses a malformed message body before Celery unpacks it.

    Celery unpacks the body in ``Request.__init__``, outside its handling of invalid messages: a
    body that is not the triple kills the worker (and every worker that takes the message
    after it), and an ``embed`` that is not a mapping kills the gevent greenlet with the
    message never acked. Raising ``InvalidTaskError`` here makes the consumer log
    "Received invalid task message" and drop it, like a body that is not JSON."""

    def __init__(self, message: Any, *args: Any, **kwargs: Any) -> None:
        body = kwargs.get("body")
        payload = body if kwargs.get("decoded") else message.payload
        problem = body_problem(payload)
        if problem:
            headers = kwargs.get("headers") or message.headers or {}
            raise InvalidTaskError(
                f"malformed task message {headers.get('id')} ({headers.get('task')}): {problem}"
            )
        super().__init__(message, *args, **kwargs)


class CheckedTask(Task):  # type: ignore[misc]
    """Every task of the project: its messages are checked by ``CheckedRequest``."""

    Request = "agentsite.celery:CheckedRequest"


app = Celery("agentsite", task_cls=CheckedTask)
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()


def pool_problem(pool: str, database_engine: str, broker_url: str) -> str:
    """Why this pool cannot run on this database and broker, or "" if it can."""
    if "gevent" not in pool and "eventlet" not in pool:
        return ""
    if database_engine.endswith("sqlite3"):
        return (
            "the gevent pool needs Postgres: SQLite waits for its lock inside C code, which "
            "stops every greenlet of the worker (set DATABASE_URL, or run -P prefork)"
        )
    if broker_url.startswith("filesystem"):
        return "the gevent pool needs a Redis broker (set CELERY_BROKER_URL, or run -P prefork)"
    return ""


def eviction_problem(policy: str | None) -> str:
    """Why this Redis ``maxmemory-policy`` loses work, or "" if it does not."""
    if policy is None or policy == "noeviction":
        return ""
    return (
        f"Redis maxmemory-policy is {policy!r}: when Redis fills up it would evict queued tasks "
        "and rate-limit and circuit-breaker keys without a word; set it to noeviction (then a "
        "full Redis refuses writes, which fail loudly and are retried)"
    )


def redis_eviction_policy(url: str) -> str | None:
    """The Redis server's ``maxmemory-policy``, or None if it cannot be read (down, or CONFIG
    disabled as on some managed services)."""
    import redis

    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=2)
        reply: Any = client.config_get("maxmemory-policy")
        value = reply.get("maxmemory-policy")
    except redis.RedisError:
        return None
    return str(value) if value is not None else None


@worker_init.connect
def _check_pool(sender: Any = None, **kwargs: Any) -> None:
    from django.conf import settings

    pool = sender.pool_cls if isinstance(sender.pool_cls, str) else sender.pool_cls.__module__
    problem = pool_problem(
        pool, settings.DATABASES["default"]["ENGINE"], settings.CELERY_BROKER_URL
    )
    if not problem and settings.CELERY_BROKER_URL.startswith("redis"):
        problem = eviction_problem(redis_eviction_policy(settings.CELERY_BROKER_URL))
    if problem:
        raise SystemExit(f"agentsite: {problem}")
