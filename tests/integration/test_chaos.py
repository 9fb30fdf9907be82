"""The fault-injection suite's short version, as ``make test`` runs it: real workers, beat, the
API and the fake model server; one worker SIGKILLed and Redis restarted empty (every queued
message lost) while runs are submitted; then every check of ``make chaos``."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest
from django.conf import settings

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(
    not settings.DATABASES["default"]["ENGINE"].endswith("postgresql"),
    reason="the chaos suite needs Postgres: run it with `make test`",
)
def test_a_worker_kill_and_a_broker_flush_lose_nothing_and_do_nothing_twice(tmp_path):
    # A database of the suite's own on the test server (the full suite runs its own server,
    # to restart it); the suite runs its own Redis, which it kills.
    parts = urlsplit(os.environ["DATABASE_URL"])
    database_url = urlunsplit(parts._replace(path=f"/test_agentsite_chaos_{os.getpid()}"))
    results = tmp_path / "chaos"
    argv = [
        sys.executable, "-m", "chaos", "--short", "--runs", "40", "--seconds", "10",
        "--quiesce-timeout", "120", "--database-url", database_url, "--results", str(results),
    ]  # fmt: skip
    # In a session of its own: on a timeout the whole suite (workers, Redis, API...) is
    # stopped, SIGTERM first so it removes what it made.
    harness = subprocess.Popen(
        argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        stdout, stderr = harness.communicate(timeout=400)
    except subprocess.TimeoutExpired:
        os.killpg(harness.pid, signal.SIGTERM)
        try:
            stdout, stderr = harness.communicate(timeout=30)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(harness.pid, signal.SIGKILL)
        pytest.fail(f"the chaos suite did not finish in 400 s:\n{stderr[-4000:]}")
    done = subprocess.CompletedProcess(argv, harness.returncode, stdout, stderr)
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr[-4000:]}"
    summary = json.loads((results / "summary.json").read_text())
    figures = summary["figures"]
    assert summary["violations"] == []
    assert [f.split(" ", 1)[1] for f in figures["faults"]] == [
        "SIGKILL worker 1 (restarted 1 s later)",
        "Redis killed and restarted empty (every message lost)",
    ]
    assert figures["runs_accepted"] == 40 and figures["lost"] == 0
    assert sum(figures["statuses"].values()) == 40
    assert figures["outbox_rows"] > 0 and figures["outbox_rows"] == figures["outbox_delivered"]
    assert "verdict" in done.stdout and "PASS" in done.stdout
