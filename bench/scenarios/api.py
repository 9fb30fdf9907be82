"""API intake: ``POST /api/v1/runs/`` under the production server (gunicorn with uvicorn
workers, DEBUG=0), against ``GET /api/v1/whoami/`` (authenticated, trivial) on the same server,
with the same key and the same number of clients.

No worker runs: the submitted runs stay queued, and their messages are flushed afterwards. The
per-key rate limit is off (``AGENTSITE_API_RATE_LIMIT=``) and so is the cap on unfinished runs
(``AGENTSITE_MAX_ACTIVE_RUNS_PER_KEY=0``), or the bench would measure 429s.

Figures (per endpoint, from ``bench.loadgen`` in its own process; the baseline is measured
right before the POSTs and again right after, and pooled):

- ``rps``: answers per second over ``--api-seconds`` after ``--api-warmup`` seconds of load,
  with ``--api-clients`` keep-alive connections each sending its next request on the answer.
- ``latency_ms``: p50/p90/p99/max, from sending the request to the answer's last byte.
- ``errors``: non-2xx answers and failed connections (reported; a target of none).
- ``cpu``: CPU used by gunicorn and its workers, Postgres, Redis and the load generator during
  the pass (warm-up included), and per request (an estimate: the warm-up's requests are
  counted at the measured rate). Closed-loop clients make latency = clients / rps (Little's
  law): p99 <= 100 ms at 50 clients needs well over 500 rps.

Targets: POST rps >= 50% of whoami rps; POST p99 <= 100 ms.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
from typing import Any

from harness.polling import HarnessError
from harness.processes import start_api

from ..datastores import flush_redis, truncate_runs
from ..options import ROOT
from ..procstat import CpuMeter
from ..stats import ratio
from .base import Check, Context, ScenarioResult, cpu_breakdown, fmt, make_agent, progress

RUNS_PATH = "/api/v1/runs/"
WHOAMI_PATH = "/api/v1/whoami/"


def run(ctx: Context, result: ScenarioResult) -> None:
    from django.contrib.auth.models import User

    from agents.services import create_api_key

    opts = ctx.opts
    result.target = ">= 0.5, p99 <= 100 ms"
    user = User.objects.create_user("bench-api")
    _, key = create_api_key(user=user, name="bench")
    make_agent("bench-api", route="scripted:bench", grants={}, script=[{"text": "ok"}])
    body = json.dumps({"agent": "bench-api", "input": "How long do refunds take?"})
    env = {**ctx.env, "AGENTSITE_API_RATE_LIMIT": "", "AGENTSITE_MAX_ACTIVE_RUNS_PER_KEY": "0"}

    progress(f"api: gunicorn with {opts.web_workers} uvicorn workers")
    server = start_api(workers=opts.web_workers, env=env, logs=ctx.logs)
    try:
        _smoke_test(server.base_url, key, body)
        meter = CpuMeter(
            trees={"gunicorn": [server.process.pid]},
            commands={"postgres": "postgres", "redis": "redis-server"},
        )
        progress(f"api: baseline GET {WHOAMI_PATH}, {opts.api_clients} clients")
        before = _load(ctx, meter, server.port, "GET", WHOAMI_PATH, key, None)
        progress(f"api: POST {RUNS_PATH}, {opts.api_clients} clients")
        post = _load(ctx, meter, server.port, "POST", RUNS_PATH, key, body)
        progress(f"api: baseline again, GET {WHOAMI_PATH}")
        after = _load(ctx, meter, server.port, "GET", WHOAMI_PATH, key, None)
        server.process.check()
    finally:
        server.process.stop(grace=10)
    # The runs stay queued: drop their messages and rows so later scenarios start clean.
    flush_redis(opts.broker_url)
    truncate_runs()

    p99 = post["latency_ms"]["p99"]
    whoami = {
        "rps": (before["requests"] + after["requests"])
        / (before["duration_s"] + after["duration_s"]),
        "errors": before["errors"] + after["errors"],
        "latency_ms": {
            q: max(before["latency_ms"][q] or 0, after["latency_ms"][q] or 0)
            for q in ("p50", "p99")
        },
        "before": before,
        "after": after,
    }
    result.figures.update(web_workers=opts.web_workers, post=post, whoami=whoami)
    result.measured = f"{fmt(post['rps'])} POST/s, p99 {fmt(p99)} ms"
    result.baseline = f"{fmt(whoami['rps'])} whoami/s, p99 {fmt(whoami['latency_ms']['p99'])} ms"
    result.ratio = ratio(post["rps"], whoami["rps"])
    result.checks = [
        Check("POST rps vs whoami rps", result.ratio, ">=", 0.5),
        Check("POST p99 latency", p99, "<=", 100, "ms"),
        Check(
            "errors (non-2xx, failed connections)",
            float(post["errors"] + whoami["errors"]),
            "<=",
            0,
        ),
    ]


def _smoke_test(base_url: str, key: str, body: str) -> None:
    """One request of each kind answers as expected, or the load would measure errors."""
    import http.client

    host, port = base_url.removeprefix("http://").split(":")
    for method, path, payload, expected in (
        ("GET", WHOAMI_PATH, None, 200),
        ("POST", RUNS_PATH, body, 202),
    ):
        conn = http.client.HTTPConnection(host, int(port), timeout=10)
        headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
        conn.request(method, path, body=payload, headers=headers)
        answer = conn.getresponse()
        text = answer.read().decode(errors="replace")
        conn.close()
        if answer.status != expected:
            raise HarnessError(
                f"{method} {path} answered {answer.status}, not {expected}: {text[:300]}"
            )


def _load(
    ctx: Context,
    meter: CpuMeter,
    port: int,
    method: str,
    path: str,
    key: str,
    body: str | None,
) -> dict[str, Any]:
    """One pass of ``bench.loadgen``: its figures, and the CPU the server, Postgres, Redis and
    the load generator itself used meanwhile (per request, in ``cpu``)."""
    opts = ctx.opts
    argv = [
        sys.executable,
        "-m",
        "bench.loadgen",
        "--port",
        str(port),
        "--method",
        method,
        "--path",
        path,
        "--header",
        f"Authorization: Bearer {key}",
        "--clients",
        str(opts.api_clients),
        "--duration",
        str(opts.api_seconds),
        "--warmup",
        str(opts.api_warmup),
    ]
    if body is not None:
        argv += ["--body", body]
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    meter.start()
    try:
        done = subprocess.run(
            argv,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=opts.api_seconds + opts.api_warmup + 60,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise HarnessError(f"the load generator ({method} {path}) did not finish in time") from None
    if done.returncode != 0:
        raise HarnessError(f"the load generator failed ({done.returncode}):\n{done.stderr[-2000:]}")
    used = meter.stop()
    spent = resource.getrusage(resource.RUSAGE_CHILDREN)
    used["loadgen"] = (spent.ru_utime + spent.ru_stime) - (children.ru_utime + children.ru_stime)
    figures = dict(json.loads(done.stdout))
    # The warm-up is inside the CPU window: per request, count every request it sent.
    sent = figures["requests"] * (opts.api_seconds + opts.api_warmup) / opts.api_seconds
    figures["cpu"] = cpu_breakdown(used, round(sent), "request")
    return figures
