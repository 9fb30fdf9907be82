"""gunicorn's settings for the web service (the Dockerfile and docker-compose pass
``--config gunicorn.conf.py``; gunicorn also reads this file by default from its directory).

Metrics: each gunicorn worker is a process of its own, and a scrape of ``/metrics`` reaches one
of them. prometheus-client's multiprocess mode makes every worker answer for all of them: they
write their samples to files in ``PROMETHEUS_MULTIPROC_DIR``, which is set here (before the
workers import the app) to a directory of this gunicorn's own, emptied when it starts.
"""

import os
import shutil
import tempfile

_given = os.environ.get("PROMETHEUS_MULTIPROC_DIR", "")
_dir = _given or os.path.join(tempfile.gettempdir(), f"agentsite-metrics-web-{os.getpid()}")
os.environ["PROMETHEUS_MULTIPROC_DIR"] = _dir


def on_starting(server):  # noqa: ARG001 (gunicorn's hook signature)
    """Before the workers start: a fresh directory (an earlier life's samples would add in)."""
    os.makedirs(_dir, exist_ok=True)
    for name in os.listdir(_dir):
        if name.endswith(".db"):
            os.unlink(os.path.join(_dir, name))


def child_exit(server, worker):  # noqa: ARG001
    """A worker ended: its live gauges go; its counters stay in the sums."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


def on_exit(server):  # noqa: ARG001
    if not _given:  # ours: gone with us (a directory the operator gave is left in place)
        shutil.rmtree(_dir, ignore_errors=True)
