"""The table on stdout and ``latest.json``: every raw figure, the flags, the commit, the machine."""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

from .options import ROOT, SCENARIOS, Options
from .scenarios.base import ScenarioResult


def git_state() -> dict[str, Any]:
    def git(*args: str) -> str:
        try:
            return subprocess.run(
                ["git", *args], cwd=ROOT, capture_output=True, text=True, check=False
            ).stdout.strip()
        except OSError:
            return ""

    return {
        "commit": git("rev-parse", "HEAD"),
        "branch": git("rev-parse", "--abbrev-ref", "HEAD"),
        "dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def _memory_total_mb() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "-"


def machine(opts: Options) -> dict[str, Any]:
    """What the figures were measured on. Versions of the servers are asked of them (each part
    degrades to "?" if the bench broke before they were reachable)."""
    info: dict[str, Any] = {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_model": _cpu_model(),
        "memory_total_mb": _memory_total_mb(),
        "load_average_after": os.getloadavg(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "packages": {
            name: _version(name)
            for name in ("django", "celery", "kombu", "gevent", "psycopg", "redis", "gunicorn")
        },
        "py_spy": bool(shutil.which("py-spy")) or Path(sys.executable).with_name("py-spy").exists(),
    }
    from . import datastores

    for key, read in (
        ("postgres", datastores.postgres_version),
        ("postgres_max_connections", lambda: datastores.postgres_setting("max_connections")),
        ("redis", lambda: datastores.redis_version(opts.broker_url)),
    ):
        try:
            info[key] = read()
        except Exception as exc:
            info[key] = f"? ({type(exc).__name__})"
    return info


def table(results: dict[str, ScenarioResult], opts: Options, machine_info: dict[str, Any]) -> str:
    """A line saying what ran where; one row per scenario (measured, baseline, ratio, target,
    verdict); then each target and note."""
    load = machine_info.get("load_average_before") or ()
    title = (
        f"{'quick' if opts.quick else 'full'} run: {opts.workers} workers -P {opts.pool} "
        f"-c {opts.concurrency}, {opts.web_workers} web workers; "
        f"{machine_info.get('nproc', '?')} CPUs, load before "
        f"{' '.join(f'{x:.2f}' for x in load)}"
    )
    header = ("scenario", "measured", "baseline", "ratio", "target", "result")
    rows = [header]
    for name in SCENARIOS:
        result = results.get(name)
        if result is None:
            continue
        rows.append(
            (
                name,
                result.measured or "-",
                result.baseline or "-",
                f"{result.ratio:.2f}" if result.ratio is not None else "-",
                result.target or "-",
                result.verdict,
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        for row in rows
    ]
    lines.insert(1, "  ".join("-" * width for width in widths))
    details = []
    for name in SCENARIOS:
        result = results.get(name)
        if result is None:
            continue
        for check in result.checks:
            details.append(f"  {name}: {check.describe()}")
        for note in result.notes:
            details.append(f"  {name}: {note}")
        if result.error:
            first = result.error.strip().splitlines()[0] if result.error.strip() else "?"
            details.append(f"  {name}: BROKEN: {first}")
    return "\n".join([title, "", *lines] + ([""] + details if details else []))


def write(
    opts: Options,
    results: dict[str, ScenarioResult],
    *,
    started: datetime,
    finished: datetime,
    fatal: str | None,
    machine_info: dict[str, Any],
) -> Path:
    """``latest.json`` (and a dated copy beside it) in the results directory."""
    document = {
        "started_at": started.isoformat(),
        "finished_at": finished.isoformat(),
        "seconds": (finished - started).total_seconds(),
        "flags": opts.as_dict(),
        "git": git_state(),
        "machine": machine_info,
        "broken": bool(fatal or any(r.error for r in results.values())),
        "fatal": fatal,
        "scenarios": {name: results[name].as_dict() for name in SCENARIOS if name in results},
    }
    opts.results_dir.mkdir(parents=True, exist_ok=True)
    text = json.dumps(document, indent=2, default=str)
    latest = opts.results_dir / "latest.json"
    latest.write_text(text)
    (opts.results_dir / f"run-{started:%Y%m%d-%H%M%S}.json").write_text(text)
    return latest
