"""``python -m chaos``: run the suite, print the summary table, exit 1 on any violation."""

from __future__ import annotations

import argparse
import atexit
import json
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from harness.polling import HarnessError

from .checks import Report
from .suite import ROOT, Options, Suite, log


def parse(argv: list[str] | None) -> Options:
    parser = argparse.ArgumentParser(
        prog="python -m chaos",
        description="Fault injection: submit runs while killing workers, restarting Redis and "
        "Postgres and making the model misbehave; then check nothing was lost or done twice.",
    )
    parser.add_argument("--runs", type=int, default=300, help="runs to submit (default 300)")
    parser.add_argument(
        "--seconds", type=float, default=45.0, help="submission period, faults spread over it"
    )
    parser.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    parser.add_argument("--concurrency", type=int, default=50, help="greenlets per worker")
    parser.add_argument(
        "--quiesce-timeout", type=float, default=300.0, help="seconds to wait for the end"
    )
    parser.add_argument("--seed", type=int, default=7, help="seed of the client's choices")
    parser.add_argument(
        "--short", action="store_true", help="one worker kill and one Redis restart only"
    )
    parser.add_argument(
        "--database-url",
        default="",
        help="use this database (its name must contain 'chaos'; it is dropped) on a Postgres "
        "the suite does not manage, instead of starting one; only with --short (no restart)",
    )
    parser.add_argument(
        "--results", type=Path, default=ROOT / "chaos" / "results", help="logs and summary"
    )
    args = parser.parse_args(argv)
    problems = []
    if args.runs < 1:
        problems.append("--runs must be at least 1")
    if args.workers < 2 and not args.short:
        problems.append("--workers must be at least 2 (the suite kills them in turn)")
    if args.workers < 1 or args.concurrency < 1:
        problems.append("--workers and --concurrency must be at least 1")
    if args.seconds < 5:
        problems.append("--seconds must be at least 5")
    if args.database_url and not args.short:
        problems.append("--database-url needs --short (the full suite restarts Postgres)")
    if problems:
        parser.error("; ".join(problems))
    return Options(
        runs=args.runs,
        submit_seconds=args.seconds,
        workers=args.workers,
        concurrency=args.concurrency,
        quiesce_timeout=args.quiesce_timeout,
        seed=args.seed,
        short=args.short,
        database_url=args.database_url,
        results_dir=args.results,
    )


def table(report: Report, seconds: float) -> str:
    f: dict[str, Any] = report.figures
    statuses = f.get("statuses", {})
    rows = [
        ("runs accepted (202)", f.get("runs_accepted")),
        (
            "ended",
            ", ".join(f"{n} {s}" for s, n in sorted(statuses.items())) or "none",
        ),
        ("lost (not final)", f.get("lost")),
        ("failed that should not have", f.get("wrongly_failed")),
        ("failed as expected (malformed model answer)", f.get("expected_failures")),
        ("failed as expected (injected faults on all 4 attempts)",
         f.get("failed_on_injected_faults")),
        ("cancelled by the client", f.get("cancelled_by_client")),
        ("approvals decided", f.get("approvals_decided")),
        ("faults injected", len(f.get("faults", []))),
        ("side effects in the outbox / delivered",
         f"{f.get('outbox_rows')} / {f.get('outbox_delivered')}"),
        ("side effects twice / missing",
         f"{f.get('side_effects_twice')} / {f.get('side_effects_missing')}"),
        ("e-mails re-sent, same Message-ID", f.get("sent_twice_same_message_id")),
        ("steps after a cancel", f.get("ran_after_cancel")),
        ("audit problems", f.get("audit_problems")),
        ("audit chain", f.get("audit_chain")),
        ("reconciler nudges / step retries / lease takeovers",
         f"{f.get('reconciler_nudges')} / {f.get('step_retries')} / {f.get('lease_takeovers')}"),
        ("client retries (5xx, 429, connection)", f.get("client_retries")),
        (
            "time to quiesce after the last fault",
            "never" if f.get("quiesced_after_s") is None else f"{f['quiesced_after_s']:.1f} s",
        ),
        ("suite wall time", f"{seconds:.0f} s"),
        ("verdict", "PASS" if report.passed else f"FAIL ({len(report.violations)} violations)"),
    ]  # fmt: skip
    width = max(len(name) for name, _ in rows)
    lines = [f"{name:<{width}}  {value}" for name, value in rows]
    lines += ["", "faults:"] + [f"  {line}" for line in f.get("faults", [])]
    if report.violations:
        lines += ["", "violations:"] + [f"  {v}" for v in report.violations[:50]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    opts = parse(argv)
    started = time.monotonic()
    suite = Suite(opts)
    # Whatever ends the suite (an error, Ctrl-C, SIGTERM from CI), its processes and its
    # Postgres (a daemon of pg_ctl, not a child) are stopped and removed.
    atexit.register(suite.close)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        report = suite.run()
    except HarnessError as exc:
        log(f"the suite broke: {exc}")
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception:
        log(f"the suite broke:\n{traceback.format_exc()}")
        sys.exit(2)
    finally:
        suite.close()
    seconds = time.monotonic() - started
    text = table(report, seconds)
    print(text)
    (opts.results_dir / "summary.txt").write_text(text + "\n")
    (opts.results_dir / "summary.json").write_text(
        json.dumps({"figures": report.figures, "violations": report.violations}, indent=2)
    )
    sys.exit(0 if report.passed else 1)
