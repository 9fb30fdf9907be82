"""A worker refuses to start where it would lose work, and says why."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from harness.polling import poll
from harness.processes import ROOT, free_port

pytestmark = pytest.mark.integration


@pytest.fixture
def evicting_redis(tmp_path: Path):
    """A Redis server of the test's own, configured to evict keys when memory runs out."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed")
    import redis

    port = free_port()
    process = subprocess.Popen(
        [
            binary,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(tmp_path),
            "--maxmemory",
            "64mb",
            "--maxmemory-policy",
            "allkeys-lru",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    try:
        poll(lambda: _pings(redis.Redis.from_url(url)), timeout=10, what="the test Redis")
        yield url
    finally:
        process.terminate()
        process.wait(timeout=10)


def _pings(client) -> bool:
    import redis

    try:
        return bool(client.ping())
    except redis.ConnectionError:
        return False


def test_a_worker_on_a_redis_that_evicts_refuses_to_start(evicting_redis):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "agentsite",
            "worker",
            "-P",
            "solo",
            "--without-gossip",
            "--without-mingle",
            "--loglevel",
            "WARNING",
        ],
        cwd=ROOT,
        env={**os.environ, "CELERY_BROKER_URL": evicting_redis},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "maxmemory-policy is 'allkeys-lru'" in result.stderr + result.stdout
    assert "noeviction" in result.stderr + result.stdout
