"""The run engine: a state machine in Postgres, advanced one step per Celery task.

The only code that changes a Run's or a Step's status. Every state change is a conditional
UPDATE (or happens under ``select_for_update`` on the run) and writes its audit event in the
same transaction, so two workers can never both advance one run. No lock is held across a model
or tool call: a step is *claimed* (status ``running``, ``attempts`` + 1, a lease) in one short
transaction, performed outside any transaction, and its result recorded in another, conditional
on the claim still being ours.

Redelivered or duplicate nudges are harmless: a step already done is never redone, a step being
done by a live worker (unexpired lease) is left alone, and a step whose worker died (lease
expired) is taken over.

Modules, in the order a run meets them:

- ``transitions``: lock a run; start, hold for review, resume, finish, reopen it; the writes a
  reviewer's decision makes to a held step.
- ``steps``: one claim / lease / give back / retry / finish / worker-lost path for every step.
- ``requests``: ``Step.request``, typed (``ModelStepRequest``, ``ToolStepRequest``).
- ``conversation``: the messages a model step sends.
- ``model_step``: decide the next step (``plan``), call the model, record what came of it.
- ``answers``: the model's final answer (output schema, confidence, a reviewer).
- ``tool_calls``: the tool calls of a turn, each decided by tools.policy.
- ``tool_step``: perform one tool call and record its result.
- ``budget``: what happens when a run's budget runs out.
"""

from .conversation import SESSION_HISTORY_RUNS, build_messages
from .model_step import MAX_THROTTLED, advance, blocked_by_session, plan, record_model_answer
from .steps import Outcome, backoff_seconds, countdown
from .tool_calls import ESCALATE_TOOL
from .tool_step import execute_tool_call
from .transitions import (
    fail_after_crash,
    finish_run,
    mark_progress,
    reopen_failed_run,
    resume_after_review,
)

__all__ = [
    "ESCALATE_TOOL",
    "MAX_THROTTLED",
    "SESSION_HISTORY_RUNS",
    "Outcome",
    "advance",
    "backoff_seconds",
    "blocked_by_session",
    "build_messages",
    "countdown",
    "execute_tool_call",
    "fail_after_crash",
    "finish_run",
    "mark_progress",
    "plan",
    "record_model_answer",
    "reopen_failed_run",
    "resume_after_review",
]
