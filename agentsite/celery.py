"""The Celery application, configured from Django settings (``CELERY_*``)."""

import inspect
import logging
import os
from typing import Any

from celery import Celery, Task
from celery.exceptions import InvalidTaskError
from celery.signals import (
    after_setup_logger,
    after_setup_task_logger,
    beat_init,
    before_task_publish,
    task_postrun,
    task_prerun,
    worker_init,
    worker_process_init,
    worker_process_shutdown,
    worker_ready,
    worker_shutdown,
)
from celery.worker.strategy import default as default_strategy

from . import rediskeys
from .heartbeats import Heartbeat

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


@app.on_configure.connect
def _settings_or_exit(**kwargs: Any) -> None:
    """A worker, beat or Flower with a bad setting says so in one line and exits."""
    # Imported here, not with the package: `python -m agentsite.envfile` (make demo) must run
    # the module before anything imports it (runpy warns otherwise).
    from .envfile import settings_or_exit

    settings_or_exit()


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
        reply: Any = rediskeys.client(url, timeout=2).config_get("maxmemory-policy")
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


# --- Observability (README, Observability) ----------------------------------------------------


def _is_prefork(sender: Any) -> bool:
    pool = sender.pool_cls if isinstance(sender.pool_cls, str) else sender.pool_cls.__module__
    return "prefork" in pool


@worker_init.connect
def _observe_worker(sender: Any = None, **kwargs: Any) -> None:
    """The worker's main process: name it in logs, start a fresh multiprocess metrics dir, and
    trace here unless the pool forks children (they set up their own exporter)."""
    from . import logs, metrics, tracing

    logs.set_service("worker")
    metrics.clear_multiprocess_dir()
    if not _is_prefork(sender):
        tracing.configure("agentsite-worker")
    elif not metrics.multiprocess_dir():
        # The children do the work: this process's registry would stay empty.
        _metrics_refused.append(
            "a prefork worker's metrics need PROMETHEUS_MULTIPROC_DIR (a directory of its own): "
            "its children do the work, and this process would serve none of it"
        )


_metrics_refused: list[str] = []


@worker_process_init.connect
def _observe_child(**kwargs: Any) -> None:
    from . import tracing

    tracing.configure("agentsite-worker")


@worker_process_shutdown.connect
def _child_gone(pid: int | None = None, **kwargs: Any) -> None:
    from . import metrics, tracing

    tracing.shutdown()
    metrics.process_gone(pid or os.getpid())


@worker_ready.connect
def _serve_metrics(**kwargs: Any) -> None:
    from django.conf import settings

    from . import metrics

    if _metrics_refused and settings.AGENTSITE_WORKER_METRICS_PORT is not None:
        logging.getLogger(__name__).error("worker metrics not served: %s", _metrics_refused[0])
        return
    metrics.serve_worker_metrics()


# --- Heartbeats (agentsite/heartbeats.py): which queues live workers consume -----------------

_heartbeat: list[Any] = []


def _consumed_queues(consumer: Any) -> list[str]:
    task_consumer = getattr(consumer, "task_consumer", None)
    if task_consumer is None:
        return []
    return [queue.name for queue in task_consumer.queues]


@worker_ready.connect(weak=False, dispatch_uid="agentsite.heartbeat.start")
def _start_heartbeat(sender: Any = None, **kwargs: Any) -> None:
    if sender is not None and not _heartbeat:
        _heartbeat.append(Heartbeat(sender.hostname, lambda: _consumed_queues(sender)).start())


@worker_shutdown.connect(weak=False, dispatch_uid="agentsite.heartbeat.stop")
def _stop_heartbeat(**kwargs: Any) -> None:
    while _heartbeat:
        _heartbeat.pop().stop()


@worker_shutdown.connect
def _flush_traces(**kwargs: Any) -> None:
    from . import tracing

    tracing.shutdown()


@after_setup_logger.connect(weak=False, dispatch_uid="agentsite.redact")
@after_setup_task_logger.connect(weak=False, dispatch_uid="agentsite.redact.task")
def _log_as_configured(logger: logging.Logger, **kwargs: Any) -> None:
    """Celery's own handlers get LOGGING's context, redaction and format (agentsite.logs)."""
    from . import logs

    logs.filter_celery_handlers(logger)


@beat_init.connect
def _observe_beat(**kwargs: Any) -> None:
    from . import logs

    logs.set_service("beat")


@before_task_publish.connect(weak=False, dispatch_uid="agentsite.trace.publish")
def _propagate_trace(headers: dict[str, Any] | None = None, **kwargs: Any) -> None:
    """Every message carries its publisher's trace context (a run's step, or the request that
    submitted the run) as ``traceparent``, and the time it was sent (for the queue's wait)."""
    if headers is not None:
        import time

        from . import metrics, tracing

        tracing.inject(headers)
        headers[metrics.SENT_HEADER] = time.time()


@task_prerun.connect(weak=False, dispatch_uid="agentsite.trace.prerun")
def _task_started(task_id: str = "", task: Any = None, **kwargs: Any) -> None:
    from . import metrics, tracing

    if task is not None:
        metrics.task_started(task)
        tracing.task_started(task, task_id)


@task_postrun.connect(weak=False, dispatch_uid="agentsite.trace.postrun")
def _task_ended(task: Any = None, state: str | None = None, retval: Any = None, **kw: Any) -> None:
    from . import tracing

    if task is not None:
        tracing.task_ended(task, state, retval)
