"""Imported into every bench worker (``celery worker --include bench.probe``): times each task.

For every task a worker runs, the ``task_prerun`` and ``task_postrun`` signals time it (its
*wall* time in the worker, from signal to signal), and the model providers
(``ScriptedProvider.complete``, ``OpenAICompatibleProvider.complete``) and every tool function
of ``tools.registry`` are wrapped to add up the time the task spent inside them (its *external*
time: the model call or the tool function itself, nothing of the engine around them). At postrun
one compact JSON record is pushed onto the Redis list ``bench:probe`` in the bench's Redis DB:

    {"n": task name, "id": task id, "w": wall ms, "x": external ms, "m": model calls,
     "k": tool calls, "q": database statements, "c": ms getting a database connection,
     "xs"/"xe": when its first model/tool call began and its last ended (unix time),
     "s": start (unix time), "e": end (unix time), "st": state, "p": pid}

The bench computes the engine's overhead per step as ``w - x`` for the tasks with ``m`` or
``k``; the other tasks performed no step (a nudge that found nothing to do, a baseline task).

Timings are kept per task id, not in a plain global: under ``-P gevent`` (or threads) hundreds
of tasks run at once in one process. The task a wrapped call belongs to is found through
Celery's own current-task stack, which is greenlet- and thread-local.

This module also defines the baseline tasks (``bench.noop``, ``bench.wait``) and the
``bench_profile`` remote-control command, which starts and stops pyinstrument in a worker.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from celery import current_app, current_task, shared_task
from celery.signals import task_postrun, task_prerun
from celery.worker.control import control_command
from django.db.backends.signals import connection_created
from django.dispatch import receiver

logger = logging.getLogger(__name__)

PROBE_KEY = "agentsite-bench:probe"  # under the key prefix of bench.datastores
_MARK = "__bench_probe__"


@dataclass
class _Timing:
    started: float  # time.perf_counter() at prerun
    started_at: float  # time.time() at prerun, comparable with the bench's clock
    external: float = 0.0  # seconds inside model calls and tool functions
    model_calls: int = 0
    tool_calls: int = 0
    queries: int = 0  # database statements the task executed
    connecting: float = 0.0  # seconds getting a database connection (the pool's wait)
    external_from: float = 0.0  # time.time() when the first model/tool call began
    external_to: float = 0.0  # time.time() when the last one ended


# task id -> its timing; entries live from prerun to postrun of that task.
_timings: dict[str, _Timing] = {}
_instrumented = False
_instrument_lock = threading.Lock()
_client: Any = None


def _redis() -> Any:
    """The bench's Redis DB (``BENCH_PROBE_REDIS_URL``, else the broker). redis-py's pool is
    fork-aware and thread-safe, so one client per process serves every task."""
    global _client
    if _client is None:
        import redis

        url = os.environ.get("BENCH_PROBE_REDIS_URL") or current_app.conf.broker_url
        _client = redis.Redis.from_url(url)
    return _client


def _current_timing() -> _Timing | None:
    task = current_task._get_current_object()
    if task is None:
        return None
    task_id = getattr(task.request, "id", None)
    return _timings.get(task_id) if task_id else None


def _timed(func: Callable[..., Any], kind: str) -> Callable[..., Any]:
    """``func`` adding its duration to the current task's external time (``kind`` "model" or
    "tool"), or to its time getting a database connection ("connect")."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        timing = _current_timing()
        if timing is not None and kind != "connect" and not timing.external_from:
            timing.external_from = time.time()
        started = time.perf_counter()
        try:
            return func(*args, **kwargs)
        finally:
            if timing is not None:
                elapsed = time.perf_counter() - started
                if kind == "connect":
                    timing.connecting += elapsed
                else:
                    timing.external += elapsed
                    timing.external_to = time.time()
                    if kind == "model":
                        timing.model_calls += 1
                    else:
                        timing.tool_calls += 1

    setattr(wrapper, _MARK, True)
    return wrapper


