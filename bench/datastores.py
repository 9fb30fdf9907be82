"""The bench's own Postgres database and Redis DB, the environment every process shares, and
Django in the harness process (on the bench database, like the workers).

The bench drops and recreates its database on every invocation, so it refuses any database
whose name does not contain ``bench``; it flushes only its own Redis DB, and refuses DB 0
(the default every tool points at) and 15 (``make test``'s).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from harness.polling import HarnessError

from .options import ROOT, Options

# Not a secret: the bench's processes run DEBUG=0 (as in production), which needs one.
BENCH_SECRET_KEY = "bench-only-secret-key-0c9d1e8f5a7b43e6a1f2d3c4b5a69788"
FAKE_API_KEY = "sk-bench-fake-key"
# Every key the bench and the processes it starts write in Redis starts with this
# (AGENTSITE_REDIS_KEY_PREFIX: the broker's queues too), and the bench deletes only those: it can
# share a Redis database with make test or anything else.
KEY_PREFIX = "agentsite-bench:"


def database_name(url: str) -> str:
    """The database of ``url``; HarnessError unless its name contains "bench"."""
    parts = urlsplit(url)
    name = parts.path.lstrip("/")
    if parts.scheme not in ("postgres", "postgresql"):
        raise HarnessError(f"--database-url must be a postgres:// URL, not {url!r}")
    if "bench" not in name:
        raise HarnessError(
            f"refusing to drop database {name!r}: the bench only recreates a database whose "
            "name contains 'bench'"
        )
    return name


def redis_db(url: str) -> int:
    from redis.connection import parse_url

    parts = urlsplit(url)
    if parts.scheme != "redis":
        raise HarnessError(f"--broker-url must be a redis:// URL, not {url!r}")
    # As redis-py reads it: a ?db= in the query wins over the path.
    return int(parse_url(url).get("db") or 0)


def _delete_keys(url: str, *, keep: bytes = b"") -> None:
    """Delete the bench's keys (under KEY_PREFIX), but those starting with ``keep``."""
    import redis

    redis_db(url)
    client = redis.Redis.from_url(url)
    doomed = [
        key
        for key in client.scan_iter(match=KEY_PREFIX + "*", count=1000)
        if not (keep and key.startswith(keep))
    ]
    for start in range(0, len(doomed), 500):
        client.delete(*doomed[start : start + 500])


def _maintenance_dsn(url: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/postgres"))


def recreate_database(url: str) -> None:
    """DROP (forcing out any leftover connection) and CREATE the bench database."""
    import psycopg
    from psycopg import sql

    name = database_name(url)
    with psycopg.connect(_maintenance_dsn(url), autocommit=True) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))


def flush_redis(url: str) -> None:
    """Forget everything the bench kept in Redis (its keys only)."""
    _delete_keys(url)


def purge_queues(url: str) -> None:
    """Drop queued and unacknowledged messages but keep kombu's bindings (``_kombu.binding.*``):
    running workers' producers remember having declared their queues, so after a FLUSHDB their
    messages would vanish."""
    _delete_keys(url, keep=f"{KEY_PREFIX}_kombu.binding.".encode())


def app_environment(
    opts: Options, *, scratch: Path, fake_base_url: str = "", **extra: str
) -> dict[str, str]:
    """The environment of every process the bench starts (and of the harness itself)."""
    env = dict(os.environ)
    env.update(
        DATABASE_URL=opts.database_url,
        CELERY_BROKER_URL=opts.broker_url,
        REDIS_URL=opts.broker_url,
        BENCH_PROBE_REDIS_URL=opts.broker_url,
        DJANGO_SETTINGS_MODULE="agentsite.settings",
        SECRET_KEY=BENCH_SECRET_KEY,
        DEBUG="0",
        ALLOWED_HOSTS="127.0.0.1,localhost",
        LOG_LEVEL="WARNING",
        AGENTSITE_DATA_DIR=str(scratch),
        AGENTSITE_REDIS_KEY_PREFIX=KEY_PREFIX,
        STATIC_ROOT=str(scratch / "static"),
        AGENTSITE_PROVIDER_FAKE_API_KEY=FAKE_API_KEY,
        # Beat's schedule (idle scenario): every periodic task every 2 s.
        AGENTSITE_RECONCILE_INTERVAL="2",
        PYTHONUNBUFFERED="1",
    )
    if fake_base_url:
        env["AGENTSITE_PROVIDER_FAKE_BASE_URL"] = fake_base_url
    env.update(extra)
    (scratch / "static").mkdir(parents=True, exist_ok=True)
    return env


def migrate(env: dict[str, str], log: Path) -> None:
    """``manage.py migrate`` into the bench database (which also syncs the tool catalogue)."""
    with log.open("wb") as out:
        code = subprocess.call(
            [sys.executable, "manage.py", "migrate", "--noinput", "-v", "0"],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    if code != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
        raise HarnessError(f"manage.py migrate failed ({code}):\n{tail}")


def setup_django(env: dict[str, str]) -> Any:
    """Django in this process on the bench database; returns the Celery app (to send tasks)."""
    os.environ.update(env)
    import django

    django.setup()
    from agentsite.celery import app

    return app


def truncate_runs() -> None:
    """Empty the runs and everything hanging off them (steps, events, sessions, approvals,
    outbox, and the audit trail's seals, which would point at events no longer there), so the
    next scenario starts from an empty runs table."""
    from django.db import connection

    from agents.models import Run, Session, Step
    from approvals.models import Approval
    from audittrail.models import AuditEvent, AuditSeal, SealHorizon
    from tools.models import OutboxMessage

    tables = ", ".join(
        connection.ops.quote_name(model._meta.db_table)
        for model in (
            Run,
            Step,
            AuditEvent,
            Session,
            Approval,
            OutboxMessage,
            AuditSeal,
            SealHorizon,
        )
    )
    with connection.cursor() as cursor:
        cursor.execute(f"TRUNCATE {tables} CASCADE")


def vacuum_analyze(table: str = "") -> None:
    """VACUUM ANALYZE a table (or the whole database), so autovacuum has nothing left to do
    in the next measurement window."""
    from django.db import connection

    with connection.cursor() as cursor:
        target = f" {connection.ops.quote_name(table)}" if table else ""
        cursor.execute(f"VACUUM ANALYZE{target}")


def postgres_version() -> str:
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("SHOW server_version")
        return str(cursor.fetchone()[0])


def postgres_setting(name: str) -> str:
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("SELECT current_setting(%s)", [name])
        return str(cursor.fetchone()[0])


def redis_version(url: str) -> str:
    import redis

    info: dict[str, Any] = redis.Redis.from_url(url).info("server")  # type: ignore[assignment]
    return str(info.get("redis_version", "?"))


def transactions(database: str) -> int:
    """Committed plus rolled-back transactions of ``database`` so far (pg_stat_database)."""
    from django.db import DatabaseError, connection

    with connection.cursor() as cursor:
        # Postgres 15+: our own pending counts are flushed before we read.
        with contextlib.suppress(DatabaseError):
            cursor.execute("SELECT pg_stat_force_next_flush()")
        # A fresh snapshot each time: statistics are otherwise cached for the transaction.
        cursor.execute("SELECT pg_stat_clear_snapshot()")
        cursor.execute(
            "SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = %s",
            [database],
        )
        row = cursor.fetchone()
    return int(row[0]) if row else 0
