"""Which queues live workers consume, from a heartbeat each worker refreshes.

Every worker process that consumes tasks publishes, four times per
``AGENTSITE_WORKER_HEARTBEAT_TTL`` (at most every 5 s), its name and the queues it consumes
now; an entry not refreshed for ``AGENTSITE_WORKER_HEARTBEAT_TTL`` seconds is a worker that is
gone (killed, partitioned, stopped). Readers (``/readyz``, the
``agentsite_queue_consumers`` gauge, the admin, ``manage.py stats``, ``run_agent --wait``) get
the live workers in one round trip, without a broadcast ``inspect`` to every worker, so a probe
every few seconds costs nothing.

With Redis: a sorted set of worker names scored by when each entry expires, on Redis's clock
(so the workers' clocks do not matter), and a hash of their queues; both keys carry a TTL, so
with no worker left nothing stays behind. Without Redis (the embedded development default, one
machine): a JSON file per worker under the data directory, judged by its modification time.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from django.conf import settings

from . import rediskeys

logger = logging.getLogger(__name__)

MAX_INTERVAL = 5.0

# KEYS: the sorted set of names, the hash of queues. ARGV: name, queues (JSON), ttl (ms).
_BEAT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local gone = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now)
for _, name in ipairs(gone) do redis.call('HDEL', KEYS[2], name) end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[1])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
redis.call('PEXPIRE', KEYS[2], ARGV[3])
return 1
"""
# KEYS: the sorted set, the hash. Returns the live names and their queues, alternately.
_LIVE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local names = redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. now, '+inf')
local out = {}
for _, name in ipairs(names) do
  table.insert(out, name)
  table.insert(out, redis.call('HGET', KEYS[2], name) or '[]')
end
return out
"""
_GONE = """
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[1])
return 1
"""


@dataclass(frozen=True)
class Worker:
    name: str
    queues: tuple[str, ...]


def _ttl() -> float:
    return float(settings.AGENTSITE_WORKER_HEARTBEAT_TTL)


def interval() -> float:
    """Seconds between a worker's heartbeats: a quarter of the TTL, at most 5."""
    return min(MAX_INTERVAL, _ttl() / 4)


def _keys() -> list[str]:
    return [rediskeys.key("workers"), rediskeys.key("workers:queues")]


def _directory() -> Path:
    return Path(settings.DATA_DIR) / "workers"


def _file(name: str) -> Path:
    return _directory() / (name.replace("/", "_") + ".json")


def beat(name: str, queues: list[str]) -> None:
    """Say that worker ``name`` is alive and consumes ``queues`` (raises on a Redis error)."""
    payload = json.dumps(sorted(queues))
    if settings.REDIS_URL:
        rediskeys.script(_BEAT)(keys=_keys(), args=[name, payload, int(_ttl() * 1000)])
        return
    directory = _directory()
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / f".{os.getpid()}.tmp"
    tmp.write_text(json.dumps({"name": name, "queues": sorted(queues)}))
    tmp.replace(_file(name))


def withdraw(name: str) -> None:
    """Worker ``name`` stopped: forget it at once rather than when its heartbeat expires."""
    try:
        if settings.REDIS_URL:
            rediskeys.script(_GONE)(keys=_keys(), args=[name])
        else:
            _file(name).unlink(missing_ok=True)
    except Exception as exc:  # best effort: the entry expires anyway
        logger.warning("could not withdraw worker heartbeat %s: %s", name, exc)


def live_workers() -> list[Worker]:
    """The workers whose heartbeat is fresh. Raises if the store cannot be read."""
    if settings.REDIS_URL:
        reply = rediskeys.script(_LIVE)(keys=_keys())
        pairs = zip(reply[::2], reply[1::2], strict=True)
        return [Worker(_text(name), tuple(json.loads(_text(queues)))) for name, queues in pairs]
    directory = _directory()
    if not directory.is_dir():
        return []
    oldest = time.time() - _ttl()
    workers = []
    for path in directory.glob("*.json"):
        try:
            if path.stat().st_mtime < oldest:
                continue
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue  # being replaced, or removed meanwhile
        workers.append(Worker(str(data.get("name", path.stem)), tuple(data.get("queues", ()))))
    return sorted(workers, key=lambda w: w.name)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def celery_queues() -> list[str]:
    """Every queue of the project (``CELERY_TASK_QUEUES``: each routed one and the default)."""
    return sorted(str(queue.name) for queue in settings.CELERY_TASK_QUEUES)


def consumers(queues: list[str] | None = None) -> dict[str, int]:
    """Live workers per queue, for ``queues`` (default: every queue of the project)."""
    counts = Counter(queue for worker in live_workers() for queue in worker.queues)
    return {queue: counts.get(queue, 0) for queue in (queues or celery_queues())}


def queues_without_consumer() -> list[str] | None:
    """The project's queues no live worker consumes, or None if that cannot be told now."""
    try:
        return sorted(queue for queue, count in consumers().items() if count == 0)
    except Exception as exc:
        logger.warning("worker heartbeats unreadable: %s", exc)
        return None


class Heartbeat:
    """The thread (a greenlet under gevent) that keeps one worker's entry fresh."""

    def __init__(self, name: str, queues: Any) -> None:
        self.name = name
        self._queues = queues  # a callable: the queues consumed now (they may change)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="agentsite-heartbeat", daemon=True)
        self._failing = False

    def start(self) -> Heartbeat:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)  # a beat in flight would bring the entry back
        withdraw(self.name)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                beat(self.name, list(self._queues()))
                if self._failing:
                    logger.info("worker heartbeat restored")
                self._failing = False
            except Exception as exc:
                if not self._failing:
                    logger.warning("worker heartbeat not written: %s", exc)
                self._failing = True
            self._stop.wait(interval())
