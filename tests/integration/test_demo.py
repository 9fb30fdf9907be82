"""`manage.py demo` (what `make demo` runs after migrate and seed_demo), end to end."""

from __future__ import annotations

import contextlib
import io
import os
import re
import signal
import subprocess
import sys

import pytest
from django.conf import settings
from django.core.management import call_command

from agents.models import Run
from approvals.models import Approval
from harness.processes import ROOT
from tests.support.processes import suite_database_url, uses_real_services

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]


def test_the_demo_runs_every_agent_to_success_including_a_reviewed_refund():
    if not uses_real_services():
        pytest.skip("needs Postgres and Redis: run it with `make test`")
    call_command("seed_demo", stdout=io.StringIO())
    env = {
        **os.environ,
        "DATABASE_URL": suite_database_url(),
        "CELERY_BROKER_URL": settings.CELERY_BROKER_URL,
        # Queues of its own: the demo's worker and the session's worker (which has the test
        # tools, the demo's has not) never take each other's tasks.
        "AGENTSITE_REDIS_KEY_PREFIX": f"{settings.AGENTSITE_REDIS_KEY_PREFIX}demo-{os.getpid()}:",
    }
    try:
        result = subprocess.run(
            [sys.executable, "manage.py", "demo", "--timeout", "60"],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=180,
        )
    except subprocess.TimeoutExpired as expired:
        # The demo's worker is in a session of its own: stop it too, or it outlives the suite.
        output = expired.stdout.decode() if isinstance(expired.stdout, bytes) else expired.stdout
        found = re.search(r"started a Celery worker \(pid (\d+)", output or "")
        if found:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(int(found.group(1)), signal.SIGKILL)
        raise

    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "demo finished: every run succeeded" in result.stdout
    assert "waiting for a reviewer: tool_requires_approval" in result.stdout
    assert set(Run.objects.values_list("status", flat=True)) == {Run.Status.SUCCEEDED}
    assert Run.objects.count() == 3
    approval = Approval.objects.get()
    assert approval.status == Approval.Status.APPROVED
    assert approval.decided_by.username == "demo-reviewer"
