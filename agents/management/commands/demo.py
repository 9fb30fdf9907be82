"""Start a real Celery worker, run the demo agents end to end, print their steps, stop the worker.

``make demo`` runs this after ``migrate`` and ``seed_demo``. It uses whatever database and broker
the settings point at: SQLite and the filesystem broker with no configuration, Postgres and
Redis when DATABASE_URL and CELERY_BROKER_URL are set.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from typing import Any

from django.conf import settings
from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandError

from agentsite.celery import app

DEMO_RUNS = [
    ("support-assistant", "How long do refunds take?"),
    ("math-tutor", "(17 + 25) * 3 / 7"),
]


def _redacted(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    return f"{scheme}{sep}{rest.rsplit('@', 1)[-1]}" if sep else url


class Command(BaseCommand):
    help = "Run the demo agents end to end on a real Celery worker process."

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("--timeout", type=float, default=120.0)

    def handle(self, *args: Any, **options: Any) -> None:
        database = settings.DATABASES["default"]
        self.stdout.write(
            f"database: {database['ENGINE'].rsplit('.', 1)[-1]} {database['NAME']}; "
            f"broker: {_redacted(settings.CELERY_BROKER_URL)}"
        )
        log = tempfile.NamedTemporaryFile(  # noqa: SIM115 - kept open for the worker's lifetime
            prefix="agentsite-demo-worker-", suffix=".log", delete=False
        )
        worker = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "agentsite",
                "worker",
                "-Q",
                "models,tools,maintenance,default",
                "--concurrency",
                "2",
                "--loglevel",
                "INFO",
                "-n",
                f"demo-{os.getpid()}@%h",
                "--without-gossip",
                "--without-mingle",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.stdout.write(f"started a Celery worker (pid {worker.pid}, log {log.name})")
        failed = []
        try:
            for slug, text in DEMO_RUNS:
                self.stdout.write(
                    self.style.MIGRATE_HEADING(f"\n$ run_agent {slug} {text!r} --wait")
                )
                try:
                    call_command(
                        "run_agent",
                        slug,
                        text,
                        wait=True,
                        timeout=options["timeout"],
                        stdout=self.stdout,
                    )
                except CommandError as exc:
                    self.stderr.write(str(exc))
                    failed.append(slug)
                if worker.poll() is not None:
                    raise CommandError(f"the worker exited early; see {log.name}")
        finally:
            self._stop(worker)
            app.close()
        if failed:
            raise CommandError(f"demo runs failed: {', '.join(failed)} (worker log: {log.name})")
        self.stdout.write(self.style.SUCCESS("\ndemo finished: every run succeeded"))

    def _stop(self, worker: subprocess.Popen[bytes]) -> None:
        if worker.poll() is None:
            worker.send_signal(signal.SIGTERM)  # warm shutdown: finish in-flight work
            try:
                worker.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(worker.pid, signal.SIGKILL)
                worker.wait()
        self.stdout.write(f"stopped the worker (exit code {worker.returncode})")