def _instrument() -> None:
    """Wrap the providers and the tool functions, once per process (after Django is set up,
    so the tool registry is complete: the first task is late enough)."""
    global _instrumented
    if _instrumented:
        return
    with _instrument_lock:
        if _instrumented:
            return
        from django.db.backends.postgresql.base import DatabaseWrapper

        from agents.providers.openai_compat import OpenAICompatibleProvider
        from agents.providers.scripted import ScriptedProvider
        from tools.registry import registry

        for provider in (ScriptedProvider, OpenAICompatibleProvider):
            if not getattr(provider.complete, _MARK, False):
                provider.complete = _timed(provider.complete, "model")  # type: ignore[method-assign]
        # With Django's pool, a new connection is a checkout: waiting for a free one included.
        if not getattr(DatabaseWrapper.get_new_connection, _MARK, False):
            DatabaseWrapper.get_new_connection = _timed(  # type: ignore[method-assign]
                DatabaseWrapper.get_new_connection, "connect"
            )
        for name in registry.names():
            spec = registry.get(name)
            if spec is not None and not getattr(spec.func, _MARK, False):
                # ToolSpec is a frozen dataclass; the executor reads spec.func at call time.
                object.__setattr__(spec, "func", _timed(spec.func, "tool"))
        _instrumented = True


def _count_query(
    execute: Callable[..., Any], sql: str, params: Any, many: bool, context: Any
) -> Any:
    timing = _current_timing()
    if timing is not None:
        timing.queries += 1
    return execute(sql, params, many, context)


@receiver(connection_created)
def _on_connection(connection: Any, **_: Any) -> None:
    """Count the statements of every connection (the wrapper object lives per thread or
    greenlet, and reconnects for each task)."""
    if _count_query not in connection.execute_wrappers:
        connection.execute_wrappers.append(_count_query)


@task_prerun.connect
def _on_prerun(task_id: str | None = None, **_: Any) -> None:
    _instrument()
    if task_id:
        _timings[task_id] = _Timing(started=time.perf_counter(), started_at=time.time())


@task_postrun.connect
def _on_postrun(
    task_id: str | None = None, task: Any = None, state: str | None = None, **_: Any
) -> None:
    ended = time.perf_counter()
    ended_at = time.time()
    timing = _timings.pop(task_id, None) if task_id else None
    if timing is None:
        return
    record = {
        "n": getattr(task, "name", "?"),
        "id": task_id,
        "w": round((ended - timing.started) * 1000, 3),
        "x": round(timing.external * 1000, 3),
        "m": timing.model_calls,
        "k": timing.tool_calls,
        "q": timing.queries,
        "c": round(timing.connecting * 1000, 3),
        "xs": timing.external_from or None,
        "xe": timing.external_to or None,
        "s": timing.started_at,
        "e": ended_at,
        "st": state,
        "p": os.getpid(),
    }
    try:
        _redis().rpush(PROBE_KEY, json.dumps(record, separators=(",", ":")))
    except Exception:  # a lost record shows as a timeout in the bench, never a broken worker
        logger.exception("bench probe: could not push the record of task %s", task_id)


@shared_task(name="bench.noop", acks_late=True, ignore_result=True)
def noop(reply_to: str = "") -> None:
    """Nothing: the cost of one Celery task through the same broker, queue and worker. With
    ``reply_to``, push the time it started onto that Redis list (a round trip's far end)."""
    if reply_to:
        _redis().rpush(reply_to, repr(time.time()))


@shared_task(name="bench.wait", acks_late=True, ignore_result=True)
def wait(seconds: float) -> None:
    """Block ``seconds`` the way a model call does: ``time.sleep`` is cooperative under
    ``-P gevent`` (monkey-patched), and holds a slot under prefork or threads."""
    time.sleep(float(seconds))


_profiler: Any = None


@control_command(
    args=[("action", str), ("path", str)],
    signature="<start|stop> [path]",
)
def bench_profile(state: Any, action: str = "start", path: str = "", **_: Any) -> dict[str, Any]:
    """Start pyinstrument in this worker process, or stop it and write ``path`` (HTML) and
    ``path`` + ``.txt`` (functions by total and by self time, every task added up).
    Meaningful where tasks run in the process's main thread: ``-P gevent`` (greenlets share
    it) or ``-P solo``."""
    global _profiler
    if action == "start":
        from pyinstrument import Profiler

        if _profiler is None:
            _profiler = Profiler(interval=0.001, async_mode="disabled")
            _profiler.start()
        return {"ok": "started", "pid": os.getpid()}
    if action == "stop":
        if _profiler is None:
            return {"error": "not started"}
        profiler, _profiler = _profiler, None
        profiler.stop()
        if path:
            Path(path).write_text(profiler.output_html())
            # Greenlets show as threads in the tree; the flat views add them all up.
            flat = [
                f"== functions by {mode} time, all greenlets ==\n"
                + profiler.output_text(unicode=True, flat=True, flat_time=mode)
                for mode in ("total", "self")
            ]
            Path(path + ".txt").write_text("\n".join(flat))
        return {"ok": "stopped", "pid": os.getpid(), "path": path}
    return {"error": f"unknown action {action!r}"}
