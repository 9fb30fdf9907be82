"""Tools that exist only for the tests, loaded with AGENTSITE_TOOL_MODULES (the same way a
project registers its own tools) by the test process and the test worker."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from tools import outbox
from tools.registry import ToolContext, tool


class SlowNotifyArgs(BaseModel):
    message: str = Field(max_length=200)
    marker: str = Field(description="A file the tool writes its pid to once it has recorded.")


@tool(
    name="slow_notify",
    description="Test tool: records a notification in the outbox, then dawdles on attempt 1.",
    risk="high",
    timeout=5,
    retries=0,
    side_effects=True,
)
def slow_notify(args: SlowNotifyArgs, ctx: ToolContext) -> dict[str, Any]:
    message, created = outbox.record(
        ctx, kind="notification", destination="tests", payload={"message": args.message}
    )
    if ctx.attempt == 1:
        # The side effect is committed; the test kills this process now, before the result is
        # recorded, so the call is redelivered and must not record it a second time.
        Path(args.marker).write_text(str(os.getpid()))
        time.sleep(30)
    return {"outbox_id": message.pk, "duplicate": not created, "attempt": ctx.attempt}


class DawdleArgs(BaseModel):
    seconds: float = Field(ge=0, le=30)


@tool(
    name="dawdle",
    description="Test tool: waits the given seconds, longer than its 1 s time limit allows.",
    timeout=1,
    retries=0,
)
def dawdle(args: DawdleArgs, ctx: ToolContext) -> dict[str, Any]:
    time.sleep(args.seconds)  # cooperative under gevent; interrupted by the soft limit
    return {"slept": args.seconds}


class GrantCreditsArgs(BaseModel):
    """Defaults and an alias: what the model leaves out, or names by the field's own name,
    is what the tool runs with all the same (tests/tools/test_cumulative.py)."""

    model_config = ConfigDict(populate_by_name=True)

    account: str = "A-1"
    credits: int = Field(default=100, ge=-10_000, le=10_000)
    bonus_eur: int = Field(default=0, alias="bonus", ge=-10_000, le=10_000)


@tool(name="grant_credits", description="Test tool: grants credits (nothing happens).")
def grant_credits(args: GrantCreditsArgs, ctx: ToolContext) -> dict[str, Any]:
    return {"credits": args.credits, "bonus": args.bonus_eur}
