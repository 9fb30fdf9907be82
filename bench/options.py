"""The bench's flags: scenario sizes, the worker topology, where its database and Redis are."""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

SCENARIOS = ("engine", "io", "api", "approval", "idle")
POOLS = ("gevent", "prefork", "threads", "solo", "eventlet")
PROFILERS = ("pyinstrument", "py-spy")
ROOT = Path(__file__).resolve().parent.parent

# Sizes: (full run, --quick). The full sizes are the issue's.
SIZES: dict[str, tuple[float, float]] = {
    "engine_runs": (200, 50),
    "io_runs": (1000, 200),
    "api_seconds": (15, 5),
    "api_warmup": (3, 1),
    "approvals": (100, 30),
    "idle_seconds": (20, 10),
}


@dataclass(frozen=True)
class Options:
    """What one invocation measures, and on what. ``as_dict`` goes into latest.json."""

    quick: bool
    only: tuple[str, ...]
    engine_runs: int
    io_runs: int
    io_latency_ms: int
    api_clients: int
    api_seconds: float
    api_warmup: float
    approvals: int
    idle_seconds: float
    idle_runs: int
    workers: int
    pool: str
    concurrency: int
    web_workers: int
    profile: str | None
    database_url: str
    broker_url: str
    results_dir: Path

    @property
    def total_concurrency(self) -> int:
        """Task slots across every worker process: what bounds work in flight."""
        return self.workers * self.concurrency

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["only"] = list(self.only)
        data["results_dir"] = str(self.results_dir)
        return data


def _scenarios(value: str) -> tuple[str, ...]:
    names = tuple(dict.fromkeys(n.strip() for n in value.split(",") if n.strip()))
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown scenario(s) {', '.join(unknown) or '(none)'}; choose from "
            f"{', '.join(SCENARIOS)}"
        )
    return names


def _positive_int(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive integer")
    return number


def _positive_float(value: str) -> float:
    number = float(value)
    if number <= 0:
        raise argparse.ArgumentTypeError(f"{value} is not a positive number")
    return number


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description=(
            "Agentsite's benchmark suite: real worker, web and beat processes on a local "
            "Postgres and Redis, each scenario paired with a baseline measured in the same run. "
            "Prints a table and writes bench/results/latest.json. Exits 0 even when a target "
            "is missed; non-zero only when the bench itself broke (a run failed, a process "
            "died, a timeout)."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smaller sizes: every scenario in under two minutes in all "
        "(engine 50 runs, io 200, api 5 s, approval 30, idle 2 x 10 s)",
    )
    parser.add_argument(
        "--only",
        type=_scenarios,
        default=SCENARIOS,
        metavar="LIST",
        help=f"comma-separated scenarios to run, from {','.join(SCENARIOS)}",
    )
    sizes = parser.add_argument_group("sizes (defaults: full run / --quick)")
    sizes.add_argument("--engine-runs", type=_positive_int, help="engine: scripted runs (200 / 50)")
    sizes.add_argument(
        "--io-runs", type=_positive_int, help="io: runs submitted at once (1000 / 200)"
    )
    sizes.add_argument(
        "--io-latency-ms",
        type=_positive_int,
        default=500,
        help="io: latency of each model call at the fake server",
    )
    sizes.add_argument(
        "--api-clients", type=_positive_int, default=50, help="api: concurrent connections"
    )
    sizes.add_argument(
        "--api-seconds", type=_positive_float, help="api: seconds measured per endpoint (15 / 5)"
    )
    sizes.add_argument(
        "--api-warmup",
        type=float,
        help="api: seconds of load before measuring each endpoint (3 / 1)",
    )
    sizes.add_argument(
        "--approvals", type=_positive_int, help="approval: runs decided one by one (100 / 30)"
    )
    sizes.add_argument(
        "--idle-seconds", type=_positive_float, help="idle: length of each window (20 / 10)"
    )
    sizes.add_argument(
        "--idle-runs",
        type=_positive_int,
        default=10_000,
        help="idle: finished runs in the table for the second window",
    )
    topology = parser.add_argument_group("worker topology")
    topology.add_argument(
        "--workers", type=_positive_int, default=2, help="celery worker processes"
    )
    topology.add_argument("--pool", choices=POOLS, default="gevent", help="celery pool")
    topology.add_argument(
        "--concurrency", type=_positive_int, default=500, help="task slots per worker"
    )
    topology.add_argument(
        "--web-workers", type=_positive_int, default=2, help="gunicorn (uvicorn) workers"
    )
    topology.add_argument(
        "--profile",
        choices=PROFILERS,
        help="profile the workers during the engine scenario's runs; the profile goes to "
        "bench/results/ (pyinstrument needs --pool gevent or solo; py-spy works with any pool)",
    )
    where = parser.add_argument_group(
        "services (the bench drops its database, and deletes its keys in Redis)"
    )
    where.add_argument(
        "--database-url",
        default="postgres://postgres@127.0.0.1:5432/agentsite_bench",
        help="Postgres database, dropped and recreated; its name must contain 'bench'",
    )
    where.add_argument(
        "--broker-url",
        default="redis://127.0.0.1:6379/13",
        help="Redis DB for the broker and the probe; the bench's keys are under "
        "agentsite-bench: and only those are deleted",
    )
    where.add_argument(
        "--results-dir",
        type=Path,
        default=ROOT / "bench" / "results",
        help="where latest.json, logs and profiles go",
    )
    return parser


def parse_args(argv: list[str] | None = None) -> Options:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.profile == "pyinstrument" and args.pool not in ("gevent", "solo"):
        parser.error(
            "--profile pyinstrument samples the worker's main thread, where tasks run only "
            "under --pool gevent or solo; use --profile py-spy with this pool"
        )
    size = 1 if args.quick else 0

    def pick(name: str) -> Any:
        given = getattr(args, name)
        return given if given is not None else SIZES[name][size]

    return Options(
        quick=args.quick,
        only=tuple(n for n in SCENARIOS if n in args.only),
        engine_runs=int(pick("engine_runs")),
        io_runs=int(pick("io_runs")),
        io_latency_ms=args.io_latency_ms,
        api_clients=args.api_clients,
        api_seconds=float(pick("api_seconds")),
        api_warmup=float(pick("api_warmup")),
        approvals=int(pick("approvals")),
        idle_seconds=float(pick("idle_seconds")),
        idle_runs=args.idle_runs,
        workers=args.workers,
        pool=args.pool,
        concurrency=args.concurrency,
        web_workers=args.web_workers,
        profile=args.profile,
        database_url=args.database_url,
        broker_url=args.broker_url,
        results_dir=args.results_dir.resolve(),
    )
