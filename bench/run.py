"""``python -m bench``: prepare the bench database and processes, run the scenarios, report.

Order: the bench database is recreated and migrated, its Redis DB flushed, the fake model
server started; ``api`` runs with gunicorn alone (no worker may take its queued runs); then the
workers start (every pool slot warm before anything is timed) for ``engine``, ``io``,
``approval`` and ``idle`` (which adds beat). A scenario that breaks is reported as BROKEN and
the next one still runs. Every process is stopped at the end, on failure and on Ctrl-C too.

Exit status: 0 when every selected scenario measured (targets missed or not), 1 when the bench
broke, 130 when interrupted.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import time
import traceback
from datetime import UTC, datetime
from types import FrameType
from typing import Any

from harness.polling import Deadline, HarnessError
from harness.processes import start_fake_server, start_workers, stop_all, wait_workers_ready

from . import datastores, report
from .options import Options, parse_args
from .scenarios import WITH_WORKERS, WITHOUT_WORKERS, Scenario
from .scenarios.base import Context, Probe, ScenarioResult, progress


class Interrupted(BaseException):
    """SIGTERM or SIGHUP: unwind like Ctrl-C, so every ``finally`` stops its processes."""


def _on_signal(signum: int, frame: FrameType | None) -> None:
    raise Interrupted(signal.Signals(signum).name)


def run_scenario(
    name: str, scenario: Scenario, ctx: Context, results: dict[str, ScenarioResult]
) -> None:
    """Run one scenario into ``results[name]``; a HarnessError (or a crash) makes it BROKEN with
    what was measured so far, and so does an interrupt (which goes on up)."""
    result = results[name] = ScenarioResult(name)
    started = time.monotonic()
    try:
        ctx.alive()
        ctx.probe.clear()
        scenario(ctx, result)
    except HarnessError as exc:
        result.error = str(exc)
    except Exception as exc:
        result.error = f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"
    except BaseException:
        result.error = "interrupted"
        raise
    finally:
        result.seconds = time.monotonic() - started
    if result.error:
        progress(f"{name}: BROKEN: {result.error}")
        _recover(ctx)
    else:
        progress(f"{name}: {result.verdict} in {result.seconds:.1f} s")


def _recover(ctx: Context) -> None:
    """After a broken scenario: drop its queued work, so the next one measures only its own."""
    try:
        datastores.purge_queues(ctx.opts.broker_url)
        datastores.truncate_runs()
    except Exception as exc:
        progress(f"could not clean up after the broken scenario: {exc}")


def measure(opts: Options, results: dict[str, ScenarioResult]) -> None:
    """Run every selected scenario into ``results``; HarnessError if the bench cannot start."""
    logs = opts.results_dir / "logs"
    scratch = opts.results_dir / "scratch"
    for folder in (logs, scratch):
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
    database = datastores.database_name(opts.database_url)
    datastores.redis_db(opts.broker_url)

    progress(f"recreating database {database} and flushing {opts.broker_url}")
    datastores.recreate_database(opts.database_url)
    datastores.flush_redis(opts.broker_url)
    fake = start_fake_server(env=datastores.app_environment(opts, scratch=scratch), logs=logs)
    env = datastores.app_environment(opts, scratch=scratch, fake_base_url=fake.base_url)
    progress("migrating")
    datastores.migrate(env, logs / "migrate.log")
    app = datastores.setup_django(env)
    ctx = Context(
        opts=opts,
        app=app,
        env=env,
        logs=logs,
        scratch=scratch,
        fake=fake,
        probe=Probe(opts.broker_url),
        database=database,
    )
    for name, scenario in WITHOUT_WORKERS.items():
        if name in opts.only:
            run_scenario(name, scenario, ctx, results)
    if any(name in opts.only for name in WITH_WORKERS):
        progress(
            f"starting {opts.workers} workers (-P {opts.pool} -c {opts.concurrency}) "
            f"on {opts.broker_url}"
        )
        ctx.workers = start_workers(
            opts.workers,
            name="bench",
            pool=opts.pool,
            concurrency=opts.concurrency,
            include=("bench.probe",),
            env=env,
            logs=logs,
        )
        wait_workers_ready(
            app,
            [w.nodename for w in ctx.workers],
            Deadline(90, "the workers to answer a ping"),
            alive=ctx.alive,
        )
        for name, scenario in WITH_WORKERS.items():
            if name in opts.only:
                run_scenario(name, scenario, ctx, results)


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _on_signal)
    started = datetime.now(UTC)
    load_before = os.getloadavg()  # other work on the machine (ours has not started)
    results: dict[str, ScenarioResult] = {}
    fatal: str | None = None
    interrupted = False
    try:
        measure(opts, results)
    except HarnessError as exc:
        fatal = str(exc)
    except (KeyboardInterrupt, Interrupted) as exc:
        interrupted = True
        fatal = f"interrupted ({type(exc).__name__} {exc})"
    finally:
        progress("stopping every process")
        stop_all()
    machine_info: dict[str, Any] = {}
    try:
        machine_info = report.machine(opts)
    except Exception as exc:
        machine_info = {"error": f"{type(exc).__name__}: {exc}"}
    machine_info["load_average_before"] = load_before
    path = report.write(
        opts,
        results,
        started=started,
        finished=datetime.now(UTC),
        fatal=fatal,
        machine_info=machine_info,
    )
    print(report.table(results, opts, machine_info))
    if fatal:
        print(f"\nBENCH BROKEN: {fatal}", file=sys.stderr)
    print(f"\nfigures: {path}")
    if interrupted:
        return 130
    return 1 if fatal or any(r.error for r in results.values()) else 0
