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
import time
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
            try:
                self._refund_story(options["timeout"])
            except CommandError as exc:
                self.stderr.write(str(exc))
                failed.append("refund-agent")
        finally:
            self._stop(worker)
            app.close()
        if failed:
            raise CommandError(f"demo runs failed: {', '.join(failed)} (worker log: {log.name})")
        self.stdout.write(self.style.SUCCESS("\ndemo finished: every run succeeded"))

    def _refund_story(self, timeout: float) -> None:
        """A refund above the threshold waits for a human; a demo reviewer approves it."""
        from django.contrib.auth.models import Group, User

        from agents.management.commands.run_agent import Command as RunAgent
        from agents.services import submit_run
        from approvals.apps import REVIEWERS_GROUP
        from approvals.models import Approval
        from approvals.services import decide

        text = "The parcel never arrived"
        self.stdout.write(
            self.style.MIGRATE_HEADING(
                f"\n$ run_agent refund-agent {text!r} --wait   "
                "(a refund above 50 EUR waits for a reviewer)"
            )
        )
        run = submit_run(agent="refund-agent", input=text)
        follower = RunAgent()
        follower.stdout, follower.stderr = self.stdout, self.stderr
        deadline = time.monotonic() + timeout
        while not Approval.objects.filter(run=run, status=Approval.Status.PENDING).exists():
            run.refresh_from_db()
            if run.is_final or time.monotonic() > deadline:
                raise CommandError(f"the refund run did not wait for a reviewer ({run.status})")
            time.sleep(0.2)
        run.refresh_from_db()
        self.stdout.write(f"run {run.status}")
        follower._describe_escalations(run)
        reviewer, created = User.objects.get_or_create(
            username="demo-reviewer", defaults={"is_staff": True}
        )
        if created:
            reviewer.set_unusable_password()
            reviewer.save()
        reviewer.groups.add(Group.objects.get(name=REVIEWERS_GROUP))
        reviewer = User.objects.get(pk=reviewer.pk)  # a fresh permission cache
        approval = Approval.objects.get(run=run, status=Approval.Status.PENDING)
        decide(approval.pk, decision="approve", user=reviewer, comment="Checked: approved.")
        self.stdout.write("  demo-reviewer approved it (in production: a person, in the admin)")
        follower._follow(run, timeout)

    def _stop(self, worker: subprocess.Popen[bytes]) -> None:
        if worker.poll() is None:
            worker.send_signal(signal.SIGTERM)  # warm shutdown: finish in-flight work
            try:
                worker.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(worker.pid, signal.SIGKILL)
                worker.wait()
        self.stdout.write(f"stopped the worker (exit code {worker.returncode})")
