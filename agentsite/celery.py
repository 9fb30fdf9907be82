"""The Celery application, configured from Django settings (``CELERY_*``)."""

import inspect
import os
from typing import Any

from celery import Celery, Task
from celery.exceptions import InvalidTaskError
from celery.signals import worker_init
from celery.worker.strategy import default as default_strategy

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


def message_problem(task: Any, message: Any, signature: inspect.Signature | None = None) -> str:
    """Why a task message cannot be run, or "" if it can: its headers must name it, its body
    must be protocol 2's triple, and its arguments must fit the task's signature."""
    headers = message.headers or {}
    for name in ("id", "task"):
        if not isinstance(headers.get(name), str):
            return f"its {name!r} header is missing or not a string"
    problem = body_problem(message.payload)
    if problem:
        return problem
    args, kwargs, _ = message.payload
    try:
        (signature or inspect.signature(task.run)).bind(*args, **kwargs)
    except TypeError as exc:
        return f"its arguments do not fit {task.name}: {exc}"
    return ""


def checked_strategy(task: Any, app: Any, consumer: Any, **kwargs: Any) -> Any:
    """Celery's default strategy, after a check of the message (``message_problem``).

    Celery unpacks a message partly outside its handling of invalid messages: a body that is
    not the triple (or is a number or null) or a message without an ``id`` header stopped the
    worker, and every worker the message went back to after it; an ``embed`` that is not a
    mapping killed the gevent greenlet with the message never acked; arguments that do not fit
    failed inside the task (and would fail a real run as a poison message). Raising
    ``InvalidTaskError`` here makes the consumer log "Received invalid task message" and drop
    the message, as it does a body that is not JSON."""
    handler = default_strategy(task, app, consumer, **kwargs)
    signature = inspect.signature(task.run)  # once per task, not per message

    def checked(message: Any, body: Any, *args: Any, **kw: Any) -> Any:
        if body is None:  # protocol 2 (all we send); the body is decoded on demand
            problem = message_problem(task, message, signature)
            if problem:
                headers = message.headers or {}
                raise InvalidTaskError(
                    f"malformed task message {headers.get('id')} ({headers.get('task')}): {problem}"
                )
        return handler(message, body, *args, **kw)

    return checked


class CheckedTask(Task):  # type: ignore[misc]
    """Every task of the project: its messages are checked before Celery unpacks them."""

    Strategy = "agentsite.celery:checked_strategy"


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
