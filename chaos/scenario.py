"""What the suite submits and which faults it injects, and when.

Four kinds of run, each on its own fake model (its script of tool calls lives in the fake
server), mixed round-robin:

* ``tools``: two tool calls in parallel (``calculator`` and ``send_email``, a side effect that
  goes through the outbox), then an answer;
* ``failing``: a tool call that fails (``calculator`` on ``1/0``), whose error the model reads
  before answering;
* ``approval``: ``send_email`` held for a reviewer; the suite's reviewer approves even-numbered
  runs and rejects odd ones over the approvals API;
* ``nonsense``: a plain tool turn on a model that answers malformed JSON for a while (a run
  that gets such an answer fails with ``provider_invalid_response``, by design: nonsense is not
  retried).

Every 7th run is cancelled over the API up to 3 s after it is submitted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

KINDS = ("tools", "failing", "approval", "tools", "nonsense")
CANCEL_EVERY = 7  # every 7th run (offset 3) is cancelled by the client: coprime with the
#                  five kinds, so every kind gets cancelled
MAIL_DOMAIN = "example.com"


def kind_of(index: int) -> str:
    return KINDS[index % len(KINDS)]


def cancels(index: int) -> bool:
    return index % CANCEL_EVERY == 3


def approves(index: int) -> bool:
    return index % 2 == 0


def email_call(subject: str = "{input}") -> dict[str, Any]:
    return {
        "name": "send_email",
        "arguments": {"to": [f"ops@{MAIL_DOMAIN}"], "subject": subject, "body": "chaos"},
    }


EMAIL_GRANT = {"constraints": {"to": {"email_domains": [MAIL_DOMAIN]}}}

#: kind -> (fake model, its tool-call script, the agent's grants)
AGENTS: dict[str, tuple[str, list[list[dict[str, Any]]], dict[str, Any]]] = {
    "tools": (
        "chaos-tools",
        [[{"name": "calculator", "arguments": {"expression": "6*7"}}, email_call()]],
        {"calculator": "allow", "send_email": {"mode": "allow", **EMAIL_GRANT}},
    ),
    "failing": (
        "chaos-failing",
        [[{"name": "calculator", "arguments": {"expression": "1/0"}}]],
        {"calculator": "allow"},
    ),
    "approval": (
        "chaos-approval",
        [[email_call()]],
        {"send_email": {"mode": "require_approval", **EMAIL_GRANT}},
    ),
    "nonsense": (
        "chaos-nonsense",
        [[{"name": "calculator", "arguments": {"expression": "2+2"}}]],
        {"calculator": "allow"},
    ),
}
FINAL = "done: {input}"
#: The model call timeout the workers get (AGENTSITE_PROVIDER_FAKE_TIMEOUT).
PROVIDER_TIMEOUT = 2
#: Seconds during which every call of the faulty models fails. Shorter than what a step's
#: retries span with the default backoff (4 attempts, 1 s base: at least 3.5 s), so a run
#: that fails on it is one that should not have: the retries did not do their job.
ERROR_WINDOW = 2.0
#: Models whose calls get the 500s, 429s and timeouts.
FAULTY_MODELS = ("chaos-tools", "chaos-failing", "chaos-approval")


@dataclass(frozen=True)
class Fault:
    """One fault, ``at`` seconds after the first submission."""

    at: float
    kind: str  # worker_kill, redis_restart, postgres_restart, model_500, model_429,
    #            model_timeouts, model_malformed
    target: int = 0  # which worker, for worker_kill

    def describe(self) -> str:
        return {
            "worker_kill": f"SIGKILL worker {self.target + 1} (restarted 1 s later)",
            "redis_restart": "Redis killed and restarted empty (every message lost)",
            "postgres_restart": "Postgres stopped (fast), down 3 s, started",
            "model_500": f"every model call answers HTTP 500 for {ERROR_WINDOW:g} s",
            "model_429": (
                f"every model call answers HTTP 429, Retry-After: 1, for {ERROR_WINDOW:g} s"
            ),
            "model_timeouts": (
                f"model calls take {PROVIDER_TIMEOUT + 2} s "
                f"(timeout {PROVIDER_TIMEOUT} s) for 2.5 s"
            ),
            "model_malformed": "the nonsense model answers malformed JSON for 2 s",
        }[self.kind]


def full_schedule(seconds: float) -> list[Fault]:
    """Every kind of fault, spread over the submission period (``seconds``), several worker
    kills and two Redis restarts, one Postgres restart."""
    plan = [
        ("model_500", 0.06),
        ("worker_kill", 0.12, 0),
        ("model_429", 0.2),
        ("redis_restart", 0.3),
        ("worker_kill", 0.4, 1),
        ("model_timeouts", 0.48),
        ("postgres_restart", 0.58),
        ("model_malformed", 0.68),
        ("worker_kill", 0.76, 0),
        ("redis_restart", 0.86),
        ("worker_kill", 0.95, 1),
    ]
    return [
        Fault(round(seconds * p[1], 1), str(p[0]), int(p[2]) if len(p) > 2 else 0) for p in plan
    ]


def short_schedule(seconds: float) -> list[Fault]:
    """What ``make test`` runs: one worker kill, one broker flush."""
    return [
        Fault(round(seconds * 0.3, 1), "worker_kill", 0),
        Fault(round(seconds * 0.6, 1), "redis_restart"),
    ]
